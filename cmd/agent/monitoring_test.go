package main

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
)

// The shipped alert rules pass promtool's own checks and its rule unit tests (every
// alert fires when it should; none for a healthy cluster of two agents).
func TestShippedAlertRules(t *testing.T) {
	bins := lab.Need(t)
	dir := filepath.Join("..", "..", "packaging", "prometheus")
	for _, args := range [][]string{{"check", "rules", "pve-vault-agent.rules.yml"}, {"test", "rules", "pve-vault-agent.rules.test.yml"}} {
		cmd := exec.Command(bins.Promtool, args...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		t.Logf("promtool %s: %s", strings.Join(args, " "), strings.TrimSpace(string(out)))
	}
}

// scrapeMetrics reads the daemon's /metrics and returns the metric names it exports.
func scrapeMetrics(t *testing.T, addr string) map[string]bool {
	t.Helper()
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	names := map[string]bool{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		l := sc.Text()
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		names[strings.FieldsFunc(l, func(r rune) bool { return r == '{' || r == ' ' })[0]] = true
	}
	return names
}

// assertMonitoringReads fails unless every metric the shipped alert rules and Grafana
// dashboard query is one the running daemon exports (Prometheus' own `up` aside).
func assertMonitoringReads(t *testing.T, exported map[string]bool) {
	t.Helper()
	re := regexp.MustCompile(`\bpva_[a-z0-9_]+`)
	rules, err := os.ReadFile(filepath.Join("..", "..", "packaging", "prometheus", "pve-vault-agent.rules.yml"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join("..", "..", "packaging", "grafana", "pve-vault-agent.json"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	raw, _ := io.ReadAll(f)
	var dash struct {
		Panels []struct {
			Targets []struct{ Expr string }
		}
		Templating struct{ List []struct{ Query any } }
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("the dashboard is not JSON: %v", err)
	}
	var exprs []string
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}
	for _, v := range dash.Templating.List {
		if s, ok := v.Query.(string); ok {
			exprs = append(exprs, s)
		}
	}
	used := map[string]bool{}
	for _, m := range re.FindAllString(string(rules)+strings.Join(exprs, "\n"), -1) {
		used[m] = true
	}
	var missing []string
	for m := range used {
		if !exported[m] {
			missing = append(missing, m)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 || len(used) < 15 {
		t.Fatalf("the rules and the dashboard query %d metrics; the daemon does not export %v", len(used), missing)
	}
	t.Logf("the rules and the dashboard query %d metrics, all exported by the daemon", len(used))
}
