package provision

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrVerify means the directory did not read back with the owner and mode asked for.
var ErrVerify = errors.New("hostPath verification failed")

// Want is the state a hostPath must have.
type Want struct {
	Path string
	UID  int
	GID  int
	Mode uint32 // permission bits, e.g. 0o700
}

// State says what Prepare had to do.
type State string

const (
	Created   State = "created"   // the directory did not exist
	Fixed     State = "fixed"     // owner or mode (or an entry's owner inside) was wrong
	Unchanged State = "unchanged" // already right
)

// Prepared is the verified result on one node, read back numerically with stat.
type Prepared struct {
	Path    string `json:"path"`
	State   State  `json:"state"`
	UID     int    `json:"uid"`
	GID     int    `json:"gid"`
	Mode    string `json:"mode"` // four octal digits
	SELinux bool   `json:"selinux_relabelled,omitempty"`
}

// prepareScript runs as root on the node with $1 path, $2 uid, $3 gid, $4 octal mode.
// It refuses symlinks (the path or any component), creates the directory, then works
// from inside it: `cd -P` resolves it once and is checked against the path, and every
// later command names "." or what find reaches below it with -execdir, -xdev and -h, so
// a symlink swapped in after the check is never followed and no mount is crossed. It
// chowns only entries with the wrong owner, sets the mode, relabels for containers when
// SELinux enforces, and prints the numeric result. Exit codes 20+ are refusals.
const prepareScript = `set -eu
p=$1 uid=$2 gid=$3 mode=$4
state=unchanged
if [ -L "$p" ]; then echo "$p is a symbolic link; point the config at the real directory" >&2; exit 20; fi
parent=$p
while [ "$parent" != / ]; do
  parent=$(dirname -- "$parent")
  if [ -L "$parent" ]; then echo "$parent (a parent of $p) is a symbolic link; use the resolved path" >&2; exit 21; fi
done
if [ -e "$p" ] && [ ! -d "$p" ]; then echo "$p exists and is not a directory" >&2; exit 22; fi
if [ ! -e "$p" ]; then
  mkdir -p -- "$p"
  state=created
fi
cd -P -- "$p"
if [ "$(pwd -P)" != "$p" ]; then echo "$p resolves to $(pwd -P): a symbolic link appeared in its path" >&2; exit 21; fi
if [ -n "$(find . -xdev \( ! -uid "$uid" -o ! -gid "$gid" \) -print -quit)" ]; then
  find . -xdev \( ! -uid "$uid" -o ! -gid "$gid" \) -execdir chown -h -- "$uid:$gid" {} +
  [ "$state" = created ] || state=fixed
fi
if [ "$(stat -c %a .)" != "$mode" ]; then
  chmod -- "$mode" .
  [ "$state" = created ] || state=fixed
fi
selinux=0
if command -v getenforce >/dev/null 2>&1 && [ "$(getenforce 2>/dev/null)" = Enforcing ]; then
  find . -xdev -execdir chcon -h -t container_file_t -- {} +
  selinux=1
fi
echo "state=$state"
echo "selinux=$selinux"
stat -c 'stat=%u %g %a %F' .
`

// wipeScript empties the data directory $1 (keeping the directory, its owner and mode)
// with the same care: no symlink followed, no mount crossed.
const wipeScript = `set -eu
p=$1
if [ -L "$p" ]; then echo "$p is a symbolic link" >&2; exit 20; fi
if [ ! -d "$p" ]; then echo left=0; exit 0; fi
cd -P -- "$p"
if [ "$(pwd -P)" != "$p" ]; then echo "$p resolves to $(pwd -P): a symbolic link appeared in its path" >&2; exit 21; fi
dev=$(stat -c %d .)
other=$(find . -mindepth 1 -type d -exec sh -c '[ "$(stat -c %d "$1")" != "$2" ]' sh {} "$dev" \; -print -quit)
if [ -n "$other" ]; then echo "$p/${other#./} is another filesystem mounted inside; unmount it first" >&2; exit 23; fi
find . -xdev -mindepth 1 -delete
echo "left=$(find . -mindepth 1 | wc -l)"
`

// Wipe empties a Vault data directory on the node, for a Raft node that must rejoin:
// Vault 1.19+ refuses to rejoin a cluster while it holds data from before its removal.
// The directory itself, its owner and mode stay.
func (c *Conn) Wipe(ctx context.Context, path string) error {
	if err := CheckHostPath(path); err != nil {
		return err
	}
	out, err := c.Run(ctx, "wipe "+path, wipeScript, path)
	if err != nil {
		var re *RunError
		switch {
		case errors.As(err, &re) && re.Status >= 20 && re.Status <= 22:
			return fmt.Errorf("%w: %s", ErrUnsafePath, strings.TrimSpace(re.Stderr))
		case errors.As(err, &re) && re.Status == 23:
			return fmt.Errorf("wipe %s: nothing deleted: %s", path, strings.TrimSpace(re.Stderr))
		}
		return err
	}
	if !strings.Contains(out, "left=0") {
		return fmt.Errorf("wipe %s: entries remain (%s): another filesystem is mounted inside it", path, strings.TrimSpace(out))
	}
	return nil
}

// Prepare makes w.Path on the node a directory owned by w.UID:w.GID with mode w.Mode,
// in one SSH session, and verifies the result numerically. It refuses unsafe paths
// before connecting and symlinks on the node.
func (c *Conn) Prepare(ctx context.Context, w Want) (Prepared, error) {
	if err := CheckHostPath(w.Path); err != nil {
		return Prepared{}, err
	}
	if w.UID < 0 || w.GID < 0 || w.Mode > 0o777 {
		return Prepared{}, fmt.Errorf("prepare %s: invalid owner %d:%d or mode %o", w.Path, w.UID, w.GID, w.Mode)
	}
	mode := strconv.FormatUint(uint64(w.Mode), 8)
	out, err := c.Run(ctx, "prepare "+w.Path, prepareScript, w.Path, strconv.Itoa(w.UID), strconv.Itoa(w.GID), mode)
	if err != nil {
		var re *RunError
		if errors.As(err, &re) && re.Status >= 20 && re.Status <= 22 {
			return Prepared{}, fmt.Errorf("%w: %s", ErrUnsafePath, strings.TrimSpace(re.Stderr))
		}
		return Prepared{}, err
	}
	return verify(out, w)
}

func verify(out string, w Want) (Prepared, error) {
	res := Prepared{Path: w.Path}
	var stat string
	for _, line := range strings.Split(out, "\n") {
		k, v, _ := strings.Cut(strings.TrimSpace(line), "=")
		switch k {
		case "state":
			res.State = State(v)
		case "selinux":
			res.SELinux = v == "1"
		case "stat":
			stat = v
		}
	}
	f := strings.Fields(stat)
	if len(f) < 4 || res.State == "" {
		return res, fmt.Errorf("%w: unexpected output from the node: %q", ErrVerify, out)
	}
	uid, err1 := strconv.Atoi(f[0])
	gid, err2 := strconv.Atoi(f[1])
	mode, err3 := strconv.ParseUint(f[2], 8, 32)
	if err := errors.Join(err1, err2, err3); err != nil {
		return res, fmt.Errorf("%w: unreadable stat %q: %v", ErrVerify, stat, err)
	}
	res.UID, res.GID, res.Mode = uid, gid, fmt.Sprintf("%04o", mode)
	kind := strings.Join(f[3:], " ")
	if kind != "directory" || uid != w.UID || gid != w.GID || uint32(mode) != w.Mode {
		return res, fmt.Errorf("%w: %s reads back as %s %d:%d %04o, want directory %d:%d %04o", ErrVerify, w.Path, kind, uid, gid, mode, w.UID, w.GID, w.Mode)
	}
	return res, nil
}

// Stat reads owner and mode of path on the node, numerically (for status).
func (c *Conn) Stat(ctx context.Context, path string) (uid, gid int, mode string, err error) {
	out, err := c.Run(ctx, "stat "+path, `stat -c '%u %g %a' -- "$1"`, path)
	if err != nil {
		return 0, 0, "", err
	}
	f := strings.Fields(out)
	if len(f) != 3 {
		return 0, 0, "", fmt.Errorf("stat %s: unexpected output %q", path, out)
	}
	uid, _ = strconv.Atoi(f[0])
	gid, _ = strconv.Atoi(f[1])
	m, _ := strconv.ParseUint(f[2], 8, 32)
	return uid, gid, fmt.Sprintf("%04o", m), nil
}
