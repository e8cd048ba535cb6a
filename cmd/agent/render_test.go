package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// render prints or writes what to commit; it refuses, with a non-zero exit and nothing
// written, to overwrite a file it did not write, and to give Flux a local chart; a
// wrong install.managed_by is a configuration error naming the key.
func TestRender(t *testing.T) {
	dir := t.TempDir()
	values := filepath.Join(dir, "values.yaml")
	os.WriteFile(values, []byte("injector: {enabled: false}\n"), 0o600)
	cfg := filepath.Join(dir, "config.yaml")
	write := func(extra string) {
		os.WriteFile(cfg, []byte(`
nodes:
  - {name: k8s-1, address: 10.0.0.11}
  - {name: k8s-2, address: 10.0.0.12}
ssh:
  identity: {file: /etc/pve-vault-agent/id_ed25519}
`+extra), 0o600)
	}
	chart := "chart: {values_files: [" + values + "]}\n"
	write(chart + "install: {managed_by: flux, helmrelease: flux-system/vault}\n")
	r := runBinary(t, nil, "render", "--flux", "--config", cfg)
	if r.code != 0 || !strings.Contains(r.stdout, "kind: HelmRelease") || !strings.Contains(r.stdout, "updateStrategyType: OnDelete") || strings.Count(r.stdout, "kind: PersistentVolume\n") != 2 {
		t.Fatalf("render --flux: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	out := filepath.Join(dir, "git")
	if r := runBinary(t, nil, "render", "--flux", "-o", out, "--config", cfg); r.code != 0 || strings.Count(r.stderr, "wrote ") != 4 {
		t.Fatalf("render -o: exit %d\n%s", r.code, r.stderr)
	}
	// Rendered again over its own files: fine. Over the operator's: refused, nothing written.
	if r := runBinary(t, nil, "render", "--flux", "-o", out, "--config", cfg); r.code != 0 {
		t.Fatalf("render -o again: exit %d\n%s", r.code, r.stderr)
	}
	theirs := filepath.Join(dir, "theirs")
	os.MkdirAll(theirs, 0o755)
	os.WriteFile(filepath.Join(theirs, "values.yaml"), []byte("server: {}\n"), 0o644)
	r = runBinary(t, nil, "render", "-o", theirs, "--config", cfg)
	if r.code == 0 || !strings.Contains(r.stderr, filepath.Join(theirs, "values.yaml")) || !strings.Contains(r.stderr, "hint:") {
		t.Fatalf("render over the operator's file: exit %d\n%s", r.code, r.stderr)
	}
	if b, _ := os.ReadFile(filepath.Join(theirs, "values.yaml")); string(b) != "server: {}\n" {
		t.Fatal("the operator's file was changed")
	}
	if ents, _ := os.ReadDir(theirs); len(ents) != 1 {
		t.Fatalf("files written beside the refusal: %v", ents)
	}
	write("chart: {path: /srv/charts/vault-0.34.1.tgz, values_files: [" + values + "]}\n")
	if r := runBinary(t, nil, "render", "--flux", "--config", cfg); r.code == 0 || !strings.Contains(r.stderr, "local chart") {
		t.Fatalf("render --flux of a local chart: exit %d\n%s", r.code, r.stderr)
	}
	write(chart + "install: {managed_by: fluxcd, helmrelease: vault}\n")
	r = runBinary(t, nil, "render", "--config", cfg)
	if r.code != 78 || !strings.Contains(r.stderr, "install.managed_by:") || !strings.Contains(r.stderr, "install.helmrelease:") {
		t.Fatalf("bad install settings: exit %d\n%s", r.code, r.stderr)
	}
}
