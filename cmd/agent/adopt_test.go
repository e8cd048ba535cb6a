package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// adopt's inputs, before anything reaches Vault: the token file is required, shares on
// standard input need --yes, typed shares are read one per line up to an empty line and
// then the question is asked; a bad share is named by number, never echoed.
func TestAdoptInputs(t *testing.T) {
	dir := t.TempDir()
	cfg := writeMinimalConfig(t, dir)
	tok := filepath.Join(dir, "token")
	if err := os.WriteFile(tok, []byte("hvs.not-a-real-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	share := func(b byte) string { return base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{b}, 33)) }
	for _, tc := range []struct {
		name  string
		args  []string
		stdin string
		code  int
		want  string
	}{
		{"no token", []string{"adopt"}, "", exitUsage, "adopt needs --auth-token-file"},
		{"stdin without --yes", []string{"adopt", "--auth-token-file", tok, "--init-output", "-"}, share(1) + "\n", exitUsage, "add --yes"},
		{"typed, then no", []string{"adopt", "--auth-token-file", tok}, share(1) + "\n" + share(2) + "\n\nn\n", exitFailed, "share 3: adopt this Vault"},
		{"a bad share", []string{"adopt", "--auth-token-file", tok}, share(1) + "\nnot-a-share!\n\n", exitFailed, "share #2: not an unseal share"},
		{"none typed", []string{"adopt", "--auth-token-file", tok}, "\n", exitFailed, "no share typed: nothing changed"},
		{"a bad file", []string{"adopt", "--auth-token-file", tok, "--init-output", tok, "--yes"}, "", exitFailed, "--init-output: share #1: not an unseal share"},
	} {
		var out, errb bytes.Buffer
		code := run(context.Background(), append(tc.args, "--config", cfg), strings.NewReader(tc.stdin), &out, &errb)
		if code != tc.code || !strings.Contains(errb.String(), tc.want) {
			t.Errorf("%s: exit %d, want %d and %q:\n%s", tc.name, code, tc.code, tc.want, errb.String())
		}
		all := out.String() + errb.String()
		if strings.Contains(all, share(1)) || strings.Contains(all, share(2)) || strings.Contains(all, "not-a-real-token") || strings.Contains(all, "not-a-share!") {
			t.Errorf("%s: a share or the token was printed:\n%s", tc.name, all)
		}
		if _, err := os.Stat(filepath.Join(dir, "state", "unseal.cred")); err == nil {
			t.Fatalf("%s: a keyfile was written", tc.name)
		}
	}
}
