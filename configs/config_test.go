package configs

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

const minimal = `
nodes:
  - name: w1
    address: 10.0.0.21
ssh:
  identity:
    file: /etc/pve-vault-agent/id_ed25519
`

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func problemPaths(t *testing.T, err error) []string {
	t.Helper()
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("error %v is not a *ValidationError", err)
	}
	if !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("error does not match ErrInvalidConfig")
	}
	var out []string
	for _, p := range ve.Problems {
		out = append(out, p.Path)
	}
	sort.Strings(out)
	return out
}

func TestLoadMinimalAppliesDefaults(t *testing.T) {
	cfg, err := Load(writeConfig(t, minimal))
	if err != nil {
		t.Fatal(err)
	}
	d := Defaults()
	if cfg.Vault.UID != 100 || cfg.Vault.GID != 100 || cfg.Vault.DataMode != 0o700 || cfg.Vault.Shares != 5 || cfg.Vault.Threshold != 3 {
		t.Fatalf("vault defaults not applied: %+v", cfg.Vault)
	}
	if cfg.SSH != (SSH{User: "root", Port: 22, Identity: SecretRef{File: "/etc/pve-vault-agent/id_ed25519"}, KnownHosts: d.SSH.KnownHosts,
		Sudo: "auto", ConnectTimeout: d.SSH.ConnectTimeout, CommandTimeout: d.SSH.CommandTimeout, KeepaliveInterval: d.SSH.KeepaliveInterval}) {
		t.Fatalf("ssh: %+v", cfg.SSH)
	}
	if got := cfg.NodeHostPath(cfg.Nodes[0]); got != "/srv/vault" {
		t.Fatalf("node host path %q", got)
	}
}

func TestLoadExampleIsValid(t *testing.T) {
	if _, err := Load("config.example.yaml"); err != nil {
		t.Fatal(err)
	}
}

// Every key of the schema appears in the example, so the example documents all of them.
func TestExampleDocumentsEveryKey(t *testing.T) {
	tt := t
	b, err := os.ReadFile("config.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var raw map[string]any
	if err := yaml.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	var missing []string
	var walk func(t reflect.Type, m map[string]any, prefix string)
	walk = func(t reflect.Type, m map[string]any, prefix string) {
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			key := f.Tag.Get("mapstructure")
			v, ok := m[key]
			if !ok {
				missing = append(missing, prefix+key)
				continue
			}
			switch {
			case f.Type == reflect.TypeOf(SecretRef{}):
				// a leaf: one of file or credential is shown
			case f.Type.Kind() == reflect.Struct:
				sub, _ := v.(map[string]any)
				walk(f.Type, sub, prefix+key+".")
			case f.Type.Kind() == reflect.Slice && f.Type.Elem().Kind() == reflect.Struct:
				items, _ := v.([]any)
				if len(items) == 0 {
					// An empty list documents its entries in comments: "#   - {key: …}".
					items = commentedItems(tt, b)
				}
				seen := map[string]any{}
				for _, it := range items {
					for k, x := range it.(map[string]any) {
						seen[k] = x
					}
				}
				walk(f.Type.Elem(), seen, prefix+key+"[].")
			}
		}
	}
	walk(reflect.TypeOf(Config{}), raw, "")
	if len(missing) > 0 {
		t.Fatalf("config.example.yaml does not document: %s", strings.Join(missing, ", "))
	}
}

// commentedItems parses the commented-out flow mappings ("# - {name: pve1, …}") of the
// example, which show the entries of a list that is empty by default.
func commentedItems(t *testing.T, example []byte) []any {
	var out []any
	for _, l := range strings.Split(string(example), "\n") {
		l = strings.TrimSpace(l)
		if !strings.HasPrefix(l, "#") {
			continue
		}
		l = strings.TrimSpace(strings.TrimPrefix(l, "#"))
		if !strings.HasPrefix(l, "- {") {
			continue
		}
		var m map[string]any
		if err := yaml.Unmarshal([]byte(strings.TrimPrefix(l, "- ")), &m); err != nil {
			t.Fatalf("commented entry %q: %v", l, err)
		}
		out = append(out, m)
	}
	return out
}

func TestLoadReportsEveryProblemWithItsPath(t *testing.T) {
	for _, tc := range []struct {
		name string
		body string
		want []string
	}{
		{"three mistakes", `
nodes:
  - name: w1
    adress: 10.0.0.1
ssh:
  port: 70000
  identity: {file: /k}
vault:
  threshold: 9
`, []string{"nodes[0].adress", "ssh.port", "vault.threshold"}},
		{"no nodes, no identity", `vault: {shares: 1, threshold: 1}`, []string{"nodes", "ssh.identity"}},
		{"node located twice and duplicated", `
ssh: {identity: {file: /k}}
nodes:
  - name: w1
    address: 10.0.0.21
  - name: w1
    address: 10.0.0.22
    vmid: 201
    host_path: /srv/../etc
proxmox:
  url: https://pve:8006/api2/json
  token_id: agent@pve!x
  token_secret: {file: /etc/pve-vault-agent/pve-token}
`, []string{"nodes[1]", "nodes[1].host_path", "nodes[1].name"}},
		{"proxmox needed", `
nodes: [{name: w1, vm_name: worker-1}]
ssh: {identity: {credential: ssh-key}}
`, []string{"proxmox.url"}},
		{"bad proxmox section", minimal + `
proxmox:
  url: http://pve:8006
  token_id: root
  token_secret: {file: relative/path}
  prefer_cidr: 10.0.0.0/33
`, []string{"proxmox.prefer_cidr", "proxmox.token_id", "proxmox.token_secret.file", "proxmox.url"}},
		{"modes and schedules", minimal + `
vault:
  data_mode: "0755"
  seal: gpg
  pod_access: static
snapshots:
  schedule: "every day"
  retention: {keep_last: 0}
chart:
  version: "^0.31"
  release: Vault_Prod
metrics:
  listen: "nope"
`, []string{"chart.release", "chart.version", "metrics.listen", "snapshots.retention.keep_last", "snapshots.schedule", "vault.addresses", "vault.data_mode", "vault.seal"}},
		{"unquoted mode", minimal + "vault: {data_mode: 0700}\n", []string{"vault.data_mode"}},
		{"cluster", minimal + `
proxmox: {node: pve9}
cluster:
  hosts:
    - {name: pve1, address: 10.0.0.1}
    - {name: pve1, address: "", port: 70000, keyfile: rel/unseal.cred}
    - {name: "pve_2", address: 10.0.0.2}
  lease: Agents
  lease_duration: 5s
  renew_deadline: 10s
`, []string{"cluster.hosts", "cluster.hosts[1].address", "cluster.hosts[1].keyfile", "cluster.hosts[1].name", "cluster.hosts[1].port", "cluster.hosts[2].name", "cluster.lease", "cluster.lease_duration"}},
		{"inline secret", minimal + "proxmox: {url: 'https://pve:8006/api2/json', token_id: 'a@pve!b', token_secret: 'deadbeef-secret'}\n", []string{"proxmox.token_secret"}},
		{"typo in section", minimal + "snapshot: {dir: /x}\n", []string{"snapshot"}},
		// viper drops a key whose value is empty: the typo must still be reported.
		{"empty unknown sections", minimal + "proxmoxx:\nmetricz: {}\n", []string{"metricz", "proxmoxx"}},
		{"plain http and a remote metrics listener", minimal + `
vault:
  pod_access: static
  addresses: ["http://10.0.0.21:8200", "https://10.0.0.22:8200/v1"]
metrics: {listen: ":9465"}
`, []string{"metrics.listen", "vault.addresses[0]", "vault.addresses[1]"}},
		{"storage ids as Proxmox takes them", minimal + "snapshots: {proxmox_storage: 1disk}\nproxmox: {url: 'https://pve:8006/api2/json', token_id: 'a@pve!b', token_secret: {file: /t}}\n", []string{"snapshots.proxmox_storage"}},
		{"kubeconfig as a plain path", minimal + "kubernetes: {kubeconfig: /etc/pve-vault-agent/kubeconfig}\n", []string{"kubernetes.kubeconfig"}},
		{"chart name and digest", minimal + "chart: {name: ../../etc, digest: md5:abc}\n", []string{"chart.digest", "chart.name"}},
		{"token period", minimal + "vault: {token_period: 1s}\n", []string{"vault.token_period"}},
		// A prefix proves nothing: a recipient is parsed as age parses it.
		{"recovery recipient", minimal + "vault: {recovery_recipient: age1bad}\nsnapshots: {drill_deadline: 1s}\n", []string{"snapshots.drill_deadline", "vault.recovery_recipient"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(writeConfig(t, tc.body))
			if err == nil {
				t.Fatal("loaded without error")
			}
			got := problemPaths(t, err)
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("problem paths %q, want %q\n%v", got, tc.want, err)
			}
			if strings.Contains(err.Error(), "deadbeef-secret") {
				t.Fatalf("error echoes the inline secret: %v", err)
			}
		})
	}
}

func TestAcceptedEdgeValues(t *testing.T) {
	for name, body := range map[string]string{
		"storage id with underscore": "snapshots: {proxmox_storage: nfs_backup}",
		"storage id with a dot":      "snapshots: {proxmox_storage: nas.vault}",
		"http allowed on purpose":    "vault: {pod_access: static, addresses: ['http://10.0.0.21:8200'], allow_http: true}",
		"remote metrics on purpose":  "metrics: {listen: '0.0.0.0:9465', allow_remote: true}",
		"cron names":                 "snapshots: {schedule: '0 3 * * MON-FRI'}",
		"no schedule":                "snapshots: {schedule: ''}",
	} {
		t.Run(name, func(t *testing.T) {
			extra := "\n" + body + "\n"
			if strings.Contains(body, "proxmox_storage") {
				extra += "proxmox: {url: 'https://pve:8006/api2/json', token_id: 'a@pve!b', token_secret: {file: /t}}\n"
			}
			if _, err := Load(writeConfig(t, minimal+extra)); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestUnknownKeySuggestsTheKnownOne(t *testing.T) {
	_, err := Load(writeConfig(t, minimal+"vault: {treshold: 3}\n"))
	if err == nil || !strings.Contains(err.Error(), `vault.treshold: unknown key (did you mean "threshold"?)`) {
		t.Fatalf("got %v", err)
	}
}

func TestEnvironmentOverrides(t *testing.T) {
	t.Setenv("PVA_SSH_PORT", "2222")
	t.Setenv("PVA_VAULT_SHARES", "7")
	t.Setenv("PVA_SNAPSHOTS_RETENTION_DAILY", "14")
	t.Setenv("PVA_SSH_IDENTITY_FILE", "/run/key")
	cfg, err := Load(writeConfig(t, minimal))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.SSH.Port != 2222 || cfg.Vault.Shares != 7 || cfg.Snapshots.Retention.Daily != 14 || cfg.SSH.Identity.File != "/run/key" {
		t.Fatalf("overrides not applied: port %d shares %d daily %d identity %v", cfg.SSH.Port, cfg.Vault.Shares, cfg.Snapshots.Retention.Daily, cfg.SSH.Identity)
	}
	t.Setenv("PVA_SSH_PORT", "twenty-two")
	_, err = Load(writeConfig(t, minimal))
	if got := problemPaths(t, err); !reflect.DeepEqual(got, []string{"ssh.port"}) {
		t.Fatalf("paths %q: %v", got, err)
	}
}

func TestMissingFileSaysHowToFix(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "absent.yaml"))
	if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "config.example.yaml") {
		t.Fatalf("got %v", err)
	}
	_, err = Load(writeConfig(t, "nodes: [\n"))
	if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "not valid YAML") {
		t.Fatalf("got %v", err)
	}
}

func TestViewShowsReferencesOnly(t *testing.T) {
	cfg, err := Load("config.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	v := cfg.View()
	px := v["proxmox"].(map[string]any)
	if !reflect.DeepEqual(px["token_secret"], map[string]any{"credential": "pve-token"}) {
		t.Fatalf("token_secret view %v", px["token_secret"])
	}
	if v["vault"].(map[string]any)["data_mode"] != "0700" || v["ssh"].(map[string]any)["connect_timeout"] != "10s" {
		t.Fatalf("vault/ssh view %v %v", v["vault"], v["ssh"])
	}
}
