package agent

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// The service reads its secrets as credentials the service manager decrypted
// (LoadCredentialEncrypted=NAME:FILE). A credential the configuration names that the
// unit does not load is missing at run time; one the unit loads whose file does not
// exist fails the unit's start (243/CREDENTIALS). So the unit must load exactly what the
// configuration references: config check compares the two and prints the drop-in.

// Units are the units that read the configuration's credentials.
var Units = []string{"pve-vault-agent.service", "pve-vault-agent-backup.service"}

// WantedCredentials maps each credential the configuration needs to its encrypted file:
// every {credential: NAME} reference, and the keyfile itself when systemd-creds seals it.
func WantedCredentials(cfg *configs.Config) map[string]string {
	want := map[string]string{}
	if cfg.Vault.Seal != "age" {
		want[vault.CredentialName] = cfg.Vault.Keyfile
	}
	for _, r := range cfg.SecretRefs() {
		if r.Ref.Credential != "" {
			want[r.Ref.Credential] = cfg.SealedCredential(r.Ref.Credential)
		}
	}
	return want
}

// UnitCredentials lists the credentials unit loads (ID → file), as systemd reports
// them, else as the unit files on disk say (the search path, drop-ins included). With
// $SYSTEMD_UNIT_PATH set (systemd's own override of the search path), only the files
// there count. found is false when no such unit is installed.
func UnitCredentials(ctx context.Context, unit string) (creds map[string]string, source string, found bool) {
	if os.Getenv("SYSTEMD_UNIT_PATH") != "" {
		return unitFileCredentials(unit)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "systemctl", "show", unit, "-p", "LoadState", "-p", "LoadCredentialEncrypted", "-p", "LoadCredential").Output()
	if err == nil && strings.Contains(string(out), "LoadState=loaded") {
		creds = map[string]string{}
		for _, line := range strings.Split(string(out), "\n") {
			k, v, _ := strings.Cut(line, "=")
			if k == "LoadCredentialEncrypted" || k == "LoadCredential" {
				for _, f := range strings.Fields(v) {
					id, path, _ := strings.Cut(f, ":")
					creds[id] = path
				}
			}
		}
		return creds, "systemctl show " + unit, true
	}
	return unitFileCredentials(unit)
}

// unitSearchPath is where systemd looks for system units, most important first.
func unitSearchPath() []string {
	if p := os.Getenv("SYSTEMD_UNIT_PATH"); p != "" {
		return filepath.SplitList(p)
	}
	return []string{"/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"}
}

// unitFileCredentials reads the unit's LoadCredential(Encrypted)= lines from its file
// and drop-ins (<unit>.d/*.conf in every search directory, applied in file-name order;
// an empty assignment resets the list, as systemd does).
func unitFileCredentials(unit string) (map[string]string, string, bool) {
	var main string
	dropins := map[string]string{} // file name → path (the most important directory wins)
	for _, dir := range unitSearchPath() {
		if main == "" {
			if _, err := os.Stat(filepath.Join(dir, unit)); err == nil {
				main = filepath.Join(dir, unit)
			}
		}
		ents, _ := filepath.Glob(filepath.Join(dir, unit+".d", "*.conf"))
		for _, e := range ents {
			if _, ok := dropins[filepath.Base(e)]; !ok {
				dropins[filepath.Base(e)] = e
			}
		}
	}
	if main == "" {
		return nil, "", false
	}
	files := []string{main}
	names := make([]string, 0, len(dropins))
	for n := range dropins {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		files = append(files, dropins[n])
	}
	creds := map[string]string{}
	for _, file := range files {
		f, err := os.Open(file)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), "=")
			if !ok || (k != "LoadCredentialEncrypted" && k != "LoadCredential") {
				continue
			}
			if v = strings.TrimSpace(v); v == "" {
				creds = map[string]string{}
				continue
			}
			id, path, _ := strings.Cut(v, ":")
			creds[id] = path
		}
		f.Close()
	}
	return creds, strings.Join(files, ", "), true
}

// CredentialMismatch names what the unit lacks (the configuration references it) and
// what it loads in vain (nothing references it: a missing file fails the unit's start),
// each with the file, sorted.
func CredentialMismatch(want, loaded map[string]string) (missing, extra []string) {
	for id, p := range want {
		if lp, ok := loaded[id]; !ok || lp != p {
			missing = append(missing, id+":"+p)
		}
	}
	for id, p := range loaded {
		if wp, ok := want[id]; !ok || wp != p {
			extra = append(extra, id+":"+p)
		}
	}
	sort.Strings(missing)
	sort.Strings(extra)
	return missing, extra
}

// UnitCredentialCheck is what CheckUnitCredentials found.
type UnitCredentialCheck struct {
	Installed bool     // a unit was found to compare with
	Problems  []string // each disagreement, with where the unit's view came from
	DropIn    string   // the shell that makes the units load exactly what is wanted
	Err       error    // set when an installed unit disagrees
}

// CheckUnitCredentials compares the credentials the configuration references with the
// ones the installed units load.
func CheckUnitCredentials(ctx context.Context, cfg *configs.Config) UnitCredentialCheck {
	want := WantedCredentials(cfg)
	c := UnitCredentialCheck{DropIn: CredentialDropIn(want)}
	for _, unit := range Units {
		loaded, source, found := UnitCredentials(ctx, unit)
		if !found {
			continue
		}
		c.Installed = true
		missing, extra := CredentialMismatch(want, loaded)
		for _, m := range missing {
			c.Problems = append(c.Problems, fmt.Sprintf("%s does not load %s, which the configuration references (from %s)", unit, m, source))
		}
		for _, x := range extra {
			c.Problems = append(c.Problems, fmt.Sprintf("%s loads %s, which the configuration does not reference: a missing file fails its start (from %s)", unit, x, source))
		}
	}
	if len(c.Problems) > 0 {
		c.Err = withHint(fmt.Errorf("the service units and the configuration disagree on %d credential(s)", len(c.Problems)),
			"run the commands printed above as root, then `pve-vault-agent config check` again")
	}
	return c
}

// CredentialDropIn is the shell that installs a drop-in making both units load exactly
// the credentials want names.
func CredentialDropIn(want map[string]string) string {
	ids := make([]string, 0, len(want))
	for id := range want {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	var b strings.Builder
	for _, u := range Units {
		fmt.Fprintf(&b, "mkdir -p /etc/systemd/system/%s.d\ncat > /etc/systemd/system/%s.d/credentials.conf <<'EOF'\n[Service]\n# The credentials the configuration references, and no others.\nLoadCredentialEncrypted=\n", u, u)
		for _, id := range ids {
			fmt.Fprintf(&b, "LoadCredentialEncrypted=%s:%s\n", id, want[id])
		}
		b.WriteString("EOF\n")
	}
	b.WriteString("systemctl daemon-reload\n")
	return b.String()
}
