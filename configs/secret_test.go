package configs

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestSecretNeverPrints(t *testing.T) {
	s := NewSecret([]byte("hunter2-value"))
	var logs strings.Builder
	slog.New(slog.NewTextHandler(&logs, nil)).Info("x", "secret", s)
	js, _ := json.Marshal(map[string]any{"s": s})
	for _, out := range []string{fmt.Sprint(s), fmt.Sprintf("%v %+v %#v %s %q %x", s, s, s, s, s, s), logs.String(), string(js),
		fmt.Errorf("wrap: %v", s).Error()} {
		if strings.Contains(out, "hunter2") {
			t.Fatalf("secret leaked: %s", out)
		}
	}
	if string(s.Bytes()) != "hunter2-value" {
		t.Fatal("Bytes lost the value")
	}
}

func TestSecretRefRead(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	loose := filepath.Join(dir, "loose")
	os.WriteFile(good, []byte("s3cret\n"), 0o600)
	os.WriteFile(loose, []byte("s3cret\n"), 0o644)
	if s, err := (SecretRef{File: good}).Read(); err != nil || s.Trimmed() != "s3cret" {
		t.Fatalf("good file: %v", err)
	}
	_, err := SecretRef{File: loose}.Read()
	if !errors.Is(err, ErrInsecureSecretFile) || !strings.Contains(err.Error(), "chmod 600") || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("loose file: %v", err)
	}
	// A symlink is not followed (checked on the open descriptor, no race), and a file
	// someone else owns is refused.
	link := filepath.Join(dir, "link")
	os.Symlink(good, link)
	if _, err := (SecretRef{File: link}).Read(); err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Fatalf("symlink: %v", err)
	}
	theirs := filepath.Join(dir, "theirs")
	os.WriteFile(theirs, []byte("s3cret\n"), 0o600)
	if err := os.Chown(theirs, 4321, 4321); err != nil {
		t.Fatal(err)
	}
	if _, err := (SecretRef{File: theirs}).Read(); !errors.Is(err, ErrInsecureSecretFile) || !strings.Contains(err.Error(), "owned by uid 4321") {
		t.Fatalf("another owner: %v", err)
	}
	t.Setenv("CREDENTIALS_DIRECTORY", dir)
	if s, err := (SecretRef{Credential: "good"}).Read(); err != nil || s.Trimmed() != "s3cret" {
		t.Fatalf("credential: %v", err)
	}
	t.Setenv("CREDENTIALS_DIRECTORY", "")
	if _, err := (SecretRef{Credential: "good"}).Read(); err == nil || !strings.Contains(err.Error(), "LoadCredentialEncrypted") {
		t.Fatalf("credential without systemd: %v", err)
	}
}

func TestParseMode(t *testing.T) {
	for in, want := range map[string]Mode{"0700": 0o700, "750": 0o750, "0o700": 0o700} {
		if got, err := ParseMode(in); err != nil || got != want {
			t.Errorf("ParseMode(%q) = %v, %v", in, got, err)
		}
	}
	for _, in := range []string{"", "rwx", "0800", "77777"} {
		if _, err := ParseMode(in); err == nil {
			t.Errorf("ParseMode(%q) accepted", in)
		}
	}
}
