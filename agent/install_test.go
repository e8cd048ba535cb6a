package agent

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	sigyaml "sigs.k8s.io/yaml"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"

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
	if ha["replicas"] != float64(3) || ha["enabled"] != true || raft["enabled"] != true || raft["setNodeId"] != true {
		t.Fatalf("ha %v", ha)
	}
	conf := raft["config"].(string)
	for _, want := range []string{`storage "raft"`, `path = "/vault/data"`, "performance_multiplier = 1", `leader_api_addr = "http://vault-0.vault-internal:8200"`, `leader_api_addr = "http://vault-2.vault-internal:8200"`, "tls_disable = 1"} {
		if !strings.Contains(conf, want) {
			t.Errorf("raft config lacks %q:\n%s", want, conf)
		}
	}
	pod := s["statefulSet"].(map[string]any)["securityContext"].(map[string]any)["pod"].(map[string]any)
	if pod["runAsUser"] != float64(100) || pod["fsGroup"] != float64(1000) || s["uid"] != float64(100) || s["gid"] != float64(1000) {
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

// The agent's values rendered by the real hashicorp/vault chart, for 1, 3 and 5 nodes:
// the StatefulSet has one replica per node (a Go int once made it 3 whatever the nodes),
// the pod runs as vault.uid/gid, the claim uses the agent's StorageClass, and the Raft
// config has performance_multiplier 1 and one retry_join per pod.
func TestRealChartRendersTheEnforcedValues(t *testing.T) {
	for _, version := range []string{"0.33.0", "0.34.1"} {
		ch, err := k8s.LoadChart(k8s.ChartSource{Path: lab.Chart(version)})
		if err != nil {
			t.Fatal(err)
		}
		for _, nodes := range []int{1, 3, 5} {
			t.Run(fmt.Sprintf("%s/%d", version, nodes), func(t *testing.T) {
				cfg := cfgWithNodes(nodes)
				cfg.Vault.UID, cfg.Vault.GID = 100, 1000
				enforced, err := EnforcedValues(cfg, nil, nodes)
				if err != nil {
					t.Fatal(err)
				}
				values, err := k8s.MergeValues(nil, enforced)
				if err != nil {
					t.Fatal(err)
				}
				manifest, err := k8s.Render(ch, "vault", "vault", values)
				if err != nil {
					t.Fatal(err)
				}
				var sts appsv1.StatefulSet
				var config string
				for _, doc := range strings.Split(manifest, "\n---") {
					switch {
					case strings.Contains(doc, "kind: StatefulSet"):
						if err := sigyaml.Unmarshal([]byte(doc), &sts); err != nil {
							t.Fatal(err)
						}
					case strings.Contains(doc, "kind: ConfigMap") && strings.Contains(doc, "name: vault-config"):
						config = doc
					}
				}
				if sts.Spec.Replicas == nil || int(*sts.Spec.Replicas) != nodes {
					t.Fatalf("replicas %v, want %d", sts.Spec.Replicas, nodes)
				}
				sc := sts.Spec.Template.Spec.SecurityContext
				if sc == nil || *sc.RunAsUser != 100 || *sc.RunAsGroup != 1000 || *sc.FSGroup != 1000 {
					t.Fatalf("pod securityContext %+v", sc)
				}
				if len(sts.Spec.VolumeClaimTemplates) != 1 || *sts.Spec.VolumeClaimTemplates[0].Spec.StorageClassName != k8s.StorageClassName("vault", "vault") {
					t.Fatalf("claims %+v", sts.Spec.VolumeClaimTemplates)
				}
				if sts.Spec.UpdateStrategy.Type != appsv1.OnDeleteStatefulSetStrategyType {
					t.Fatalf("update strategy %s", sts.Spec.UpdateStrategy.Type)
				}
				if got := strings.Count(config, "retry_join"); (nodes == 1 && got != 0) || (nodes > 1 && got != nodes) {
					t.Fatalf("%d retry_join blocks for %d nodes:\n%s", got, nodes, config)
				}
				if !strings.Contains(config, "performance_multiplier = 1") {
					t.Fatalf("no performance_multiplier in the rendered config:\n%s", config)
				}
				if sts.Spec.Template.Annotations["pva.io/config-sha256"] == "" {
					t.Fatal("the pod template carries no config checksum: a config change would restart nothing")
				}
			})
		}
	}
}
