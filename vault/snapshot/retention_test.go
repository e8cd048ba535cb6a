package snapshot

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func entriesEvery(from time.Time, step time.Duration, n int) []Entry {
	var out []Entry
	for i := 0; i < n; i++ {
		t := from.Add(time.Duration(i) * step)
		out = append(out, Entry{Path: "vault-" + t.Format(timeLayout) + ext, Time: t, Verified: true})
	}
	return out
}

func render(ds []Decision) string {
	var b strings.Builder
	for _, d := range ds {
		verdict := "drop"
		if d.Keep {
			verdict = "keep"
		}
		fmt.Fprintf(&b, "%s %s  %s\n", verdict, d.Entry.Time.Format("2006-01-02 15:04 Mon"), strings.Join(d.Reasons, "; "))
	}
	return b.String()
}

func TestPlanGolden(t *testing.T) {
	now := time.Date(2026, 11, 27, 12, 30, 0, 0, time.UTC)
	start := now.AddDate(0, -4, 0)
	six := entriesEvery(start, 6*time.Hour, int(now.Sub(start)/(6*time.Hour))+1)
	hourly := entriesEvery(now.Add(-72*time.Hour), time.Hour, 73)
	withUnverified := entriesEvery(now.AddDate(0, 0, -3), 12*time.Hour, 7)
	withUnverified[6].Verified = false // the newest has no manifest
	withUnverified[1].Verified = false
	for _, tc := range []struct {
		name    string
		entries []Entry
		policy  Policy
	}{
		{"default-4-months-every-6h", six, Policy{KeepLast: 8, Daily: 7, Weekly: 4, Monthly: 6}},
		{"hourly-3-days", hourly, Policy{KeepLast: 2, Hourly: 24, Daily: 3}},
		{"keep-last-only", hourly[:10], Policy{KeepLast: 3}},
		{"unverified", withUnverified, Policy{KeepLast: 1}},
		{"empty", nil, Policy{KeepLast: 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := render(Plan(now, tc.entries, tc.policy))
			path := filepath.Join("testdata", "retention", tc.name+".golden")
			if *update {
				os.MkdirAll(filepath.Dir(path), 0o755)
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test -update once)", err)
			}
			if got != string(want) {
				t.Fatalf("plan differs from %s:\n%s", path, got)
			}
		})
	}
}

// Properties that hold for any input: the newest verified snapshot survives, nothing
// unverified is dropped, and the plan does not depend on input order.
func TestPlanInvariants(t *testing.T) {
	now := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	es := entriesEvery(now.AddDate(0, -2, 0), 7*time.Hour, 200)
	es[199].Verified = false
	for _, p := range []Policy{{KeepLast: 1}, {KeepLast: 1, Monthly: 1}, {KeepLast: 5, Hourly: 3, Daily: 2, Weekly: 1, Monthly: 1}} {
		ds := Plan(now, es, p)
		kept := 0
		for _, d := range ds {
			if d.Entry.Time.Equal(es[198].Time) && !d.Keep {
				t.Fatalf("%+v dropped the newest verified snapshot", p)
			}
			if !d.Entry.Verified && !d.Keep {
				t.Fatalf("%+v dropped an unverified snapshot", p)
			}
			if d.Keep {
				kept++
			}
		}
		rev := append([]Entry(nil), es...)
		for i, j := 0, len(rev)-1; i < j; i, j = i+1, j-1 {
			rev[i], rev[j] = rev[j], rev[i]
		}
		if render(Plan(now, rev, p)) != render(ds) {
			t.Fatalf("%+v: plan depends on input order", p)
		}
		if kept == 0 || kept == len(es) {
			t.Fatalf("%+v kept %d of %d", p, kept, len(es))
		}
	}
}
