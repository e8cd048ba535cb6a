package agent

import (
	"errors"
	"strings"
	"testing"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
)

func cfgWithNodes(n int) *configs.Config {
	c := configs.Defaults()
	for i := 0; i < n; i++ {
		c.Nodes = append(c.Nodes, configs.Node{Name: "w" + string(rune('1'+i)), Address: "192.0.2.1"})
	}
	return &c
}

func server(t *testing.T, v map[string]any) map[string]any {
	t.Helper()
	s, ok := v["server"].(map[string]any)
	if !ok {
		t.Fatalf("no server values: %v", v)
	}
	return s
}

func TestEnforcedValues(t *testing.T) {
	cfg := cfgWithNodes(3)
	cfg.Vault.UID, cfg.Vault.GID = 100, 1000
	v, err := EnforcedValues(cfg, nil, 3)
	if err != nil {
		t.Fatal(err)
	}
	s := server(t, v)
	ha := s["ha"].(map[string]any)
	raft := ha["raft"].(map[string]any)
	if ha["replicas"] != 3 || ha["enabled"] != true || raft["enabled"] != true || raft["setNodeId"] != true {
		t.Fatalf("ha %v", ha)
	}
	conf := raft["config"].(string)
	for _, want := range []string{`storage "raft"`, `path = "/vault/data"`, `leader_api_addr = "http://vault-0.vault-internal:8200"`, `leader_api_addr = "http://vault-2.vault-internal:8200"`, "tls_disable = 1"} {
		if !strings.Contains(conf, want) {
			t.Errorf("raft config lacks %q:\n%s", want, conf)
		}
	}
	pod := s["statefulSet"].(map[string]any)["securityContext"].(map[string]any)["pod"].(map[string]any)
	if pod["runAsUser"] != 100 || pod["fsGroup"] != 1000 || s["uid"] != 100 || s["gid"] != 1000 {
		t.Fatalf("security context %v uid %v gid %v", pod, s["uid"], s["gid"])
	}
	if _, set := s["affinity"]; set {
		t.Fatal("affinity overridden although every replica has a node")
	}
	if sc := s["dataStorage"].(map[string]any)["storageClass"]; sc != "pva-vault-vault" {
		t.Fatalf("storage class %v", sc)
	}

	// Fewer schedulable nodes than replicas: no required anti-affinity.
	v, _ = EnforcedValues(cfg, nil, 1)
	if a, set := server(t, v)["affinity"]; !set || a != "" {
		t.Fatalf("affinity %v %v", a, set)
	}

	// TLS listener: https joins with the CA and server name of each pod.
	tls := []k8s.ValuesFile{{Name: "v.yaml", Values: map[string]any{"global": map[string]any{"tlsDisable": false}}}}
	v, _ = EnforcedValues(cfg, tls, 3)
	conf = server(t, v)["ha"].(map[string]any)["raft"].(map[string]any)["config"].(string)
	if !strings.Contains(conf, `https://vault-1.vault-internal:8200`) || !strings.Contains(conf, `leader_tls_servername = "vault-1.vault-internal"`) || strings.Contains(conf, "tls_disable") {
		t.Fatalf("tls raft config:\n%s", conf)
	}

	// A single node needs no retry_join.
	v, _ = EnforcedValues(cfgWithNodes(1), nil, 1)
	if c := server(t, v)["ha"].(map[string]any)["raft"].(map[string]any)["config"].(string); strings.Contains(c, "retry_join") {
		t.Fatalf("single node config joins: %s", c)
	}
}

func TestEnforcedValuesKeepsAUsableUserRaftConfig(t *testing.T) {
	cfg := cfgWithNodes(3)
	own := []k8s.ValuesFile{{Name: "mine.yaml", Values: map[string]any{"server": map[string]any{"ha": map[string]any{"raft": map[string]any{
		"config": "storage \"raft\" {\n path = \"/vault/data\"\n retry_join { leader_api_addr = \"http://vault-0.vault-internal:8200\" }\n}\n"}}}}}}
	v, err := EnforcedValues(cfg, own, 3)
	if err != nil {
		t.Fatal(err)
	}
	if _, set := server(t, v)["ha"].(map[string]any)["raft"].(map[string]any)["config"]; set {
		t.Fatal("the user's raft config would be overwritten")
	}
	bad := []k8s.ValuesFile{{Name: "mine.yaml", Values: map[string]any{"server": map[string]any{"ha": map[string]any{"raft": map[string]any{
		"config": "storage \"file\" { path = \"/vault/data\" }\n"}}}}}}
	if _, err := EnforcedValues(cfg, bad, 3); !errors.Is(err, ErrChartValues) || !strings.Contains(err.Error(), "mine.yaml") {
		t.Fatalf("file storage accepted: %v", err)
	}
}
