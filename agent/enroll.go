package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/provision"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// ErrUnknownHost means a host is not in cluster.hosts.
var ErrUnknownHost = errors.New("not a host in cluster.hosts")

// EnrollOptions tune keyfile enroll.
type EnrollOptions struct {
	// AcceptNewHostKey pins the host's SSH key when known_hosts does not list it yet.
	AcceptNewHostKey bool
}

// EnrollReport says where a keyfile copy was sealed.
type EnrollReport struct {
	Host   string `json:"host"`
	Path   string `json:"path"`
	Digest string `json:"digest"` // the first 16 hex digits of the payload's SHA-256
}

// enrollScript seals its standard input on the host it runs on with that host's own
// systemd-creds key, into a temporary file beside $1; decrypts it again and compares the
// SHA-256 with $3 (the plaintext never leaves the pipe); and only then renames it over
// $1. A file already at $1 is replaced only when it is a keyfile of the same keyset ($5,
// a fingerprint: not a secret). A failure leaves what was at $1 as it was.
const enrollScript = `set -eu
umask 077
path=$1 key=$2 want=$3 name=$4 keyset=$5
dir=$(dirname -- "$path")
if [ -e "$path" ]; then
	# Never over a keyfile the agent did not put there: what is there must open with this
	# host's key and hold the same keyset (a token rotation rewrites it, nothing else).
	if ! old=$(systemd-creds decrypt --name="$name" "$path" - | grep -o '"keyset_fingerprint":"[^"]*"'); then
		echo "$path is there and does not open with this host's key as a keyfile: move it away first if it is not needed" >&2
		exit 5
	fi
	if [ "$old" != "\"keyset_fingerprint\":\"$keyset\"" ]; then
		echo "$path holds another Vault's keyfile ($old): not replaced; move it away first if that Vault is gone" >&2
		exit 4
	fi
fi
mkdir -p -- "$dir"
tmp=$(mktemp "$dir/.keyfile-enroll-XXXXXX")
trap 'rm -f -- "$tmp"' EXIT
systemd-creds encrypt --name="$name" --with-key="$key" - "$tmp"
got=$(systemd-creds decrypt --name="$name" "$tmp" - | sha256sum | cut -d' ' -f1)
if [ "$got" != "$want" ]; then
	echo "the sealed copy does not decrypt to the keyfile ($got)" >&2
	exit 3
fi
sync -- "$tmp" 2>/dev/null || sync
mv -f -- "$tmp" "$path"
trap - EXIT
sync -- "$dir" 2>/dev/null || sync
echo enrolled
`

// digestScript prints the SHA-256 of the keyfile at $1 as the host's own systemd-creds
// key opens it, or "missing".
const digestScript = `set -eu
if [ ! -e "$1" ]; then echo missing; exit 0; fi
systemd-creds decrypt --name="$2" "$1" - | sha256sum | cut -d' ' -f1
`

// clusterHost is the host of that name in cluster.hosts.
func (e *Env) clusterHost(name string) (configs.ClusterHost, error) {
	var names []string
	for _, h := range e.Config.Cluster.Hosts {
		if h.Name == name {
			return h, nil
		}
		names = append(names, h.Name)
	}
	if len(names) == 0 {
		return configs.ClusterHost{}, hintf("list every PVE node that runs an agent under cluster.hosts (README, On a Proxmox cluster)", "%q: %w (cluster.hosts is empty)", name, ErrUnknownHost)
	}
	return configs.ClusterHost{}, hintf("one of: "+strings.Join(names, ", "), "%q: %w", name, ErrUnknownHost)
}

func (e *Env) hostKeyfilePath(h configs.ClusterHost) string {
	if h.Keyfile != "" {
		return h.Keyfile
	}
	return e.Config.Vault.Keyfile
}

// dialHost connects to a cluster host over SSH with the ssh: settings.
func (e *Env) dialHost(ctx context.Context, h configs.ClusterHost, acceptNew bool) (*provision.Conn, error) {
	cfg, err := e.SSH(acceptNew)
	if err != nil {
		return nil, err
	}
	if h.Port != 0 {
		cfg.Port = h.Port
	}
	c, err := provision.Dial(ctx, h.Address, cfg)
	if err != nil {
		return nil, fmt.Errorf("host %s (%s): %w", h.Name, h.Address, err)
	}
	return c, nil
}

// EnrollKeyfile copies this host's keyfile to another PVE node of the cluster and seals
// it there with that node's own systemd-creds key (host secret, TPM2 or both, as
// vault.systemd_creds_key says): the plaintext goes from this process's memory through
// the SSH channel into systemd-creds' standard input there, and is on neither disk. The
// copy is decrypted there and compared by SHA-256 before it replaces anything.
func EnrollKeyfile(ctx context.Context, env *Env, host string, opts EnrollOptions) (*EnrollReport, error) {
	h, err := env.clusterHost(host)
	if err != nil {
		return nil, err
	}
	if id, err := env.Identity(); err == nil && id == h.Name {
		return nil, hintf("run it on "+h.Name+" for another host, or here naming another host", "%s is this host: its keyfile is the one being copied", h.Name)
	}
	if env.Config.Vault.Seal != "systemd-creds" {
		return nil, hintf("with vault.seal: age every host opens the keyfile with the one age identity: copy the keyfile and the identity's credential to the host as you installed them here",
			"keyfile enroll seals with the host's systemd-creds key; vault.seal is %q", env.Config.Vault.Seal)
	}
	kf, err := env.Keyfile.Read(ctx)
	if err != nil {
		return nil, err
	}
	plain, err := kf.Plaintext()
	if err != nil {
		return nil, err
	}
	defer clear(plain)
	digest, err := kf.Digest()
	if err != nil {
		return nil, err
	}
	conn, err := env.dialHost(ctx, h, opts.AcceptNewHostKey)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	path := env.hostKeyfilePath(h)
	key := env.Config.Vault.SystemdCredsKey
	if _, err := conn.RunInput(ctx, "keyfile enroll", enrollScript, bytes.NewReader(plain), path, key, digest, vault.CredentialName, kf.Keyset.Fingerprint()); err != nil {
		var re *provision.RunError
		if errors.As(err, &re) && (re.Status == 4 || re.Status == 5) {
			return nil, hintf("look at that file on "+h.Name+"; enroll never replaces a file it cannot prove is this Vault's keyfile",
				"keyfile enroll %s: %s", h.Name, strings.TrimSpace(re.Stderr))
		}
		return nil, withHint(fmt.Errorf("seal the keyfile on %s: %w", h.Name, err),
			"the host needs systemd-creds (systemd ≥ 250) and root over SSH (or ssh.sudo); what was at %s there is unchanged", path)
	}
	env.Log.Info("keyfile enrolled", "host", h.Name, "path", path, "keyset", kf.Keyset.Fingerprint())
	return &EnrollReport{Host: h.Name, Path: path, Digest: digest[:16]}, nil
}

// HostKeyfile is what one cluster host holds.
type HostKeyfile struct {
	Host    string `json:"host"`
	Current bool   `json:"current"`
	State   string `json:"state"` // current, stale, missing, unreadable, unreachable
	Error   string `json:"error,omitempty"`
}

// HostKeyfiles asks every cluster host, over SSH, for the SHA-256 of the keyfile its own
// key opens, and compares it with this host's: which hosts hold the current keyfile
// (same shares and tokens), an older one (token rotate did not reach it), or none. This
// host answers from its own copy.
func HostKeyfiles(ctx context.Context, env *Env) ([]HostKeyfile, error) {
	kf, err := env.Keyfile.Read(ctx)
	if err != nil {
		return nil, err
	}
	want, err := kf.Digest()
	if err != nil {
		return nil, err
	}
	id, _ := env.Identity()
	var out []HostKeyfile
	for _, h := range env.Config.Cluster.Hosts {
		r := HostKeyfile{Host: h.Name}
		if h.Name == id {
			r.Current, r.State = true, "current"
			out = append(out, r)
			continue
		}
		got, err := remoteDigest(ctx, env, h)
		switch {
		case err != nil:
			r.State, r.Error = "unreachable", firstLine(err.Error())
		case got == "missing":
			r.State = "missing"
		case got == want:
			r.Current, r.State = true, "current"
		case len(got) == 64:
			r.State = "stale"
		default:
			r.State = "unreadable"
		}
		out = append(out, r)
	}
	return out, nil
}

func remoteDigest(ctx context.Context, env *Env, h configs.ClusterHost) (string, error) {
	conn, err := env.dialHost(ctx, h, false)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	out, err := conn.Run(ctx, "keyfile digest", digestScript, env.hostKeyfilePath(h), vault.CredentialName)
	if err != nil {
		var re *provision.RunError
		if errors.As(err, &re) {
			return "unreadable", nil
		}
		return "", err
	}
	return strings.TrimSpace(out), nil
}
