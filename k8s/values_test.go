package k8s

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

func TestMergeValues(t *testing.T) {
	enforced := map[string]any{"server": map[string]any{
		"ha":  map[string]any{"enabled": true, "replicas": 3, "raft": map[string]any{"enabled": true}},
		"uid": 100,
	}}
	user := ValuesFile{Name: "values.yaml", Values: map[string]any{
		"global": map[string]any{"tlsDisable": true},
		"server": map[string]any{"resources": map[string]any{"limits": map[string]any{"memory": "512Mi"}}, "ha": map[string]any{"replicas": float64(3)}},
	}}
	got, err := MergeValues([]ValuesFile{user}, enforced)
	if err != nil {
		t.Fatal(err)
	}
	// Numbers reach Helm as a values file gives them (float64), not as Go ints: the
	// real chart's replicas helper takes only int64 or float64 and falls back to 3.
	want := map[string]any{
		"global": map[string]any{"tlsDisable": true},
		"server": map[string]any{
			"resources": map[string]any{"limits": map[string]any{"memory": "512Mi"}},
			"ha":        map[string]any{"enabled": true, "replicas": float64(3), "raft": map[string]any{"enabled": true}},
			"uid":       float64(100),
		},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("merged %#v", got)
	}

	conflicting := ValuesFile{Name: "/etc/pve-vault-agent/values.yaml", Values: map[string]any{
		"server": map[string]any{"ha": map[string]any{"raft": map[string]any{"enabled": false}}, "uid": 1000},
	}}
	_, err = MergeValues([]ValuesFile{user, conflicting}, enforced)
	var ce *ConflictError
	if !errors.As(err, &ce) || len(ce.Conflicts) != 2 {
		t.Fatalf("err %v", err)
	}
	for _, want := range []string{"server.ha.raft.enabled is false, but the agent sets true", "server.uid is 1000, but the agent sets 100", "/etc/pve-vault-agent/values.yaml"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("message lacks %q:\n%v", want, err)
		}
	}
}

// A liveness probe restarts a sealed Vault unless its sys/health codes map sealed and
// uninitialised to a success; the user's files enable it as Helm merges them.
func TestLivenessRestartsSealed(t *testing.T) {
	for path, want := range map[string]bool{
		"/v1/sys/health?standbyok=true":                               true, // the chart's and the write-up's
		"/v1/sys/health?standbyok=true&sealedcode=204&uninitcode=204": false,
		"/v1/sys/health?standbyok=true&sealedcode=204":                true, // uninitialised still restarts
		"/v1/sys/health?sealedcode=299&uninitcode=200":                false,
		"/v1/sys/health?sealedcode=503&uninitcode=204":                true,
		"/healthz": false,
	} {
		if got := LivenessRestartsSealed(path); got != want {
			t.Errorf("%s: %v, want %v", path, got, want)
		}
	}
	files := []ValuesFile{{Name: "a", Values: map[string]any{"server": map[string]any{"livenessProbe": map[string]any{"enabled": true}}}}}
	if p, f := UserLivenessPath(files); p != ChartLivenessPath || f != "a" {
		t.Fatalf("enabled without a path: %q %q", p, f)
	}
	files = append(files, ValuesFile{Name: "b", Values: map[string]any{"server": map[string]any{"livenessProbe": map[string]any{"enabled": false}}}})
	if p, _ := UserLivenessPath(files); p != "" {
		t.Fatalf("disabled by a later file: %q", p)
	}
}

// Drift names each required leaf the live values lack or hold differently, numbers
// compared by value, extra live keys ignored.
func TestDrift(t *testing.T) {
	live := map[string]any{"fullnameOverride": "vault", "server": map[string]any{"uid": int64(100), "updateStrategyType": "RollingUpdate", "extra": true}}
	want := map[string]any{"fullnameOverride": "vault", "server": map[string]any{"uid": 100.0, "updateStrategyType": "OnDelete", "ha": map[string]any{"replicas": 3}}}
	got := Drift(live, want)
	if len(got) != 2 || got[0].String() != "server.ha.replicas is (unset), the agent requires 3" || got[1].String() != "server.updateStrategyType is RollingUpdate, the agent requires OnDelete" {
		t.Fatalf("drift %v", got)
	}
	if d := Drift(want, want); len(d) != 0 {
		t.Fatalf("no drift expected: %v", d)
	}
}
