package offsite

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// S3Config is an S3-compatible bucket (AWS, MinIO, SeaweedFS, Garage, a NAS's S3).
type S3Config struct {
	Endpoint  string // host:port
	Bucket    string
	Prefix    string // a "directory" inside the bucket
	Region    string
	AccessKey string
	SecretKey string // never logged
	// CAFile verifies the endpoint's certificate; AllowHTTP speaks plain HTTP (a
	// loopback or lab endpoint only: the objects are encrypted, the credentials are not).
	CAFile    string
	AllowHTTP bool
	// PartSize is the multipart part size (8 MiB); an upload holds four parts.
	PartSize uint64
	// Activity, when set, counts the bytes moved on the target's connections (HTTP has
	// no traffic of its own between requests, so a byte is progress).
	Activity *Activity
}

// S3 is an S3 target.
type S3 struct {
	cfg    S3Config
	client *minio.Client
	tr     *http.Transport
}

// NewS3 builds the client; it does not contact the endpoint.
func NewS3(cfg S3Config) (*S3, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil
	tr.ResponseHeaderTimeout = 2 * time.Minute
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	if a := cfg.Activity; a != nil {
		dial := tr.DialContext
		tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dial(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return a.Conn(c), nil
		}
	}
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("s3 CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("s3 CA file %s holds no PEM certificate", cfg.CAFile)
		}
		tr.TLSClientConfig.RootCAs = pool
	}
	c, err := minio.New(cfg.Endpoint, &minio.Options{
		Creds:     credentials.NewStaticV4(cfg.AccessKey, cfg.SecretKey, ""),
		Secure:    !cfg.AllowHTTP,
		Region:    cfg.Region,
		Transport: tr,
		// One try per call: the agent retries whole pushes itself, with its own pauses,
		// and a target that is down must not hold a backup for minio-go's ten tries.
		MaxRetries: 1,
	})
	if err != nil {
		return nil, fmt.Errorf("s3 %s: %w", cfg.Endpoint, err)
	}
	if cfg.PartSize == 0 {
		cfg.PartSize = 8 << 20
	}
	cfg.Prefix = strings.Trim(cfg.Prefix, "/")
	return &S3{cfg: cfg, client: c, tr: tr}, nil
}

// Abort closes the target's idle connections; requests in flight end with their context.
func (s *S3) Abort() { s.tr.CloseIdleConnections() }

func (s *S3) String() string {
	return "s3 " + s.cfg.Endpoint + "/" + path.Join(s.cfg.Bucket, s.cfg.Prefix)
}

func (s *S3) key(name string) (string, error) {
	c, err := cleanName(name)
	if err != nil {
		return "", err
	}
	if s.cfg.Prefix == "" {
		return c, nil
	}
	return s.cfg.Prefix + "/" + c, nil
}

// Put streams r of unknown size as a multipart upload of PartSize parts (each with a
// checksum the server verifies), or a small one of known size in one request; either
// way the object exists only once complete, so a killed Put leaves at most an
// incomplete multipart upload that is never listed (Clean aborts it).
func (s *S3) Put(ctx context.Context, name string, r io.Reader, size int64) error {
	k, err := s.key(name)
	if err != nil {
		return err
	}
	// Parts are filled one after another and sent four at a time: the upload runs at
	// the speed of a plain PutObject while memory stays at four parts whatever the
	// snapshot's size.
	// Each part carries the CRC32C minio-go computed of it (x-amz-checksum-crc32c, and
	// over plain HTTP the SHA-256 its signature covers); the server recomputes them and
	// refuses the part (BadDigest) when they differ. A SHA-256 per part as well cost a
	// tenth of the throughput for nothing the manifest's SHA-256 does not cover.
	opts := minio.PutObjectOptions{PartSize: s.cfg.PartSize, ContentType: "application/octet-stream", NumThreads: 4,
		ConcurrentStreamParts: size < 0, AutoChecksum: minio.ChecksumCRC32C}
	_, err = s.client.PutObject(ctx, s.cfg.Bucket, k, r, size, opts)
	if err != nil {
		return fmt.Errorf("%s: put %s: %w", s, name, err)
	}
	return nil
}

// Check compares the stored object's size with what was sent; every byte's integrity
// was checked by the server part by part against the checksum sent with it, and the
// whole object's SHA-256 is in the authenticated manifest that every fetch checks.
func (s *S3) Check(ctx context.Context, name string, size int64, _ string) error {
	k, err := s.key(name)
	if err != nil {
		return err
	}
	st, err := s.client.StatObject(ctx, s.cfg.Bucket, k, minio.StatObjectOptions{})
	if err != nil {
		return fmt.Errorf("%s: check %s: %w", s, name, err)
	}
	if st.Size != size {
		return fmt.Errorf("%s: %s holds %d bytes after upload; sent %d", s, name, st.Size, size)
	}
	return nil
}

func (s *S3) Open(ctx context.Context, name string) (io.ReadCloser, error) {
	k, err := s.key(name)
	if err != nil {
		return nil, err
	}
	o, err := s.client.GetObject(ctx, s.cfg.Bucket, k, minio.GetObjectOptions{})
	if err != nil {
		return nil, fmt.Errorf("%s: get %s: %w", s, name, err)
	}
	// GetObject is lazy: a missing object shows at the first read.
	if _, err := o.Stat(); err != nil {
		o.Close()
		if minio.ToErrorResponse(err).Code == "NoSuchKey" {
			return nil, fmt.Errorf("%s: %s: %w", s, name, ErrNotFound)
		}
		return nil, fmt.Errorf("%s: get %s: %w", s, name, err)
	}
	return o, nil
}

func (s *S3) List(ctx context.Context, prefix string) ([]Object, error) {
	base := s.cfg.Prefix
	if base != "" {
		base += "/"
	}
	var out []Object
	for o := range s.client.ListObjects(ctx, s.cfg.Bucket, minio.ListObjectsOptions{Prefix: base + prefix, Recursive: true}) {
		if o.Err != nil {
			return nil, fmt.Errorf("%s: list: %w", s, o.Err)
		}
		out = append(out, Object{Name: strings.TrimPrefix(o.Key, base), Size: o.Size, Modified: o.LastModified})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (s *S3) Remove(ctx context.Context, name string) error {
	k, err := s.key(name)
	if err != nil {
		return err
	}
	if err := s.client.RemoveObject(ctx, s.cfg.Bucket, k, minio.RemoveObjectOptions{}); err != nil && minio.ToErrorResponse(err).Code != "NoSuchKey" {
		return fmt.Errorf("%s: remove %s: %w", s, name, err)
	}
	return nil
}

// Clean aborts the incomplete multipart uploads of the agent's own objects (a bucket
// may be shared: other writers' uploads under the prefix are left alone).
func (s *S3) Clean(ctx context.Context) error {
	var errs []error
	for _, name := range []string{snapDir, keyfileDir, headName} {
		k, err := s.key(strings.TrimSuffix(name, "/"))
		if err != nil {
			return err
		}
		if strings.HasSuffix(name, "/") {
			k += "/"
		}
		for u := range s.client.ListIncompleteUploads(ctx, s.cfg.Bucket, k, true) {
			if u.Err != nil {
				return fmt.Errorf("%s: list incomplete uploads: %w", s, u.Err)
			}
			if err := s.client.RemoveIncompleteUpload(ctx, s.cfg.Bucket, u.Key); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

func (s *S3) Close() error { return nil }

// ReadsBack: see Target.
func (s *S3) ReadsBack() bool { return false }
