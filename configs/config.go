// Package configs owns the agent's configuration: the typed schema, its defaults,
// loading from a YAML file with PVA_ environment overrides (viper), and validation.
//
// Invariants:
//   - Unknown keys are errors, reported with their full key path and a "did you mean" hint,
//     so a typo never silently falls back to a default; the file is read as written, so a
//     misspelt empty section ("proxmoxx:") is caught too.
//   - Validation reports every problem at once (a *ValidationError of *FieldError), each
//     with its key path and a hint; callers map that to exit code 78 (EX_CONFIG).
//   - Schedules are parsed by the one parser the daemon and status use (ParseSchedule).
//   - Secrets never sit in the configuration: a secret is a SecretRef naming a file or a
//     systemd credential, read without following symlinks and checked on the open
//     descriptor (owner root, mode ≤ 0600). An inline value is rejected without being echoed.
//   - The Vault container's uid/gid live in exactly one place (vault.uid, vault.gid): the
//     hostPath is provisioned with them and the chart is installed with them.
package configs

import (
	"strings"
	"time"
)

// DefaultPath is where the systemd unit and the verbs look for the configuration.
const DefaultPath = "/etc/pve-vault-agent/config.yaml"

// EnvPrefix prefixes environment overrides: vault.shares is PVA_VAULT_SHARES.
const EnvPrefix = "PVA"

// Config is the whole configuration. Field tags name the YAML keys.
type Config struct {
	Proxmox    Proxmox    `mapstructure:"proxmox" json:"proxmox"`
	Nodes      []Node     `mapstructure:"nodes" json:"nodes"`
	SSH        SSH        `mapstructure:"ssh" json:"ssh"`
	Kubernetes Kubernetes `mapstructure:"kubernetes" json:"kubernetes"`
	Chart      Chart      `mapstructure:"chart" json:"chart"`
	Install    Install    `mapstructure:"install" json:"install"`
	Vault      Vault      `mapstructure:"vault" json:"vault"`
	Snapshots  Snapshots  `mapstructure:"snapshots" json:"snapshots"`
	Metrics    Metrics    `mapstructure:"metrics" json:"metrics"`
	Cluster    Cluster    `mapstructure:"cluster" json:"cluster"`
	Notify     Notify     `mapstructure:"notify" json:"notify"`
	// CredentialsDir holds the encrypted credentials ({credential: NAME} is NAME.cred
	// there, made with systemd-creds encrypt --name=NAME): the unit loads them with
	// LoadCredentialEncrypted=, and a verb run by hand decrypts them itself.
	CredentialsDir string `mapstructure:"credentials_dir" json:"credentials_dir"`
}

// Proxmox is the Proxmox VE API used to resolve node VMs and storage IDs.
// Empty URL means the API is not used (every node has a static address).
type Proxmox struct {
	// URL of the API, e.g. https://pve.example.lan:8006/api2/json.
	URL string `mapstructure:"url" json:"url"`
	// TokenID is the API token id, user@realm!tokenname.
	TokenID string `mapstructure:"token_id" json:"token_id"`
	// TokenSecret names where the token's secret UUID is read from.
	TokenSecret SecretRef `mapstructure:"token_secret" json:"token_secret"`
	// CAFile verifies the API's TLS certificate (e.g. /etc/pve/pve-root-ca.pem).
	CAFile string `mapstructure:"ca_file" json:"ca_file"`
	// InsecureSkipVerify disables TLS verification; prints a warning on every use.
	InsecureSkipVerify bool `mapstructure:"insecure_skip_verify" json:"insecure_skip_verify"`
	// PreferCIDR picks the guest-agent address inside this network when a VM has several.
	PreferCIDR string `mapstructure:"prefer_cidr" json:"prefer_cidr"`
	// Node is the name of the PVE node the agent runs on (for the snapshot storage's
	// status); empty means this host's short hostname, which is what Proxmox names it.
	Node string `mapstructure:"node" json:"node"`
	// Timeout bounds each API request.
	Timeout time.Duration `mapstructure:"timeout" json:"timeout"`
}

// Node is one Kubernetes node VM that carries a Vault pod and its hostPath.
// Exactly one of Address, VMID and VMName locates it.
type Node struct {
	// Name is the Kubernetes node name (used for PV node affinity).
	Name string `mapstructure:"name" json:"name"`
	// Address is a static host name or IP for SSH.
	Address string `mapstructure:"address" json:"address,omitempty"`
	// VMID is the Proxmox VM id; the address comes from the QEMU guest agent.
	VMID int `mapstructure:"vmid" json:"vmid,omitempty"`
	// VMName is the Proxmox VM name; resolved to a VMID through cluster resources.
	VMName string `mapstructure:"vm_name" json:"vm_name,omitempty"`
	// HostPath is the Vault data directory on the node; empty means vault.host_path.
	HostPath string `mapstructure:"host_path" json:"host_path,omitempty"`
}

// SSH is how the agent reaches node VMs.
type SSH struct {
	User     string    `mapstructure:"user" json:"user"`
	Port     int       `mapstructure:"port" json:"port"`
	Identity SecretRef `mapstructure:"identity" json:"identity"`
	// KnownHosts is verified with x/crypto/ssh/knownhosts; unknown hosts are refused
	// unless the verb is given --accept-new-host-key.
	KnownHosts string `mapstructure:"known_hosts" json:"known_hosts"`
	// Sudo: "auto" (sudo -n when user is not root), "always" or "never".
	Sudo           string        `mapstructure:"sudo" json:"sudo"`
	ConnectTimeout time.Duration `mapstructure:"connect_timeout" json:"connect_timeout"`
	CommandTimeout time.Duration `mapstructure:"command_timeout" json:"command_timeout"`
	// KeepaliveInterval: every SSH connection (nodes, SFTP targets) is closed after three
	// keepalives go unanswered.
	KeepaliveInterval time.Duration `mapstructure:"keepalive_interval" json:"keepalive_interval"`
}

// Kubernetes is the cluster Vault runs in.
type Kubernetes struct {
	// Kubeconfig is what the daemon and every verb use: the kubeconfig of the agent's
	// operate account (`pve-vault-agent rbac`), or an admin's. A secret like the others
	// (a 0600 file owned by root, or a credential).
	Kubeconfig SecretRef `mapstructure:"kubeconfig" json:"kubeconfig"`
	// InstallKubeconfig is what install, upgrade, recover and restore use to change the
	// release: the install account's kubeconfig. Unset: Kubeconfig.
	InstallKubeconfig SecretRef `mapstructure:"install_kubeconfig" json:"install_kubeconfig"`
	Context           string    `mapstructure:"context" json:"context"`
}

// Chart is the Vault Helm chart and release.
type Chart struct {
	// Repository is an https chart repository or an oci:// registry path.
	Repository string `mapstructure:"repository" json:"repository"`
	Name       string `mapstructure:"name" json:"name"`
	// Version pins the chart version exactly (no ranges).
	Version string `mapstructure:"version" json:"version"`
	// Path is a local chart directory or .tgz; when set, repository/name/version are ignored.
	Path string `mapstructure:"path" json:"path"`
	// Digest pins the chart archive ("sha256:<hex>"): a download or cached copy that
	// does not match is refused.
	Digest      string        `mapstructure:"digest" json:"digest"`
	Release     string        `mapstructure:"release" json:"release"`
	Namespace   string        `mapstructure:"namespace" json:"namespace"`
	ValuesFiles []string      `mapstructure:"values_files" json:"values_files"`
	CacheDir    string        `mapstructure:"cache_dir" json:"cache_dir"`
	Timeout     time.Duration `mapstructure:"timeout" json:"timeout"`
}

// Who changes the Helm release.
const (
	ManagedByAgent    = "agent"    // install, upgrade and recover run Helm
	ManagedByFlux     = "flux"     // a Flux HelmRelease installs and upgrades it from git
	ManagedByArgoCD   = "argocd"   // an Argo CD Application applies it from git
	ManagedByExternal = "external" // something else (helm by hand, a pipeline)
)

// Install says who owns the Helm release. With anything but agent the agent never runs
// Helm: it provisions, unseals, backs up, drills and recovers around the release that
// git (Flux, Argo CD) or the operator keeps, and `render` prints what to commit.
type Install struct {
	// ManagedBy: agent, flux, argocd or external.
	ManagedBy string `mapstructure:"managed_by" json:"managed_by"`
	// HelmRelease is the Flux HelmRelease, "namespace/name": what `render --flux`
	// writes and what recover and restore suspend while they work. Empty:
	// chart.namespace/chart.release.
	HelmRelease string `mapstructure:"helmrelease" json:"helmrelease"`
}

// FluxHelmRelease is the HelmRelease's namespace and name.
func (c *Config) FluxHelmRelease() (namespace, name string) {
	if ns, n, ok := strings.Cut(c.Install.HelmRelease, "/"); ok {
		return ns, n
	}
	return c.Chart.Namespace, c.Chart.Release
}

// Vault is how the agent talks to Vault and keeps its keys.
type Vault struct {
	// UID and GID the Vault container runs as: the hostPath owner and the chart's
	// securityContext both come from here.
	UID int `mapstructure:"uid" json:"uid"`
	GID int `mapstructure:"gid" json:"gid"`
	// HostPath is the default data directory on every node.
	HostPath string `mapstructure:"host_path" json:"host_path"`
	// DataMode is the hostPath's mode, a quoted octal string.
	DataMode Mode `mapstructure:"data_mode" json:"data_mode"`
	// PodAccess: "ssh-tunnel" (pod IP through SSH to its node) or "static" (Addresses).
	PodAccess string   `mapstructure:"pod_access" json:"pod_access"`
	Addresses []string `mapstructure:"addresses" json:"addresses"`
	Port      int      `mapstructure:"port" json:"port"`
	// TLSCAFile: when set, the listener speaks TLS and is verified against this CA.
	TLSCAFile string `mapstructure:"tls_ca_file" json:"tls_ca_file"`
	// AllowHTTP accepts http:// static addresses (the shares then cross the network in
	// clear text); without it they are refused.
	AllowHTTP bool `mapstructure:"allow_http" json:"allow_http"`
	Shares    int  `mapstructure:"shares" json:"shares"`
	Threshold int  `mapstructure:"threshold" json:"threshold"`
	// Keyfile is the sealed file holding the unseal shares.
	Keyfile string `mapstructure:"keyfile" json:"keyfile"`
	// Seal: "systemd-creds" or "age".
	Seal string `mapstructure:"seal" json:"seal"`
	// SystemdCredsKey is systemd-creds --with-key: auto, host, tpm2 or host+tpm2.
	SystemdCredsKey string `mapstructure:"systemd_creds_key" json:"systemd_creds_key"`
	// AgeIdentity decrypts an age-sealed keyfile (seal: age).
	AgeIdentity SecretRef `mapstructure:"age_identity" json:"age_identity"`
	// RecoveryRecipient (age1…) receives an offline copy of the keyfile at init.
	RecoveryRecipient string `mapstructure:"recovery_recipient" json:"recovery_recipient"`
	// TokenPeriod is the period of the agent's tokens; the daemon renews them at a third
	// of it. Values under an hour are a test knob (the lab's compressed-time soak).
	TokenPeriod time.Duration `mapstructure:"token_period" json:"token_period"`
}

// Snapshots is where and when Raft snapshots are stored.
type Snapshots struct {
	// Dir on the Proxmox host; or ProxmoxStorage, a storage ID resolved through the API.
	Dir            string `mapstructure:"dir" json:"dir"`
	ProxmoxStorage string `mapstructure:"proxmox_storage" json:"proxmox_storage"`
	// Schedule is an interval ("6h"), a five-field cron expression ("0 3 * * *", local
	// time unless prefixed CRON_TZ=Zone), or a descriptor (@daily, @hourly, @every 6h),
	// as Kubernetes CronJobs take them. Empty: no schedule (a timer runs backup-now).
	Schedule string `mapstructure:"schedule" json:"schedule"`
	// DrillSchedule is when the daemon restores the newest snapshot into a throwaway
	// Vault pod to prove it opens (same forms as Schedule); "" for none.
	DrillSchedule string `mapstructure:"drill_schedule" json:"drill_schedule"`
	// DrillDeadline is the drill pod's activeDeadlineSeconds: the kubelet stops the
	// unsealed copy after this long even when the agent that started it died.
	DrillDeadline time.Duration `mapstructure:"drill_deadline" json:"drill_deadline"`
	// IdleTimeout abandons a snapshot or restore stream that moves no byte for this long
	// (there is no total timeout: a large snapshot takes what it takes).
	IdleTimeout time.Duration `mapstructure:"idle_timeout" json:"idle_timeout"`
	Retention   Retention     `mapstructure:"retention" json:"retention"`
	// Targets are off-host copies: every verified snapshot is encrypted to
	// vault.recovery_recipient and pushed to each after the local backup.
	Targets []Target `mapstructure:"targets" json:"targets"`
}

// Target is an off-host store for encrypted snapshot copies.
type Target struct {
	// Name identifies the target in commands (--target), status and metrics.
	Name string `mapstructure:"name" json:"name"`
	// Type is dir (a mounted NAS share or disk), sftp or s3.
	Type string `mapstructure:"type" json:"type"`
	// Path is the directory (dir: on this host; sftp: on the server, inside its chroot).
	Path string `mapstructure:"path" json:"path,omitempty"`
	// Address is the SFTP server, host or host:port; User the account there.
	Address string `mapstructure:"address" json:"address,omitempty"`
	User    string `mapstructure:"user" json:"user,omitempty"`
	// Identity is the SSH key for SFTP (default: ssh.identity); the server's host key
	// must be in KnownHosts (default: ssh.known_hosts).
	Identity   SecretRef `mapstructure:"identity" json:"identity"`
	KnownHosts string    `mapstructure:"known_hosts" json:"known_hosts,omitempty"`
	// Endpoint (host:port), Bucket and Prefix locate the S3 objects; Region is the
	// bucket's (us-east-1 when empty).
	Endpoint  string    `mapstructure:"endpoint" json:"endpoint,omitempty"`
	Bucket    string    `mapstructure:"bucket" json:"bucket,omitempty"`
	Prefix    string    `mapstructure:"prefix" json:"prefix,omitempty"`
	Region    string    `mapstructure:"region" json:"region,omitempty"`
	AccessKey SecretRef `mapstructure:"access_key" json:"access_key"`
	SecretKey SecretRef `mapstructure:"secret_key" json:"secret_key"`
	// CAFile verifies the S3 endpoint's certificate; AllowHTTP speaks plain HTTP to it
	// (the objects are encrypted, the request signatures are not secret, but the
	// access key id is visible).
	CAFile    string `mapstructure:"ca_file" json:"ca_file,omitempty"`
	AllowHTTP bool   `mapstructure:"allow_http" json:"allow_http,omitempty"`
	// Retention for the copies on this target (the newest is always kept).
	Retention Retention `mapstructure:"retention" json:"retention"`
}

// Retention keeps the last N snapshots plus the newest in each period tier.
type Retention struct {
	KeepLast int `mapstructure:"keep_last" json:"keep_last"`
	Hourly   int `mapstructure:"hourly" json:"hourly"`
	Daily    int `mapstructure:"daily" json:"daily"`
	Weekly   int `mapstructure:"weekly" json:"weekly"`
	Monthly  int `mapstructure:"monthly" json:"monthly"`
}

// Metrics is the Prometheus endpoint of the daemon; empty Listen disables it.
type Metrics struct {
	Listen string `mapstructure:"listen" json:"listen"`
	// AllowRemote accepts a listen address other than loopback.
	AllowRemote bool `mapstructure:"allow_remote" json:"allow_remote"`
}

// Cluster is a Proxmox cluster with an agent on several of its hosts, all keeping the
// same Vault: every agent unseals; one, holding a Kubernetes Lease, takes the backups,
// pushes them off-host, prunes, drills and renews the tokens.
type Cluster struct {
	// Hosts are the PVE nodes that run an agent (this one included, by its proxmox.node
	// name). Empty: one agent, which always leads.
	Hosts []ClusterHost `mapstructure:"hosts" json:"hosts"`
	// Lease is the coordination.k8s.io Lease in chart.namespace the agents elect a
	// leader with.
	Lease string `mapstructure:"lease" json:"lease"`
	// LeaseDuration is how long a leader that stopped renewing is waited for before
	// another agent takes over; RenewDeadline how long the leader keeps trying to
	// renew before it stops leading; RetryPeriod how often every agent tries.
	LeaseDuration time.Duration `mapstructure:"lease_duration" json:"lease_duration"`
	RenewDeadline time.Duration `mapstructure:"renew_deadline" json:"renew_deadline"`
	RetryPeriod   time.Duration `mapstructure:"retry_period" json:"retry_period"`
}

// ClusterHost is one PVE node that runs an agent.
type ClusterHost struct {
	// Name is the PVE node name (its agent's proxmox.node).
	Name string `mapstructure:"name" json:"name"`
	// Address is where `keyfile enroll` and `status` reach it over SSH (ssh.user,
	// ssh.port, ssh.identity and ssh.known_hosts apply).
	Address string `mapstructure:"address" json:"address"`
	// Port overrides ssh.port for this host.
	Port int `mapstructure:"port" json:"port,omitempty"`
	// Keyfile is the keyfile's path on that host; empty: vault.keyfile.
	Keyfile string `mapstructure:"keyfile" json:"keyfile,omitempty"`
}

// Enabled reports whether several agents share the Vault.
func (c Cluster) Enabled() bool { return len(c.Hosts) > 0 }

// Notify is who the daemon tells when something fails and when it works again.
type Notify struct {
	Targets []NotifyTarget `mapstructure:"targets" json:"targets"`
	// Timeout bounds one delivery to one target (connect, TLS, the whole exchange).
	Timeout time.Duration `mapstructure:"timeout" json:"timeout"`
	// Reminder repeats a failure that lasts this long since it was last told (0: never).
	Reminder time.Duration `mapstructure:"reminder" json:"reminder"`
	// MaxPerHour caps the messages per target and hour; the ones over it are dropped,
	// logged and counted, and the next one that goes out says how many were.
	MaxPerHour int `mapstructure:"max_per_hour" json:"max_per_hour"`
	// SealedAfter: a pod sealed this long is reported (the agent could not unseal it).
	SealedAfter time.Duration `mapstructure:"sealed_after" json:"sealed_after"`
	// TokenTTLBelow: an agent token with less than this left after its renewal is
	// reported.
	TokenTTLBelow time.Duration `mapstructure:"token_ttl_below" json:"token_ttl_below"`
}

// NotifyTarget is one place messages go to.
type NotifyTarget struct {
	Name string `mapstructure:"name" json:"name"`
	// Type: smtp, webhook, or shoutrrr (ntfy, Gotify, Discord, Telegram, Matrix, … by URL).
	Type string `mapstructure:"type" json:"type"`
	// smtp: Host and Port of the server; TLS is starttls (required), implicit (port
	// 465) or none (only to a loopback relay); Username and Password log in (Password a
	// secret); From and To the envelope and headers.
	Host     string    `mapstructure:"host" json:"host,omitempty"`
	Port     int       `mapstructure:"port" json:"port,omitempty"`
	TLS      string    `mapstructure:"tls" json:"tls,omitempty"`
	Username string    `mapstructure:"username" json:"username,omitempty"`
	Password SecretRef `mapstructure:"password" json:"password,omitzero"`
	From     string    `mapstructure:"from" json:"from,omitempty"`
	To       []string  `mapstructure:"to" json:"to,omitempty"`
	// webhook: URL receives a JSON POST, signed with HMACKey (X-PVA-Signature:
	// sha256=<hex of HMAC-SHA256 over the timestamp header, ".", and the body>).
	URL     string    `mapstructure:"url" json:"url,omitempty"`
	HMACKey SecretRef `mapstructure:"hmac_key" json:"hmac_key,omitzero"`
	// CAFile verifies the server's certificate (smtp, webhook) instead of the system's CAs.
	CAFile string `mapstructure:"ca_file" json:"ca_file,omitempty"`
	// ServiceURL is a shoutrrr URL (ntfy://…, gotify://…, discord://…, telegram://…,
	// matrix://…): a secret, since it carries the service's token.
	ServiceURL SecretRef `mapstructure:"service_url" json:"service_url,omitzero"`
}

// Defaults returns the configuration used where the file and environment say nothing.
// The values follow the deployment the product was designed from (uid/gid 100, 5/3 shares).
func Defaults() Config {
	return Config{
		Proxmox: Proxmox{Timeout: 30 * time.Second},
		SSH: SSH{
			User:              "root",
			Port:              22,
			KnownHosts:        "/etc/pve-vault-agent/known_hosts",
			Sudo:              "auto",
			ConnectTimeout:    10 * time.Second,
			CommandTimeout:    60 * time.Second,
			KeepaliveInterval: 15 * time.Second,
		},
		Kubernetes: Kubernetes{Kubeconfig: SecretRef{File: "/etc/pve-vault-agent/kubeconfig"}},
		Chart: Chart{
			Repository: "https://helm.releases.hashicorp.com",
			Name:       "vault",
			Version:    "0.34.1",
			Release:    "vault",
			Namespace:  "vault",
			CacheDir:   "/var/cache/pve-vault-agent/charts",
			Timeout:    5 * time.Minute,
		},
		Install: Install{ManagedBy: ManagedByAgent},
		Vault: Vault{
			UID:             100,
			GID:             100,
			HostPath:        "/srv/vault",
			DataMode:        0o700,
			PodAccess:       "ssh-tunnel",
			Port:            8200,
			Shares:          5,
			Threshold:       3,
			Keyfile:         "/var/lib/pve-vault-agent/unseal.cred",
			Seal:            "systemd-creds",
			SystemdCredsKey: "auto",
			TokenPeriod:     768 * time.Hour,
		},
		Snapshots: Snapshots{
			Dir:           "/var/lib/pve-vault-agent/snapshots",
			Schedule:      "6h",
			IdleTimeout:   2 * time.Minute,
			DrillDeadline: 10 * time.Minute,
			Retention:     Retention{KeepLast: 8, Daily: 7, Weekly: 4, Monthly: 6},
		},
		Metrics:        Metrics{Listen: "127.0.0.1:9465"},
		Notify:         Notify{Timeout: 15 * time.Second, Reminder: 24 * time.Hour, MaxPerHour: 30, SealedAfter: 5 * time.Minute, TokenTTLBelow: 72 * time.Hour},
		Cluster:        Cluster{Lease: "pve-vault-agent", LeaseDuration: 15 * time.Second, RenewDeadline: 10 * time.Second, RetryPeriod: 2 * time.Second},
		CredentialsDir: "/etc/pve-vault-agent/credentials",
	}
}

// NodeHostPath is the data directory of node n: its own host_path or vault.host_path.
func (c *Config) NodeHostPath(n Node) string {
	if n.HostPath != "" {
		return n.HostPath
	}
	return c.Vault.HostPath
}
