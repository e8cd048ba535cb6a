package vault

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// ErrNoShares means input held no unseal share the agent could read.
var ErrNoShares = errors.New("no unseal shares found")

// NormaliseShare turns one typed or stored unseal share into the base64 form Vault's
// init returns (unseal_keys_b64), so a keyset fingerprints the same whichever form the
// operator kept. Vault's unseal takes base64 or hex (vault/logical_system.go,
// handleUnseal: base64 first, then hex); so does this.
func NormaliseShare(s string) (string, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return "", errors.New("empty share")
	}
	if b, err := base64.StdEncoding.DecodeString(s); err == nil && len(b) > 1 {
		return base64.StdEncoding.EncodeToString(b), nil
	}
	if b, err := hex.DecodeString(s); err == nil && len(b) > 1 {
		return base64.StdEncoding.EncodeToString(b), nil
	}
	return "", errors.New("not an unseal share (neither base64 nor hex)")
}

// initJSON is `vault operator init -format=json` output (and the sys/init response,
// whose keys are keys/keys_base64).
type initJSON struct {
	B64       []string `json:"unseal_keys_b64"`
	Hex       []string `json:"unseal_keys_hex"`
	APIB64    []string `json:"keys_base64"`
	APIHex    []string `json:"keys"`
	Shares    int      `json:"unseal_shares"`
	Threshold int      `json:"unseal_threshold"`
}

// textShare is a line of `vault operator init`'s text output: "Unseal Key 1: …".
var textShare = regexp.MustCompile(`^\s*Unseal Key (\d+):\s*(\S+)\s*$`)

// ParseInitOutput reads the unseal shares from what `vault operator init` printed, as
// JSON (-format=json, or the sys/init API response) or as its text, or from one share
// per line. The threshold is the output's, 0 when it does not say. Only share numbers
// ever appear in an error.
func ParseInitOutput(b []byte) (Keyset, error) {
	b = bytes.TrimSpace(b)
	var shares []string
	threshold := 0
	if len(b) > 0 && b[0] == '{' {
		var j initJSON
		if err := json.Unmarshal(b, &j); err != nil {
			return Keyset{}, errors.New("the input looks like JSON but is not valid JSON (want `vault operator init -format=json` output)")
		}
		for _, l := range [][]string{j.B64, j.APIB64, j.Hex, j.APIHex} {
			if len(l) > 0 {
				shares = l
				break
			}
		}
		threshold = j.Threshold
	} else {
		sc := bufio.NewScanner(bytes.NewReader(b))
		sc.Buffer(make([]byte, 0, 4096), 64<<10)
		text := false
		var plain []string
		for sc.Scan() {
			line := sc.Text()
			if m := textShare.FindStringSubmatch(line); m != nil {
				n, _ := strconv.Atoi(m[1])
				for len(shares) < n {
					shares = append(shares, "")
				}
				shares[n-1] = m[2]
				text = true
				continue
			}
			if t := strings.TrimSpace(line); t != "" && !strings.Contains(t, " ") {
				plain = append(plain, t)
			}
		}
		if !text {
			shares = plain // one share per line
		}
	}
	if len(shares) == 0 {
		return Keyset{}, ErrNoShares
	}
	return KeysetFromShares(threshold, shares)
}

// KeysetFromShares builds a keyset from typed shares (each normalised), for Vault's
// threshold.
func KeysetFromShares(threshold int, shares []string) (Keyset, error) {
	ks := Keyset{Threshold: threshold}
	seen := map[string]int{}
	for i, s := range shares {
		v, err := NormaliseShare(s)
		if err != nil {
			return Keyset{}, fmt.Errorf("share #%d: %w", i+1, err)
		}
		if j, ok := seen[v]; ok {
			return Keyset{}, fmt.Errorf("share #%d is share #%d again", i+1, j)
		}
		seen[v] = i + 1
		ks.Keys = append(ks.Keys, Key{Index: i + 1, value: v})
	}
	return ks, nil
}
