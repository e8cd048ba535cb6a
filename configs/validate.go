package configs

import (
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"filippo.io/age"

	"github.com/pve-vault-agent/pve-vault-agent/provision"
)

var (
	tokenIDRe = regexp.MustCompile(`^[^@!\s]+@[^@!\s]+![A-Za-z][A-Za-z0-9._-]*$`)
	dns1123Re = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	nodeRe    = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$`)
	semverRe  = regexp.MustCompile(`^v?\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$`)
	credRe    = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)
	chartRe   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)
	digestRe  = regexp.MustCompile(`^sha256:[0-9a-fA-F]{64}$`)
	bucketRe  = regexp.MustCompile(`^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$`)
	// storageRe is Proxmox's own rule for storage IDs (pve-storage, PVE::JSONSchema
	// pve-storage-id), case-insensitive.
	storageRe = regexp.MustCompile(`(?i)^[a-z][a-z0-9\-_.]*[a-z0-9]$`)
	// pveNodeRe is a PVE node name: a host name label (PVE::JSONSchema pve-node).
	pveNodeRe = regexp.MustCompile(`^[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?$`)
)

type problems []*FieldError

func (p *problems) add(path, problem, hint string) {
	*p = append(*p, &FieldError{Path: path, Problem: problem, Hint: hint})
}

// validate checks the decoded configuration and returns every problem found.
func (c *Config) validate() []*FieldError {
	var p problems
	c.validateProxmox(&p)
	c.validateNodes(&p)
	c.validateSSH(&p)
	c.validateKubernetes(&p)
	c.validateChart(&p)
	c.validateInstall(&p)
	c.validateVault(&p)
	c.validateSnapshots(&p)
	c.validateCluster(&p)
	c.validateNotify(&p)
	if !filepath.IsAbs(c.CredentialsDir) || filepath.Clean(c.CredentialsDir) != c.CredentialsDir {
		p.add("credentials_dir", fmt.Sprintf("%q is not a clean absolute path", c.CredentialsDir), "the directory of the NAME.cred files, /etc/pve-vault-agent/credentials by default")
	}
	if c.Metrics.Listen != "" {
		host, port, err := net.SplitHostPort(c.Metrics.Listen)
		switch {
		case err != nil || !validPort(port):
			p.add("metrics.listen", fmt.Sprintf("%q is not host:port", c.Metrics.Listen), `e.g. "127.0.0.1:9465", or "" to disable`)
		case !isLoopback(host) && !c.Metrics.AllowRemote:
			p.add("metrics.listen", fmt.Sprintf("%q is reachable from other hosts", c.Metrics.Listen), `bind to loopback ("127.0.0.1:9465"), or set metrics.allow_remote: true to expose it on purpose`)
		}
	}
	return p
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func (c *Config) usesProxmox() bool {
	for _, n := range c.Nodes {
		if n.VMID != 0 || n.VMName != "" {
			return true
		}
	}
	return c.Snapshots.ProxmoxStorage != ""
}

func (c *Config) validateProxmox(p *problems) {
	px := c.Proxmox
	if px.URL == "" {
		if c.usesProxmox() {
			p.add("proxmox.url", "required: a node is given by vmid/vm_name or snapshots.proxmox_storage is set", "e.g. https://pve.example.lan:8006/api2/json")
		}
		return
	}
	u, err := url.Parse(px.URL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		p.add("proxmox.url", fmt.Sprintf("%q is not an https URL", px.URL), "e.g. https://pve.example.lan:8006/api2/json")
	}
	if !tokenIDRe.MatchString(px.TokenID) {
		p.add("proxmox.token_id", fmt.Sprintf("%q is not an API token id", px.TokenID), "write it as user@realm!tokenname, e.g. vault-agent@pve!agent")
	}
	validateSecretRef(p, "proxmox.token_secret", px.TokenSecret, true)
	if px.CAFile != "" && !filepath.IsAbs(px.CAFile) {
		p.add("proxmox.ca_file", "must be an absolute path", "e.g. /etc/pve/pve-root-ca.pem")
	}
	if px.CAFile != "" && px.InsecureSkipVerify {
		p.add("proxmox.insecure_skip_verify", "set together with ca_file", "remove insecure_skip_verify: the CA file already verifies the API")
	}
	if px.PreferCIDR != "" {
		if _, _, err := net.ParseCIDR(px.PreferCIDR); err != nil {
			p.add("proxmox.prefer_cidr", fmt.Sprintf("%q is not a CIDR", px.PreferCIDR), "e.g. 192.168.10.0/24")
		}
	}
	if px.Node != "" && !pveNodeRe.MatchString(px.Node) {
		p.add("proxmox.node", fmt.Sprintf("%q is not a PVE node name", px.Node), "a host name as pvecm nodes lists it, e.g. pve1")
	}
	if px.Timeout <= 0 {
		p.add("proxmox.timeout", "must be positive", `e.g. "30s"`)
	}
}

func (c *Config) validateNodes(p *problems) {
	if len(c.Nodes) == 0 {
		p.add("nodes", "at least one node is required", "list the node VM(s) that carry Vault: name plus address, vmid or vm_name")
		return
	}
	seen := map[string]int{}
	for i, n := range c.Nodes {
		at := fmt.Sprintf("nodes[%d]", i)
		if n.Name == "" {
			p.add(at+".name", "required", "the Kubernetes node name of this VM (kubectl get nodes)")
		} else if !nodeRe.MatchString(n.Name) || len(n.Name) > 253 {
			p.add(at+".name", fmt.Sprintf("%q is not a Kubernetes node name", n.Name), "lower-case letters, digits, '-' and '.'")
		} else if j, dup := seen[n.Name]; dup {
			p.add(at+".name", fmt.Sprintf("%q is already used by nodes[%d]", n.Name, j), "each node appears once")
		} else {
			seen[n.Name] = i
		}
		set := 0
		for _, b := range []bool{n.Address != "", n.VMID != 0, n.VMName != ""} {
			if b {
				set++
			}
		}
		if set != 1 {
			p.add(at, fmt.Sprintf("exactly one of address, vmid and vm_name must be set (found %d)", set), "a static address, or the Proxmox VM by id or name")
		}
		if n.VMID < 0 || (n.VMID != 0 && n.VMID < 100) {
			p.add(at+".vmid", fmt.Sprintf("%d is not a Proxmox VMID", n.VMID), "VMIDs start at 100")
		}
		if n.HostPath != "" {
			if err := provision.CheckHostPath(n.HostPath); err != nil {
				p.add(at+".host_path", err.Error(), "")
			}
		}
	}
}

func (c *Config) validateSSH(p *problems) {
	s := c.SSH
	if s.User == "" {
		p.add("ssh.user", "required", `e.g. "root", or a user with passwordless sudo`)
	}
	if s.Port < 1 || s.Port > 65535 {
		p.add("ssh.port", fmt.Sprintf("%d is not a TCP port", s.Port), "1-65535, usually 22")
	}
	validateSecretRef(p, "ssh.identity", s.Identity, true)
	if !filepath.IsAbs(s.KnownHosts) {
		p.add("ssh.known_hosts", "must be an absolute path", "e.g. /etc/pve-vault-agent/known_hosts")
	}
	switch s.Sudo {
	case "auto", "always", "never":
	default:
		p.add("ssh.sudo", fmt.Sprintf("%q is not one of auto, always, never", s.Sudo), `"auto" uses sudo -n when ssh.user is not root`)
	}
	if s.ConnectTimeout <= 0 {
		p.add("ssh.connect_timeout", "must be positive", `e.g. "10s"`)
	}
	if s.CommandTimeout <= 0 {
		p.add("ssh.command_timeout", "must be positive", `e.g. "60s"`)
	}
	if s.KeepaliveInterval <= 0 {
		p.add("ssh.keepalive_interval", "must be positive", `e.g. "15s"`)
	}
}

func (c *Config) validateKubernetes(p *problems) {
	validateSecretRef(p, "kubernetes.kubeconfig", c.Kubernetes.Kubeconfig, true)
	validateSecretRef(p, "kubernetes.install_kubeconfig", c.Kubernetes.InstallKubeconfig, false)
}

func (c *Config) validateChart(p *problems) {
	ch := c.Chart
	if ch.Path != "" {
		if !filepath.IsAbs(ch.Path) {
			p.add("chart.path", "must be an absolute path", "a chart directory or .tgz archive")
		}
	} else {
		switch {
		case strings.HasPrefix(ch.Repository, "oci://"):
		case strings.HasPrefix(ch.Repository, "https://") || strings.HasPrefix(ch.Repository, "http://"):
			if _, err := url.Parse(ch.Repository); err != nil {
				p.add("chart.repository", "not a URL", "e.g. https://helm.releases.hashicorp.com")
			}
		default:
			p.add("chart.repository", fmt.Sprintf("%q is not an https:// repository or oci:// reference", ch.Repository), "e.g. https://helm.releases.hashicorp.com, or set chart.path for a local chart")
		}
		if !chartRe.MatchString(ch.Name) || strings.Contains(ch.Name, "..") {
			p.add("chart.name", fmt.Sprintf("%q is not a chart name", ch.Name), `the chart's name in the repository, e.g. "vault"`)
		}
		if !semverRe.MatchString(ch.Version) {
			p.add("chart.version", fmt.Sprintf("%q is not an exact version", ch.Version), `pin one release, e.g. "0.34.1"; ranges are not accepted`)
		}
	}
	if ch.Digest != "" && !digestRe.MatchString(ch.Digest) {
		p.add("chart.digest", fmt.Sprintf("%q is not a sha256 digest", ch.Digest), "sha256:<64 hex digits>, e.g. from sha256sum vault-0.34.1.tgz")
	}
	if !dns1123Re.MatchString(ch.Release) || len(ch.Release) > 53 {
		p.add("chart.release", fmt.Sprintf("%q is not a valid release name", ch.Release), "lower-case letters, digits and '-', at most 53 characters")
	}
	if !dns1123Re.MatchString(ch.Namespace) || len(ch.Namespace) > 63 {
		p.add("chart.namespace", fmt.Sprintf("%q is not a valid namespace", ch.Namespace), "lower-case letters, digits and '-', at most 63 characters")
	}
	for i, f := range ch.ValuesFiles {
		if !filepath.IsAbs(f) {
			p.add(fmt.Sprintf("chart.values_files[%d]", i), "must be an absolute path", "e.g. /etc/pve-vault-agent/values.yaml")
		}
	}
	if !filepath.IsAbs(ch.CacheDir) {
		p.add("chart.cache_dir", "must be an absolute path", "e.g. /var/cache/pve-vault-agent/charts")
	}
	if ch.Timeout <= 0 {
		p.add("chart.timeout", "must be positive", `e.g. "5m"`)
	}
}

func (c *Config) validateInstall(p *problems) {
	switch c.Install.ManagedBy {
	case ManagedByAgent, ManagedByFlux, ManagedByArgoCD, ManagedByExternal:
	default:
		p.add("install.managed_by", fmt.Sprintf("%q is not agent, flux, argocd or external", c.Install.ManagedBy), "agent: install and upgrade run Helm; flux or argocd: git owns the release (pve-vault-agent render prints what to commit)")
	}
	if hr := c.Install.HelmRelease; hr != "" {
		ns, name, ok := strings.Cut(hr, "/")
		if !ok || !dns1123Re.MatchString(ns) || !dns1123Re.MatchString(name) {
			p.add("install.helmrelease", fmt.Sprintf("%q is not namespace/name", hr), "the Flux HelmRelease, e.g. flux-system/vault; empty: chart.namespace/chart.release")
		}
	}
}

func (c *Config) validateVault(p *problems) {
	v := c.Vault
	if v.UID < 0 || v.UID > 65535 {
		p.add("vault.uid", fmt.Sprintf("%d is out of range", v.UID), "the chart runs Vault as 100")
	}
	if v.GID < 0 || v.GID > 65535 {
		p.add("vault.gid", fmt.Sprintf("%d is out of range", v.GID), "the chart runs Vault with group 100")
	}
	if err := provision.CheckHostPath(v.HostPath); err != nil {
		p.add("vault.host_path", err.Error(), "")
	}
	if v.DataMode&0o007 != 0 || v.DataMode&0o700 != 0o700 || v.DataMode > 0o777 {
		p.add("vault.data_mode", fmt.Sprintf("%s is not a tight mode for Vault's data", v.DataMode), `the owner needs rwx and others nothing: "0700" (default) or "0750"`)
	}
	switch v.PodAccess {
	case "ssh-tunnel":
	case "static":
		if len(v.Addresses) == 0 {
			p.add("vault.addresses", "required when pod_access is static", "one URL per Vault pod, e.g. http://10.0.0.21:8200")
		}
	default:
		p.add("vault.pod_access", fmt.Sprintf("%q is not ssh-tunnel or static", v.PodAccess), `"ssh-tunnel" reaches each pod through its node`)
	}
	for i, a := range v.Addresses {
		u, err := url.Parse(a)
		switch {
		case err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "":
			p.add(fmt.Sprintf("vault.addresses[%d]", i), fmt.Sprintf("%q is not an http(s) URL", a), "e.g. https://10.0.0.21:8200")
		case u.Scheme == "http" && !v.AllowHTTP:
			p.add(fmt.Sprintf("vault.addresses[%d]", i), fmt.Sprintf("%q is plain HTTP: the unseal shares would cross the network in clear text", a), "use https:// with vault.tls_ca_file, or set vault.allow_http: true for a lab")
		case u.Path != "" && u.Path != "/":
			p.add(fmt.Sprintf("vault.addresses[%d]", i), fmt.Sprintf("%q has a path", a), "give the pod's base URL, e.g. https://10.0.0.21:8200")
		}
	}
	if v.TokenPeriod < 5*time.Second {
		p.add("vault.token_period", fmt.Sprintf("%s is too short", v.TokenPeriod), `the default "768h"; under an hour only for tests`)
	}
	if v.Port < 1 || v.Port > 65535 {
		p.add("vault.port", fmt.Sprintf("%d is not a TCP port", v.Port), "the chart listens on 8200")
	}
	if v.TLSCAFile != "" && !filepath.IsAbs(v.TLSCAFile) {
		p.add("vault.tls_ca_file", "must be an absolute path", "the CA that signed Vault's listener certificate")
	}
	if v.Shares < 1 || v.Shares > 255 {
		p.add("vault.shares", fmt.Sprintf("%d is out of range", v.Shares), "1-255; 5 is usual")
	}
	switch {
	case v.Threshold < 1 || v.Threshold > v.Shares:
		p.add("vault.threshold", fmt.Sprintf("%d must be between 1 and vault.shares (%d)", v.Threshold, v.Shares), "3 of 5 is usual")
	case v.Shares > 1 && v.Threshold < 2:
		p.add("vault.threshold", "must be at least 2 when there is more than one share", "Vault refuses a threshold of 1 with several shares")
	}
	if !filepath.IsAbs(v.Keyfile) {
		p.add("vault.keyfile", "must be an absolute path", "e.g. /var/lib/pve-vault-agent/unseal.cred")
	}
	switch v.Seal {
	case "systemd-creds":
		switch v.SystemdCredsKey {
		case "auto", "host", "tpm2", "host+tpm2":
		default:
			p.add("vault.systemd_creds_key", fmt.Sprintf("%q is not auto, host, tpm2 or host+tpm2", v.SystemdCredsKey), "passed to systemd-creds encrypt --with-key")
		}
	case "age":
		validateSecretRef(p, "vault.age_identity", v.AgeIdentity, true)
	default:
		p.add("vault.seal", fmt.Sprintf("%q is not systemd-creds or age", v.Seal), `"systemd-creds" seals with the host key (TPM2 where present)`)
	}
	if v.RecoveryRecipient != "" {
		if _, err := age.ParseX25519Recipient(v.RecoveryRecipient); err != nil {
			p.add("vault.recovery_recipient", "not an age public key: "+err.Error(), "copy the whole age1… line age-keygen printed for the offline key (age-keygen -y KEYFILE prints it again)")
		}
	}
}

func (c *Config) validateSnapshots(p *problems) {
	s := c.Snapshots
	if s.ProxmoxStorage == "" && !filepath.IsAbs(s.Dir) {
		p.add("snapshots.dir", "must be an absolute path", "e.g. /var/lib/pve-vault-agent/snapshots")
	}
	if s.ProxmoxStorage != "" && !storageRe.MatchString(s.ProxmoxStorage) {
		p.add("snapshots.proxmox_storage", fmt.Sprintf("%q is not a Proxmox storage ID", s.ProxmoxStorage), "as in pvesm status, e.g. local or nfs_backup: a letter first, then letters, digits, '-', '_' or '.'")
	}
	if s.Schedule != "" {
		if _, err := ParseSchedule(s.Schedule); err != nil {
			p.add("snapshots.schedule", err.Error(), `an interval like "6h", a cron expression like "0 3 * * *", or @daily; "" for none`)
		}
	}
	if s.DrillSchedule != "" {
		if _, err := ParseSchedule(s.DrillSchedule); err != nil {
			p.add("snapshots.drill_schedule", err.Error(), `an interval like "168h", a cron expression like "0 4 * * 0", or @weekly; "" for none`)
		}
	}
	if s.IdleTimeout <= 0 {
		p.add("snapshots.idle_timeout", "must be positive", `e.g. "2m"`)
	}
	if s.DrillDeadline < 10*time.Second {
		p.add("snapshots.drill_deadline", "must be at least 10s", `e.g. "10m": longer than a drill of your largest snapshot takes`)
	}
	validateRetention(p, "snapshots.retention", s.Retention)
	seen := map[string]bool{}
	for i, t := range s.Targets {
		at := fmt.Sprintf("snapshots.targets[%d]", i)
		validateTargetName(p, at, t.Name, seen, "nas or offsite-s3")
		switch t.Type {
		case "dir":
			if !filepath.IsAbs(t.Path) {
				p.add(at+".path", "must be an absolute path", "the mount point of the share, e.g. /mnt/pve/nas/vault")
			}
		case "sftp":
			if t.Address == "" {
				p.add(at+".address", "required for sftp", "the server, e.g. nas.lan or nas.lan:2222")
			}
			if t.User == "" {
				p.add(at+".user", "required for sftp", "the account on the server")
			}
			if !strings.HasPrefix(t.Path, "/") {
				p.add(at+".path", "must be an absolute path on the server", "e.g. /vault (inside the account's chroot)")
			}
			validateSecretRef(p, at+".identity", t.Identity, false)
		case "s3":
			if _, port, err := net.SplitHostPort(t.Endpoint); err != nil || port == "" {
				p.add(at+".endpoint", fmt.Sprintf("%q is not host:port", t.Endpoint), "e.g. s3.eu-central-1.amazonaws.com:443 or nas.lan:9000")
			}
			if !bucketRe.MatchString(t.Bucket) {
				p.add(at+".bucket", fmt.Sprintf("%q is not a bucket name", t.Bucket), "3-63 lowercase letters, digits, '-' and '.'")
			}
			validateSecretRef(p, at+".access_key", t.AccessKey, true)
			validateSecretRef(p, at+".secret_key", t.SecretKey, true)
			if t.CAFile != "" && !filepath.IsAbs(t.CAFile) {
				p.add(at+".ca_file", "must be an absolute path", "the PEM of the CA that signed the endpoint's certificate")
			}
		default:
			p.add(at+".type", fmt.Sprintf("%q is not a target type", t.Type), "dir, sftp or s3")
		}
		validateRetention(p, at+".retention", t.Retention)
	}
	if len(s.Targets) > 0 && c.Vault.RecoveryRecipient == "" {
		p.add("vault.recovery_recipient", "required with snapshots.targets: copies leave the host encrypted to it",
			"the age public key (age1…) of the operator's offline key; create it offline with age-keygen")
	}
}

// validateTargetName checks a target's name: a short DNS label, not used before.
func validateTargetName(p *problems, at, name string, seen map[string]bool, example string) {
	switch {
	case !dns1123Re.MatchString(name) || len(name) > 40:
		p.add(at+".name", fmt.Sprintf("%q is not a target name", name), "lowercase letters, digits and '-', e.g. "+example)
	case seen[name]:
		p.add(at+".name", fmt.Sprintf("%q is used twice", name), "give each target its own name")
	}
	seen[name] = true
}

func validateRetention(p *problems, at string, r Retention) {
	if r.KeepLast < 1 {
		p.add(at+".keep_last", "must be at least 1", "the newest snapshot is always kept")
	}
	for name, n := range map[string]int{"hourly": r.Hourly, "daily": r.Daily, "weekly": r.Weekly, "monthly": r.Monthly} {
		if n < 0 {
			p.add(at+"."+name, "must not be negative", "0 disables the tier")
		}
	}
}

func validateSecretRef(p *problems, at string, r SecretRef, required bool) {
	switch {
	case r.File != "" && r.Credential != "":
		p.add(at, "both file and credential are set", "keep one")
	case r.File != "" && !filepath.IsAbs(r.File):
		p.add(at+".file", "must be an absolute path", "a file with mode 0600")
	case r.Credential != "" && !credRe.MatchString(r.Credential):
		p.add(at+".credential", fmt.Sprintf("%q is not a credential name", r.Credential), "as in LoadCredentialEncrypted=NAME:…")
	case !r.IsSet() && required:
		p.add(at, "required", "set file: /path/to/0600-file or credential: NAME")
	}
}

func validPort(s string) bool {
	n, err := strconv.Atoi(s)
	return err == nil && n >= 0 && n <= 65535
}

func (c *Config) validateCluster(p *problems) {
	cl := c.Cluster
	if !cl.Enabled() {
		return
	}
	if !dns1123Re.MatchString(cl.Lease) || len(cl.Lease) > 63 {
		p.add("cluster.lease", fmt.Sprintf("%q is not a Kubernetes object name", cl.Lease), "lower-case letters, digits and '-', e.g. pve-vault-agent")
	}
	switch {
	case cl.RetryPeriod <= 0:
		p.add("cluster.retry_period", "must be positive", "e.g. 2s")
	case cl.RenewDeadline <= time.Duration(1.2*float64(cl.RetryPeriod)):
		p.add("cluster.renew_deadline", fmt.Sprintf("%s is not more than 1.2 × retry_period (%s)", cl.RenewDeadline, cl.RetryPeriod), "the leader needs several tries to renew: e.g. 10s with retry_period 2s")
	case cl.LeaseDuration <= cl.RenewDeadline:
		p.add("cluster.lease_duration", fmt.Sprintf("%s is not more than renew_deadline (%s)", cl.LeaseDuration, cl.RenewDeadline), "a leader must give up before its lease runs out: e.g. 15s with renew_deadline 10s")
	}
	seen := map[string]bool{}
	for i, h := range cl.Hosts {
		path := fmt.Sprintf("cluster.hosts[%d]", i)
		switch {
		case !pveNodeRe.MatchString(h.Name):
			p.add(path+".name", fmt.Sprintf("%q is not a PVE node name", h.Name), "the name `pvecm nodes` lists, e.g. pve2")
		case seen[h.Name]:
			p.add(path+".name", fmt.Sprintf("%q is listed twice", h.Name), "list each PVE node once")
		}
		seen[h.Name] = true
		if h.Address == "" {
			p.add(path+".address", "is empty", "the host name or IP keyfile enroll reaches the node at over SSH")
		}
		if h.Port < 0 || h.Port > 65535 {
			p.add(path+".port", fmt.Sprintf("%d is not a port", h.Port), "leave it out for ssh.port")
		}
		if h.Keyfile != "" && (!filepath.IsAbs(h.Keyfile) || filepath.Clean(h.Keyfile) != h.Keyfile) {
			p.add(path+".keyfile", fmt.Sprintf("%q is not a clean absolute path", h.Keyfile), "leave it out for vault.keyfile")
		}
	}
	if c.Proxmox.Node != "" && !seen[c.Proxmox.Node] {
		p.add("cluster.hosts", fmt.Sprintf("this agent's node %q (proxmox.node) is not listed", c.Proxmox.Node), "list every PVE node that runs an agent, this one included")
	}
}

func (c *Config) validateNotify(p *problems) {
	n := c.Notify
	if len(n.Targets) == 0 {
		return
	}
	if n.Timeout <= 0 {
		p.add("notify.timeout", "must be positive", `e.g. "15s"`)
	}
	if n.Reminder < 0 {
		p.add("notify.reminder", "must not be negative", `e.g. "24h", or 0 for no reminders`)
	}
	if n.MaxPerHour < 1 {
		p.add("notify.max_per_hour", "must be at least 1", "e.g. 30")
	}
	if n.SealedAfter <= 0 {
		p.add("notify.sealed_after", "must be positive", `e.g. "5m"`)
	}
	if n.TokenTTLBelow <= 0 || n.TokenTTLBelow >= c.Vault.TokenPeriod {
		p.add("notify.token_ttl_below", fmt.Sprintf("%s is not between 0 and vault.token_period (%s)", n.TokenTTLBelow, c.Vault.TokenPeriod), "a renewed token has its whole period left: e.g. 72h with the default period of 768h")
	}
	seen := map[string]bool{}
	for i, t := range n.Targets {
		at := fmt.Sprintf("notify.targets[%d]", i)
		validateTargetName(p, at, t.Name, seen, "mail or phone")
		if t.CAFile != "" && !filepath.IsAbs(t.CAFile) {
			p.add(at+".ca_file", "must be an absolute path", "the PEM of the CA that signed the server's certificate")
		}
		switch t.Type {
		case "smtp":
			if t.Host == "" {
				p.add(at+".host", "required for smtp", "the mail server, e.g. mail.example.lan")
			}
			if t.Port < 1 || t.Port > 65535 {
				p.add(at+".port", fmt.Sprintf("%d is not a port", t.Port), "587 (starttls), 465 (implicit) or 25")
			}
			switch t.TLS {
			case "starttls", "implicit":
			case "none":
				if ip := net.ParseIP(t.Host); t.Host != "localhost" && (ip == nil || !ip.IsLoopback()) {
					p.add(at+".tls", "none sends the message, and any password, in clear text over the network", "use starttls or implicit; none only to a relay on loopback")
				}
			default:
				p.add(at+".tls", fmt.Sprintf("%q is not a TLS mode", t.TLS), "starttls, implicit or none")
			}
			if !strings.Contains(t.From, "@") {
				p.add(at+".from", fmt.Sprintf("%q is not a mail address", t.From), "e.g. pve-vault-agent@example.lan")
			}
			if len(t.To) == 0 {
				p.add(at+".to", "required for smtp", "one or more mail addresses")
			}
			for j, to := range t.To {
				if !strings.Contains(to, "@") {
					p.add(fmt.Sprintf("%s.to[%d]", at, j), fmt.Sprintf("%q is not a mail address", to), "e.g. ops@example.lan")
				}
			}
			if t.Username != "" {
				validateSecretRef(p, at+".password", t.Password, true)
			}
		case "webhook":
			u, err := url.Parse(t.URL)
			switch {
			case err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "":
				p.add(at+".url", fmt.Sprintf("%q is not an http(s) URL", t.URL), "e.g. https://hooks.example.lan/pva")
			case u.Scheme == "http" && !isLoopback(u.Hostname()):
				p.add(at+".url", "http sends the message in clear text over the network", "use https, or http only to a receiver on loopback")
			}
			validateSecretRef(p, at+".hmac_key", t.HMACKey, false)
		case "shoutrrr":
			validateSecretRef(p, at+".service_url", t.ServiceURL, true)
		default:
			p.add(at+".type", fmt.Sprintf("%q is not a notification type", t.Type), "smtp, webhook or shoutrrr")
		}
	}
}
