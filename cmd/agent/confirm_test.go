package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The confirmation prompt reads the stdin it is given: "n" cancels with nothing
// changed; without a terminal (and no reader), --yes is required.
func TestConfirmationPrompt(t *testing.T) {
	cfg := filepath.Join("..", "..", "configs", "config.example.yaml")
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"restore", "/nonexistent.snap", "--config", cfg}, strings.NewReader("n\n"), &out, &errb)
	if code != exitFailed || !strings.Contains(errb.String(), "replace all of Vault's data with /nonexistent.snap? [y/N]") || !strings.Contains(errb.String(), "cancelled: nothing changed") {
		t.Fatalf("answered no: exit %d\n%s", code, errb.String())
	}
	errb.Reset()
	code = run(context.Background(), []string{"recover", "--config", cfg}, nil, &out, &errb)
	if code != exitUsage || !strings.Contains(errb.String(), "pass --yes") || !strings.Contains(errb.String(), "recover plan:") {
		t.Fatalf("no terminal: exit %d\n%s", code, errb.String())
	}
}

// What to do is printed on its own "hint:" line, apart from what happened.
func TestHintsOnTheirOwnLine(t *testing.T) {
	dir := t.TempDir()
	cfg := writeMinimalConfig(t, dir)
	r := runBinary(t, nil, "keyfile", "check", "--config", cfg)
	if r.code != 1 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	last := lines[len(lines)-1]
	if !strings.HasPrefix(last, "hint: run `pve-vault-agent init`") || strings.Contains(lines[len(lines)-2], "run `pve-vault-agent init`") {
		t.Fatalf("stderr:\n%s", r.stderr)
	}
}

// writeMinimalConfig writes a valid configuration whose keyfile does not exist yet.
func writeMinimalConfig(t *testing.T, dir string) string {
	t.Helper()
	key := filepath.Join(dir, "id")
	os.WriteFile(key, []byte("unused"), 0o600)
	cfg := filepath.Join(dir, "config.yaml")
	body := "nodes: [{name: n1, address: 127.0.0.1}]\nssh: {identity: {file: " + key + "}}\nvault: {keyfile: " + filepath.Join(dir, "state", "unseal.cred") + ", pod_access: static, addresses: ['https://127.0.0.1:1']}\n"
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfg
}
