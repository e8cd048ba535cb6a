package k8s

import (
	"fmt"
	"net/url"
	"os"
	"reflect"
	"sort"
	"strconv"
	"strings"

	"helm.sh/helm/v3/pkg/chartutil"
	"sigs.k8s.io/yaml"
)

// ValuesFile is one user values file, already read.
type ValuesFile struct {
	Name   string
	Values map[string]any
}

// ReadValuesFiles reads YAML values files in order.
func ReadValuesFiles(paths []string) ([]ValuesFile, error) {
	var out []ValuesFile
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("values file: %w", err)
		}
		v := map[string]any{}
		if err := yaml.Unmarshal(b, &v); err != nil {
			return nil, fmt.Errorf("values file %s is not valid YAML: %w", p, err)
		}
		out = append(out, ValuesFile{Name: p, Values: v})
	}
	return out, nil
}

// Conflict is a user value that contradicts one the agent enforces.
type Conflict struct {
	File     string
	Path     string
	User     any
	Enforced any
}

func (c Conflict) String() string {
	return fmt.Sprintf("%s: %s is %s, but the agent sets %s; remove it from the file (the agent derives it from its configuration)",
		c.File, c.Path, render(c.User), render(c.Enforced))
}

func render(v any) string {
	b, err := yaml.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	s := strings.TrimSpace(string(b))
	if strings.Contains(s, "\n") {
		return fmt.Sprintf("%q", s)
	}
	return s
}

// ConflictError lists every conflict at once.
type ConflictError struct{ Conflicts []Conflict }

func (e *ConflictError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d chart value(s) contradict what the agent enforces:", len(e.Conflicts))
	for _, c := range e.Conflicts {
		b.WriteString("\n  - ")
		b.WriteString(c.String())
	}
	return b.String()
}

// MergeValues deep-merges the user files in order, then the enforced values on top.
// A user leaf that differs from an enforced leaf is a conflict: all are returned in a
// *ConflictError and nothing is merged silently. Equal values are fine.
func MergeValues(files []ValuesFile, enforced map[string]any) (map[string]any, error) {
	merged := map[string]any{}
	var conflicts []Conflict
	for _, f := range files {
		for _, path := range leafPaths(enforced) {
			uv, ok := lookup(f.Values, path)
			if !ok {
				continue
			}
			ev, _ := lookup(enforced, path)
			if !equalValue(uv, ev) {
				conflicts = append(conflicts, Conflict{File: f.Name, Path: strings.Join(path, "."), User: uv, Enforced: ev})
			}
		}
		merged = mergeMaps(merged, f.Values)
	}
	if len(conflicts) > 0 {
		sort.Slice(conflicts, func(i, j int) bool {
			return conflicts[i].File+conflicts[i].Path < conflicts[j].File+conflicts[j].Path
		})
		return nil, &ConflictError{Conflicts: conflicts}
	}
	return AsValuesFile(mergeMaps(merged, enforced))
}

// AsValuesFile returns v with the Go types a values file would give it, by writing it
// as YAML and reading it back as Helm reads values files. Charts test kinds: the real
// vault chart takes server.ha.replicas only when it is an int64 or float64, so a Go int
// there silently became its default of 3 replicas.
func AsValuesFile(v map[string]any) (map[string]any, error) {
	b, err := yaml.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("values as YAML: %w", err)
	}
	out, err := chartutil.ReadValues(b)
	if err != nil {
		return nil, fmt.Errorf("values as YAML: %w", err)
	}
	return out.AsMap(), nil
}

// leafPaths lists the paths of every non-map value in m.
func leafPaths(m map[string]any) [][]string {
	var out [][]string
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if sub, ok := m[k].(map[string]any); ok && len(sub) > 0 {
			for _, p := range leafPaths(sub) {
				out = append(out, append([]string{k}, p...))
			}
			continue
		}
		out = append(out, []string{k})
	}
	return out
}

func lookup(m map[string]any, path []string) (any, bool) {
	var cur any = m
	for _, k := range path {
		mm, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		cur, ok = mm[k]
		if !ok {
			return nil, false
		}
	}
	return cur, true
}

// equalValue compares YAML-decoded values, treating numbers by value (YAML gives
// float64 or int64 depending on the decoder).
func equalValue(a, b any) bool {
	na, aok := number(a)
	nb, bok := number(b)
	if aok && bok {
		return na == nb
	}
	return reflect.DeepEqual(normalise(a), normalise(b))
}

func number(v any) (float64, bool) {
	switch n := v.(type) {
	case int:
		return float64(n), true
	case int64:
		return float64(n), true
	case float64:
		return n, true
	}
	return 0, false
}

// normalise round-trips through YAML so both sides have the same Go types.
func normalise(v any) any {
	b, err := yaml.Marshal(v)
	if err != nil {
		return v
	}
	var out any
	if err := yaml.Unmarshal(b, &out); err != nil {
		return v
	}
	return out
}

// mergeMaps returns dst with src deep-merged over it; src wins on leaves.
func mergeMaps(dst, src map[string]any) map[string]any {
	out := make(map[string]any, len(dst)+len(src))
	for k, v := range dst {
		out[k] = v
	}
	for k, v := range src {
		if sm, ok := v.(map[string]any); ok {
			if dm, ok := out[k].(map[string]any); ok {
				out[k] = mergeMaps(dm, sm)
				continue
			}
		}
		out[k] = v
	}
	return out
}

// ChartLivenessPath is the chart's own liveness probe path (server.livenessProbe.path).
const ChartLivenessPath = "/v1/sys/health?standbyok=true"

// LivenessRestartsSealed reports whether a liveness probe on path fails while Vault is
// sealed or uninitialised, so the kubelet restarts a Vault that waits for its keys:
// sys/health answers 503 sealed and 501 uninitialised unless sealedcode/uninitcode map
// them to a success (2xx or 3xx, what the kubelet counts as alive).
func LivenessRestartsSealed(path string) bool {
	p, q, _ := strings.Cut(path, "?")
	if !strings.HasSuffix(p, "/sys/health") {
		return false // another endpoint: not Vault's health codes
	}
	values, err := url.ParseQuery(q)
	if err != nil {
		return true
	}
	ok := func(key, def string) bool {
		v := values.Get(key)
		if v == "" {
			v = def
		}
		code, err := strconv.Atoi(v)
		return err == nil && code >= 200 && code < 400
	}
	return !ok("sealedcode", "503") || !ok("uninitcode", "501")
}

// UserLivenessPath is the liveness probe the user's values enable (the last file that
// says wins, as Helm merges them), or "" when none enables it.
func UserLivenessPath(files []ValuesFile) (path, file string) {
	enabled, path := false, ChartLivenessPath
	for _, f := range files {
		if v, ok := lookup(f.Values, []string{"server", "livenessProbe", "enabled"}); ok {
			enabled, _ = v.(bool)
			file = f.Name
		}
		if v, ok := lookup(f.Values, []string{"server", "livenessProbe", "path"}); ok {
			if s, ok := v.(string); ok {
				path = s
			}
		}
	}
	if !enabled {
		return "", ""
	}
	return path, file
}

// LivenessWarning says why a liveness probe on path restarts a sealed Vault, or "".
func LivenessWarning(path string) string {
	if !LivenessRestartsSealed(path) {
		return ""
	}
	return fmt.Sprintf("the liveness probe %s fails while Vault is sealed (503) or uninitialised (501): the kubelet restarts a pod that waits for its keys longer than the probe allows (the agent rides through it, but a pod waiting for init or a recover, or sealed while the agent is down, restarts in a loop); add &sealedcode=204&uninitcode=204 to its path so it fails only when Vault does not answer", path)
}

// ValueDrift is one value the agent requires that the live release does not have.
type ValueDrift struct {
	Key  string `json:"key"`
	Live string `json:"live"` // "(unset)" when the release does not set it
	Want string `json:"want"`
}

func (d ValueDrift) String() string {
	return fmt.Sprintf("%s is %s, the agent requires %s", d.Key, d.Live, d.Want)
}

// Drift lists every leaf of want that live lacks or holds another value at, in key
// order.
func Drift(live, want map[string]any) []ValueDrift {
	var out []ValueDrift
	for _, path := range leafPaths(want) {
		wv, _ := lookup(want, path)
		lv, ok := lookup(live, path)
		switch {
		case !ok:
			out = append(out, ValueDrift{Key: strings.Join(path, "."), Live: "(unset)", Want: render(wv)})
		case !equalValue(lv, wv):
			out = append(out, ValueDrift{Key: strings.Join(path, "."), Live: render(lv), Want: render(wv)})
		}
	}
	return out
}

// YAMLStream writes objects (maps, API objects, apply configurations) as one YAML
// stream, "---" between documents.
func YAMLStream(objs ...any) ([]byte, error) {
	var b strings.Builder
	for i, o := range objs {
		y, err := yaml.Marshal(o)
		if err != nil {
			return nil, err
		}
		if i > 0 {
			b.WriteString("---\n")
		}
		b.Write(y)
	}
	return []byte(b.String()), nil
}
