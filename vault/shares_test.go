package vault

import (
	"encoding/base64"
	"encoding/hex"
	"strings"
	"testing"
)

// The three forms `vault operator init` prints its shares in, and a file of one share
// per line, give the same keyset; bad input names the share, never its value.
func TestParseInitOutput(t *testing.T) {
	raw := [][]byte{make([]byte, 33), make([]byte, 33), make([]byte, 33)}
	for i := range raw {
		for j := range raw[i] {
			raw[i][j] = byte(i*40 + j)
		}
	}
	var b64, hx []string
	for _, r := range raw {
		b64 = append(b64, base64.StdEncoding.EncodeToString(r))
		hx = append(hx, hex.EncodeToString(r))
	}
	want := NewKeyset(2, b64...).Fingerprint()
	quote := func(l []string) string { return `"` + strings.Join(l, `","`) + `"` }
	for name, in := range map[string]string{
		"json":  `{"unseal_keys_b64":[` + quote(b64) + `],"unseal_keys_hex":[` + quote(hx) + `],"unseal_shares":3,"unseal_threshold":2,"root_token":"hvs.x"}`,
		"hex":   `{"unseal_keys_hex":[` + quote(hx) + `],"unseal_threshold":2}`,
		"text":  "Unseal Key 1: " + b64[0] + "\nUnseal Key 2: " + b64[1] + "\nUnseal Key 3: " + b64[2] + "\n\nInitial Root Token: hvs.x\n\nVault initialized with 3 key shares and a key threshold of 2.\n",
		"lines": strings.Join(hx, "\n") + "\n",
	} {
		ks, err := ParseInitOutput([]byte(in))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if len(ks.Keys) != 3 || ks.Fingerprint() != want {
			t.Errorf("%s: %d shares, fingerprint %s, want 3 and %s", name, len(ks.Keys), ks.Fingerprint(), want)
		}
		if name != "text" && name != "lines" && ks.Threshold != 2 {
			t.Errorf("%s: threshold %d", name, ks.Threshold)
		}
	}
	for in, want := range map[string]string{
		"":                               ErrNoShares.Error(),
		"{not json":                      "not valid JSON",
		`{"unseal_keys_b64":["!!"]}`:     "share #1: not an unseal share",
		b64[0] + "\n" + b64[0] + "\n":    "share #2 is share #1 again",
		`{"unseal_keys_b64":[], "x": 1}`: ErrNoShares.Error(),
		"Unseal Key 2: " + b64[1] + "\n": "share #1: empty share",
	} {
		_, err := ParseInitOutput([]byte(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, want %q", in, err, want)
		}
		if err != nil && (strings.Contains(err.Error(), b64[0]) || strings.Contains(err.Error(), b64[1])) {
			t.Errorf("an error printed a share: %v", err)
		}
	}
}
