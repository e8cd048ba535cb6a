package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// S3 is a real S3-compatible server for the lab: SeaweedFS (master, volume, filer and
// S3 gateway in one `weed server` process) on a loopback address, with one identity and
// one bucket. Stop and Start take it down and bring it back on the same ports and data,
// as a NAS that rebooted.
type S3 struct {
	// Endpoint is host:port of the S3 API (plain HTTP on loopback).
	Endpoint  string
	AccessKey string
	SecretKey string
	Bucket    string
	Dir       string

	bin  string
	args []string
	proc *Process
}

// StartS3 starts SeaweedFS with its data under dir and creates bucket.
func StartS3(ctx context.Context, bins Bins, dir, bucket string) (*S3, error) {
	ip := "127.0.0.1"
	ports := make([]int, 8)
	for i := range ports {
		p, err := FreePort(ip)
		if err != nil {
			return nil, err
		}
		ports[i] = p
	}
	data := filepath.Join(dir, "data")
	if err := os.MkdirAll(data, 0o700); err != nil {
		return nil, err
	}
	var k [16]byte
	_, _ = rand.Read(k[:])
	s := &S3{Endpoint: net.JoinHostPort(ip, strconv.Itoa(ports[0])), AccessKey: "PVALAB" + hex.EncodeToString(k[:4]),
		SecretKey: hex.EncodeToString(k[4:]), Bucket: bucket, Dir: dir, bin: bins.Weed}
	conf := filepath.Join(dir, "s3.json")
	identities := fmt.Sprintf(`{"identities":[{"name":"pva","credentials":[{"accessKey":%q,"secretKey":%q}],"actions":["Admin","Read","Write","List","Tagging"]}]}`, s.AccessKey, s.SecretKey)
	if err := os.WriteFile(conf, []byte(identities), 0o600); err != nil {
		return nil, err
	}
	s.args = []string{"server", "-dir=" + data, "-ip=" + ip, "-ip.bind=" + ip,
		"-master.port=" + strconv.Itoa(ports[1]), "-master.port.grpc=" + strconv.Itoa(ports[2]),
		"-volume.port=" + strconv.Itoa(ports[3]), "-volume.port.grpc=" + strconv.Itoa(ports[4]),
		"-volume.max=0", "-master.volumeSizeLimitMB=256",
		"-filer", "-filer.port=" + strconv.Itoa(ports[5]), "-filer.port.grpc=" + strconv.Itoa(ports[6]),
		"-s3", "-s3.port=" + strconv.Itoa(ports[0]), "-s3.port.grpc=" + strconv.Itoa(ports[7]), "-s3.config=" + conf,
		"-s3.port.iceberg=0", "-s3.port.lance=0"}
	if err := s.Start(ctx); err != nil {
		return nil, err
	}
	c, err := s.Client()
	if err != nil {
		s.Close()
		return nil, err
	}
	if err := WaitFor(ctx, 60*time.Second, "SeaweedFS to create bucket "+bucket, func(ctx context.Context) error {
		err := c.MakeBucket(ctx, bucket, minio.MakeBucketOptions{})
		if err != nil && minio.ToErrorResponse(err).Code == "BucketAlreadyOwnedByYou" {
			return nil
		}
		return err
	}); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Client is a minio-go client for the server.
func (s *S3) Client() (*minio.Client, error) {
	return minio.New(s.Endpoint, &minio.Options{Creds: credentials.NewStaticV4(s.AccessKey, s.SecretKey, ""), Secure: false})
}

// Start (re)starts the server and waits until the S3 API answers.
func (s *S3) Start(ctx context.Context) error {
	p, err := startProcess("seaweedfs", filepath.Join(s.Dir, "weed.log"), s.bin, s.args, nil, nil)
	if err != nil {
		return err
	}
	s.proc = p
	c, err := s.Client()
	if err != nil {
		return err
	}
	// Ready means a write goes through: after a restart the master learns its volumes
	// from their heartbeats, and until then writes wait.
	err = WaitFor(ctx, 60*time.Second, "SeaweedFS S3 on "+s.Endpoint+" to take writes", func(ctx context.Context) error {
		if err := p.errIfExited(); err != nil {
			return Permanent(err)
		}
		if _, err := c.ListBuckets(ctx); err != nil {
			return err
		}
		if ok, err := c.BucketExists(ctx, s.Bucket); err != nil || !ok {
			return err // the first start: StartS3 creates the bucket next
		}
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		_, err := c.PutObject(wctx, s.Bucket, "lab-ready", strings.NewReader("ok"), 2, minio.PutObjectOptions{})
		if err == nil {
			err = c.RemoveObject(ctx, s.Bucket, "lab-ready", minio.RemoveObjectOptions{})
		}
		return err
	})
	if err != nil {
		p.Kill()
	}
	return err
}

// Stop takes the server down (the data stays).
func (s *S3) Stop() {
	if s.proc != nil {
		s.proc.Stop()
	}
}

// Close stops the server.
func (s *S3) Close() { s.Stop() }
