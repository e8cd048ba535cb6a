package vault

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"sort"
	"strconv"
	"strings"
)

const redacted = "[redacted]"

// Key is one unseal share. Its value never prints; log its Index.
type Key struct {
	Index int
	value string
}

func (k Key) String() string                { return "share #" + strconv.Itoa(k.Index) }
func (k Key) GoString() string              { return k.String() }
func (k Key) LogValue() slog.Value          { return slog.IntValue(k.Index) }
func (k Key) MarshalJSON() ([]byte, error)  { return []byte(strconv.Quote(redacted)), nil }
func (k Key) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(k.String())) }

// Token is a Vault token. Its value never prints.
type Token struct{ value string }

// NewToken wraps a token value (from a file or the environment of a test).
func NewToken(v string) Token { return Token{value: v} }

// Empty reports whether there is no token.
func (t Token) Empty() bool                   { return t.value == "" }
func (t Token) String() string                { return redacted }
func (t Token) GoString() string              { return redacted }
func (t Token) LogValue() slog.Value          { return slog.StringValue(redacted) }
func (t Token) MarshalJSON() ([]byte, error)  { return []byte(strconv.Quote(redacted)), nil }
func (t Token) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(redacted)) }

// Keyset is the unseal shares of one cluster.
type Keyset struct {
	Threshold int
	Keys      []Key
}

// Fingerprint identifies a keyset without revealing it: a SHA-256 over the sorted
// shares, shortened. A snapshot's manifest records it so a restore knows its keys.
func (ks Keyset) Fingerprint() string {
	vals := make([]string, len(ks.Keys))
	for i, k := range ks.Keys {
		vals[i] = k.value
	}
	sort.Strings(vals)
	h := sha256.New()
	for _, v := range vals {
		h.Write([]byte(v))
		h.Write([]byte{0})
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))[:16]
}

// ContainsAny reports whether s contains the value of any share or token, for tests and
// output scanners that must prove nothing leaked.
func ContainsAny(s string, ks Keyset, tokens ...Token) bool {
	for _, k := range ks.Keys {
		if k.value != "" && strings.Contains(s, k.value) {
			return true
		}
	}
	for _, t := range tokens {
		if t.value != "" && strings.Contains(s, t.value) {
			return true
		}
	}
	return false
}

// TokenValueForTest returns the value of t. Only tests call it (to hand a token to a
// verb through a file, as an operator would).
func TokenValueForTest(t Token) string { return t.value }

// NewKeyset builds a keyset from share values (tests; shares read from elsewhere).
func NewKeyset(threshold int, shares ...string) Keyset {
	ks := Keyset{Threshold: threshold}
	for i, s := range shares {
		ks.Keys = append(ks.Keys, Key{Index: i + 1, value: s})
	}
	return ks
}
