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

// ErrMountPoint refuses to set aside a data directory that is itself a mount point: it
// cannot be renamed, so the agent cannot keep a Vault from starting on it half-emptied.
var ErrMountPoint = errors.New("the data directory is a mount point")

// AsideSuffix names where SetAside moves a data directory: <path>.pva-wiped.
const AsideSuffix = ".pva-wiped"

// asideScript renames $1 to $1.pva-wiped (one rename on one filesystem: atomic). From
// then on no Vault can start on the old data: a local PersistentVolume whose path is
// missing fails to mount, and a hostPath created anew by the kubelet or the container
// runtime is empty and root-owned. A Vault already running keeps what it has open.
const asideScript = `set -eu
p=$1 a=$1` + AsideSuffix + `
for x in "$p" "$a"; do
  if [ -L "$x" ]; then echo "$x is a symbolic link" >&2; exit 20; fi
done
parent=$p
while [ "$parent" != / ]; do
  parent=$(dirname -- "$parent")
  if [ -L "$parent" ]; then echo "$parent (a parent of $p) is a symbolic link; use the resolved path" >&2; exit 21; fi
done
if [ -d "$a" ]; then echo state=aside; exit 0; fi
if [ ! -e "$p" ]; then echo state=missing; exit 0; fi
if [ ! -d "$p" ]; then echo "$p exists and is not a directory" >&2; exit 22; fi
if [ "$(stat -c %d -- "$p")" != "$(stat -c %d -- "$(dirname -- "$p")")" ]; then echo "$p is a mount point" >&2; exit 24; fi
mv -T -- "$p" "$a"
echo state=aside
`

// SetAside moves a Vault data directory out of the way on the node (renamed to
// <path>.pva-wiped), so that no Vault pod can start on its data from now on. Repeating
// it after an interruption is safe. A mount point is refused with ErrMountPoint.
func (c *Conn) SetAside(ctx context.Context, path string) error {
	if err := CheckHostPath(path); err != nil {
		return err
	}
	if _, err := c.Run(ctx, "set aside "+path, asideScript, path); err != nil {
		var re *RunError
		if errors.As(err, &re) && re.Status == 24 {
			return fmt.Errorf("%w: %s: %s", ErrMountPoint, path, strings.TrimSpace(re.Stderr))
		}
		return scriptRefusal(err, "set aside "+path)
	}
	return nil
}

// dropAsideScript deletes $1.pva-wiped (never following a link, never crossing a mount)
// and checks that $1, if something recreated it meanwhile, is empty.
const dropAsideScript = `set -eu
p=$1 a=$1` + AsideSuffix + `
for x in "$p" "$a"; do
  if [ -L "$x" ]; then echo "$x is a symbolic link" >&2; exit 20; fi
done
if [ -d "$a" ]; then
  cd -P -- "$a"
  if [ "$(pwd -P)" != "$a" ]; then echo "$a resolves to $(pwd -P): a symbolic link appeared in its path" >&2; exit 21; fi
  dev=$(stat -c %d .)
  other=$(find . -mindepth 1 -type d -exec sh -c '[ "$(stat -c %d "$1")" != "$2" ]' sh {} "$dev" \; -print -quit)
  if [ -n "$other" ]; then echo "$a/${other#./} is another filesystem mounted inside; unmount it first" >&2; exit 23; fi
  find . -xdev -mindepth 1 -delete
  cd /
  rmdir -- "$a"
fi
if [ -d "$p" ] && [ -n "$(find "$p" -mindepth 1 -print -quit)" ]; then
  echo "$p was recreated and written while its data was set aside (does Vault run as root?); empty it by hand" >&2; exit 25
fi
echo dropped
`

// ReplaceEmpty finishes what SetAside began, once no Vault pod runs on the old data:
// it deletes the data set aside and makes the path an empty directory with w's owner and
// mode, verified numerically.
func (c *Conn) ReplaceEmpty(ctx context.Context, w Want) (Prepared, error) {
	if err := CheckHostPath(w.Path); err != nil {
		return Prepared{}, err
	}
	if _, err := c.Run(ctx, "drop the data set aside at "+w.Path+AsideSuffix, dropAsideScript, w.Path); err != nil {
		return Prepared{}, scriptRefusal(err, "drop "+w.Path+AsideSuffix)
	}
	return c.Prepare(ctx, w)
}

// scriptRefusal turns the scripts' refusal codes into errors a caller can branch on.
func scriptRefusal(err error, what string) error {
	var re *RunError
	switch {
	case errors.As(err, &re) && re.Status >= 20 && re.Status <= 22:
		return fmt.Errorf("%w: %s", ErrUnsafePath, strings.TrimSpace(re.Stderr))
	case errors.As(err, &re) && re.Status == 23:
		return fmt.Errorf("%s: nothing deleted: %s", what, strings.TrimSpace(re.Stderr))
	case errors.As(err, &re) && re.Status == 25:
		return fmt.Errorf("%s: %s", what, strings.TrimSpace(re.Stderr))
	}
	return err
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
