// Command benchoffsite measures an off-host push to S3 against a plain minio-go
// PutObject of the same file (issue 16): the lab's SeaweedFS on loopback, one file of
// -mib random bytes, each side run -runs times in a fresh child process (after one
// warm-up each), median times and their ratio printed; then the push's peak RSS at
// -rss-small-mib and -rss-large-mib (4× apart). The push encrypts (age), uploads in parts, reads the object back and
// compares size and SHA-256, then writes the authenticated manifest and the head. Run
// it with scripts/bench-offsite.sh.
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"time"

	"filippo.io/age"
	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot/offsite"
)

// job is what a child process does, passed as JSON in PVA_BENCH_JOB.
type job struct {
	Mode      string // "plain" or "push"
	File      string
	Endpoint  string
	Bucket    string
	AccessKey string
	SecretKey string
	Recipient string
	Key       string // object name for plain
}

func main() {
	if j := os.Getenv("PVA_BENCH_JOB"); j != "" {
		var jb job
		if err := json.Unmarshal([]byte(j), &jb); err != nil {
			fail(err)
		}
		if err := child(jb); err != nil {
			fail(err)
		}
		return
	}
	size := flag.Int("mib", 256, "file size for the throughput runs")
	small := flag.Int("rss-small-mib", 256, "file size for the first RSS point")
	large := flag.Int("rss-large-mib", 1024, "file size for the second RSS point")
	runs := flag.Int("runs", 5, "runs per side (the median is printed)")
	flag.Parse()
	if err := run(*size, *small, *large, *runs); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "benchoffsite:", err)
	os.Exit(1)
}

func child(j job) error {
	ctx := context.Background()
	switch j.Mode {
	case "plain":
		c, err := minio.New(j.Endpoint, &minio.Options{Creds: credentials.NewStaticV4(j.AccessKey, j.SecretKey, ""), Secure: false})
		if err != nil {
			return err
		}
		f, err := os.Open(j.File)
		if err != nil {
			return err
		}
		defer f.Close()
		fi, _ := f.Stat()
		_, err = c.PutObject(ctx, j.Bucket, j.Key, f, fi.Size(), minio.PutObjectOptions{ContentType: "application/octet-stream"})
		return err
	case "push":
		t, err := offsite.NewS3(offsite.S3Config{Endpoint: j.Endpoint, Bucket: j.Bucket, Prefix: "bench", AccessKey: j.AccessKey, SecretKey: j.SecretKey, AllowHTTP: true})
		if err != nil {
			return err
		}
		r, err := age.ParseX25519Recipient(j.Recipient)
		if err != nil {
			return err
		}
		mk := make([]byte, 32)
		rand.Read(mk)
		fi, err := os.Stat(j.File)
		if err != nil {
			return err
		}
		now := time.Now().UTC()
		e := snapshot.Entry{Path: j.File, Time: now, Size: fi.Size(), Verified: true,
			Manifest: &snapshot.Manifest{File: filepath.Base(j.File), Size: fi.Size(), Created: now}}
		_, err = offsite.Push(ctx, t, e, offsite.Keys{Recipients: []age.Recipient{r}, MAC: mk}, now, true)
		return err
	}
	return fmt.Errorf("unknown mode %q", j.Mode)
}

// spawn runs a job in a child process and returns its wall time and peak RSS.
func spawn(j job) (time.Duration, int64, error) {
	b, _ := json.Marshal(j)
	self, err := os.Executable()
	if err != nil {
		return 0, 0, err
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), "PVA_BENCH_JOB="+string(b))
	cmd.Stderr = os.Stderr
	t0 := time.Now()
	if err := cmd.Run(); err != nil {
		return 0, 0, fmt.Errorf("%s: %w", j.Mode, err)
	}
	d := time.Since(t0)
	ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	return d, ru.Maxrss * 1024, nil
}

func randomFile(path string, mib int) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.CopyN(f, rand.Reader, int64(mib)<<20)
	return err
}

func median(ds []time.Duration) time.Duration {
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	return ds[len(ds)/2]
}

func run(size, small, large, runs int) error {
	ctx := context.Background()
	bins, err := lab.FindBins()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("/var/tmp", "pva-bench-offsite-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	s3, err := lab.StartS3(ctx, bins, filepath.Join(dir, "s3"), "bench")
	if err != nil {
		return err
	}
	defer s3.Close()
	id, err := age.GenerateX25519Identity()
	if err != nil {
		return err
	}
	base := job{Endpoint: s3.Endpoint, Bucket: s3.Bucket, AccessKey: s3.AccessKey, SecretKey: s3.SecretKey, Recipient: id.Recipient().String()}
	files := map[int]string{}
	for _, mib := range []int{size, small, large} {
		if files[mib] != "" {
			continue
		}
		p := filepath.Join(dir, "vault-"+strconv.Itoa(mib)+".snap")
		if err := randomFile(p, mib); err != nil {
			return err
		}
		files[mib] = p
	}
	fmt.Printf("SeaweedFS %s on loopback; %d MiB file; %d runs per side, alternating, after one warm-up each\n", lab.SeaweedFSVersion, size, runs)
	for _, mode := range []string{"plain", "push"} { // the server grows its volumes on first writes
		j := base
		j.Mode, j.File, j.Key = mode, files[size], "plain/warm-up"
		if _, _, err := spawn(j); err != nil {
			return err
		}
	}
	var plain, push []time.Duration
	for i := 0; i < runs; i++ {
		j := base
		j.Mode, j.File, j.Key = "plain", files[size], fmt.Sprintf("plain/run-%d", i)
		d, _, err := spawn(j)
		if err != nil {
			return err
		}
		plain = append(plain, d)
		j.Mode = "push"
		d, _, err = spawn(j)
		if err != nil {
			return err
		}
		push = append(push, d)
		fmt.Printf("run %d: plain PutObject %.2f s, push %.2f s\n", i+1, plain[i].Seconds(), push[i].Seconds())
	}
	mp, mq := median(plain), median(push)
	mib := float64(size)
	fmt.Printf("median: plain PutObject %.2f s (%.0f MiB/s), push (encrypt + upload + size check + manifest + head) %.2f s (%.0f MiB/s)\n",
		mp.Seconds(), mib/mp.Seconds(), mq.Seconds(), mib/mq.Seconds())
	fmt.Printf("throughput ratio push/plain: %.2f\n", mp.Seconds()/mq.Seconds())
	j := base
	j.Mode = "push"
	var rss [2]int64
	for i, mib := range []int{small, large} {
		j.File = files[mib]
		if _, rss[i], err = spawn(j); err != nil {
			return err
		}
	}
	fmt.Printf("push peak RSS: %d MiB at %d MiB, %d MiB at %d MiB\n", rss[0]>>20, small, rss[1]>>20, large)
	return nil
}
