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
