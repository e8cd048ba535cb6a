package agent

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
)

// ShippedWritable are the directories the shipped unit lets the service write
// (StateDirectory=, CacheDirectory=, ReadWritePaths= under ProtectSystem=strict).
var ShippedWritable = []string{"/var/lib/pve-vault-agent", "/var/cache/pve-vault-agent"}

// UnitWritable lists the directories the installed service may write, as systemctl
// reports them for pve-vault-agent.service (drop-ins included), or the shipped unit's
// when systemd cannot say; the second result names the source.
func UnitWritable(ctx context.Context) ([]string, string) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "systemctl", "show", "pve-vault-agent.service", "-p", "ReadWritePaths", "-p", "StateDirectory", "-p", "CacheDirectory", "-p", "LoadState").Output()
	if err != nil || !strings.Contains(string(out), "LoadState=loaded") {
		return ShippedWritable, "the shipped unit (systemd does not report an installed pve-vault-agent.service here)"
	}
	var dirs []string
	for _, line := range strings.Split(string(out), "\n") {
		k, v, _ := strings.Cut(line, "=")
		for _, f := range strings.Fields(v) {
			f = strings.TrimLeft(f, "-+")
			switch k {
			case "ReadWritePaths":
				dirs = append(dirs, f)
			case "StateDirectory":
				dirs = append(dirs, filepath.Join("/var/lib", f))
			case "CacheDirectory":
				dirs = append(dirs, filepath.Join("/var/cache", f))
			}
		}
	}
	return dirs, "the installed unit (systemctl show pve-vault-agent)"
}

// WritablePathWarnings says which directories the agent writes lie outside writable:
// under the unit's ProtectSystem=strict a write there fails with "read-only file
// system". resolved is the snapshot directory when it came from a Proxmox storage.
func WritablePathWarnings(cfg *configs.Config, writable []string, resolved string) []string {
	type use struct{ key, dir string }
	uses := []use{{"vault.keyfile", filepath.Dir(cfg.Vault.Keyfile)}, {"chart.cache_dir", cfg.Chart.CacheDir}}
	switch {
	case resolved != "":
		uses = append(uses, use{"snapshots.proxmox_storage (" + cfg.Snapshots.ProxmoxStorage + ")", resolved})
	case cfg.Snapshots.ProxmoxStorage == "":
		uses = append(uses, use{"snapshots.dir", cfg.Snapshots.Dir})
	}
	for _, t := range cfg.Snapshots.Targets {
		if t.Type == "dir" {
			uses = append(uses, use{"snapshots.targets " + t.Name, t.Path})
		}
	}
	var out []string
	for _, u := range uses {
		if !under(u.dir, writable) {
			out = append(out, fmt.Sprintf("%s: %s is not writable by the service (ProtectSystem=strict; writable: %s): `systemctl edit pve-vault-agent` (and pve-vault-agent-backup) and add the line ReadWritePaths=%s under [Service]",
				u.key, u.dir, strings.Join(writable, " "), u.dir))
		}
	}
	return out
}

func under(dir string, roots []string) bool {
	dir = filepath.Clean(dir)
	for _, r := range roots {
		r = filepath.Clean(r)
		if dir == r || strings.HasPrefix(dir, r+"/") {
			return true
		}
	}
	return false
}
