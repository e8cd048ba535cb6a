package lab

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
)

// The fake Proxmox's access control, after pve-access-control: roles are sets of
// privileges; an ACL entry gives a role to a user or a token on a path and, unless
// propagate is off, below it; the entries on the most specific path that has any for
// the principal decide (PVE::AccessControl::permissions). A privilege-separated token
// holds what both it and its user hold; an unseparated one holds its user's.

// privileges that exist on each major version (pve-access-control PVE/AccessControl.pm
// $privgroups). PVE 9 removed VM.Monitor and split the guest agent into
// VM.GuestAgent.Audit / .FileRead / .FileWrite / .FileSystemMgmt / .Unrestricted.
var privileges = map[int][]string{
	8: {"Datastore.Allocate", "Datastore.AllocateSpace", "Datastore.AllocateTemplate", "Datastore.Audit",
		"Sys.Audit", "Sys.Console", "Sys.Modify", "Sys.PowerMgmt", "Sys.Syslog",
		"VM.Allocate", "VM.Audit", "VM.Backup", "VM.Clone", "VM.Config.Options", "VM.Console", "VM.Migrate",
		"VM.Monitor", "VM.PowerMgmt", "VM.Snapshot", "Pool.Audit", "Mapping.Audit", "SDN.Audit"},
	9: {"Datastore.Allocate", "Datastore.AllocateSpace", "Datastore.AllocateTemplate", "Datastore.Audit",
		"Sys.Audit", "Sys.Console", "Sys.Modify", "Sys.PowerMgmt", "Sys.Syslog",
		"VM.Allocate", "VM.Audit", "VM.Backup", "VM.Clone", "VM.Config.Options", "VM.Console", "VM.Migrate",
		"VM.GuestAgent.Audit", "VM.GuestAgent.FileRead", "VM.GuestAgent.FileWrite", "VM.GuestAgent.FileSystemMgmt",
		"VM.GuestAgent.Unrestricted", "VM.PowerMgmt", "VM.Snapshot", "Pool.Audit", "Mapping.Audit", "SDN.Audit"},
}

type aclEntry struct {
	path      string
	token     bool // ugid is a token id, else a user id
	ugid      string
	role      string
	propagate bool
}

type aclStore struct {
	major   int
	roles   map[string][]string
	privsep map[string]bool // token id → privilege-separated
	entries []aclEntry
}

func newACLStore(major int) *aclStore {
	return &aclStore{major: major, roles: map[string][]string{}, privsep: map[string]bool{}}
}

// rolePrivs is a role's privileges: the built-in ones as the version defines them.
func (a *aclStore) rolePrivs(name string) ([]string, bool) {
	switch name {
	case "Administrator":
		return privileges[a.major], true
	case "PVEAuditor":
		// The *.Audit privileges; PVE 9 added VM.GuestAgent.Audit to it.
		audit := []string{"Datastore.Audit", "Mapping.Audit", "Pool.Audit", "SDN.Audit", "Sys.Audit", "VM.Audit"}
		if a.major >= 9 {
			audit = append(audit, "VM.GuestAgent.Audit")
		}
		return audit, true
	}
	p, ok := a.roles[name]
	return p, ok
}

func (a *aclStore) addToken(id string, privsep bool) { a.privsep[id] = privsep }

// allowed reports whether token holds privs (all of them, or any one when any) on path.
func (a *aclStore) allowed(token, path string, privs []string, any bool) bool {
	user, _, _ := strings.Cut(token, "!")
	has := a.privsOf(false, user, path)
	if a.privsep[token] {
		tok := a.privsOf(true, token, path)
		has = slices.DeleteFunc(has, func(p string) bool { return !slices.Contains(tok, p) })
	}
	for _, p := range privs {
		ok := slices.Contains(has, p)
		if ok && any {
			return true
		}
		if !ok && !any {
			return false
		}
	}
	return !any
}

// privsOf is what the principal holds on path: the roles of the entries on the deepest
// of path and its parents that has entries for it (propagating ones, on a parent).
func (a *aclStore) privsOf(token bool, ugid, path string) []string {
	for p := path; ; p = parentPath(p) {
		var out []string
		found := false
		for _, e := range a.entries {
			if e.token != token || e.ugid != ugid || e.path != p || (p != path && !e.propagate) {
				continue
			}
			found = true
			privs, _ := a.rolePrivs(e.role)
			out = append(out, privs...)
		}
		if found || p == "/" {
			return out
		}
	}
}

func parentPath(p string) string {
	i := strings.LastIndex(p, "/")
	if i <= 0 {
		return "/"
	}
	return p[:i]
}

// pveum runs one command line (see PVE.Pveum).
func (a *aclStore) pveum(line string) error {
	args, err := splitWords(line)
	if err != nil {
		return err
	}
	if len(args) > 0 && args[0] == "pveum" {
		args = args[1:]
	}
	pos, opts, err := parseOpts(args)
	if err != nil {
		return err
	}
	switch {
	case len(pos) == 3 && pos[0] == "role" && (pos[1] == "add" || pos[1] == "modify"):
		name := pos[2]
		if _, exists := a.rolePrivs(name); exists == (pos[1] == "add") {
			if exists {
				return fmt.Errorf("role '%s' already exists", name)
			}
			return fmt.Errorf("role '%s' does not exist", name)
		}
		var privs []string
		for _, p := range strings.FieldsFunc(opts["privs"], func(r rune) bool { return r == ',' || r == ';' || r == ' ' }) {
			if !slices.Contains(privileges[a.major], p) {
				return fmt.Errorf("400 Parameter verification failed.\nprivs: invalid privilege '%s'", p)
			}
			privs = append(privs, p)
		}
		if opts["append"] == "1" {
			privs = append(a.roles[name], privs...)
		}
		a.roles[name] = privs
	case len(pos) == 3 && pos[0] == "acl" && (pos[1] == "modify" || pos[1] == "delete"):
		path := pos[2]
		if !strings.HasPrefix(path, "/") {
			return fmt.Errorf("400 Parameter verification failed.\npath: invalid ACL path '%s'", path)
		}
		path = "/" + strings.Trim(path, "/")
		roles := splitList(opts["roles"])
		if len(roles) == 0 {
			return errors.New("400 Parameter verification failed.\nroles: property is missing and it is not optional")
		}
		var who []aclEntry
		for _, u := range splitList(opts["users"]) {
			who = append(who, aclEntry{ugid: u})
		}
		for _, t := range splitList(opts["tokens"]) {
			who = append(who, aclEntry{ugid: t, token: true})
		}
		if len(who) == 0 {
			return errors.New("400 Parameter verification failed.\nusers: at least one of users, groups or tokens is required")
		}
		for _, r := range roles {
			if _, ok := a.rolePrivs(r); !ok {
				return fmt.Errorf("role '%s' does not exist", r)
			}
			for _, w := range who {
				a.entries = slices.DeleteFunc(a.entries, func(e aclEntry) bool {
					return e.path == path && e.token == w.token && e.ugid == w.ugid && e.role == r
				})
				if pos[1] == "modify" {
					a.entries = append(a.entries, aclEntry{path: path, token: w.token, ugid: w.ugid, role: r, propagate: opts["propagate"] != "0"})
				}
			}
		}
	case len(pos) == 4 && pos[0] == "user" && pos[1] == "token" && pos[2] == "modify":
		id := pos[3] + "!" + opts["_arg"]
		if opts["_arg"] == "" {
			return errors.New("user token modify needs USER TOKENNAME")
		}
		if _, ok := a.privsep[id]; !ok {
			return fmt.Errorf("no such token '%s'", id)
		}
		a.privsep[id] = opts["privsep"] != "0"
	default:
		return fmt.Errorf("the lab's pveum does not know %q", line)
	}
	return nil
}

func splitList(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ';' || r == ' ' })
}

// parseOpts splits "--key value" pairs from positional words; a positional word after
// four is kept as opts["_arg"] (user token modify USER NAME).
func parseOpts(args []string) ([]string, map[string]string, error) {
	var pos []string
	opts := map[string]string{}
	for i := 0; i < len(args); i++ {
		k, ok := strings.CutPrefix(args[i], "--")
		if !ok {
			if len(pos) == 4 {
				opts["_arg"] = args[i]
				continue
			}
			pos = append(pos, args[i])
			continue
		}
		if k, v, ok := strings.Cut(k, "="); ok {
			opts[k] = v
			continue
		}
		if i+1 >= len(args) {
			return nil, nil, fmt.Errorf("option --%s needs a value", k)
		}
		opts[k] = args[i+1]
		i++
	}
	return pos, opts, nil
}

// splitWords splits a shell command line on blanks, honouring single and double quotes.
func splitWords(line string) ([]string, error) {
	var out []string
	var cur strings.Builder
	inWord := false
	var quote rune
	for _, r := range line {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			cur.WriteRune(r)
		case r == '\'' || r == '"':
			quote, inWord = r, true
		case r == ' ' || r == '\t':
			if inWord {
				out = append(out, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if quote != 0 {
		return nil, fmt.Errorf("unterminated quote in %q", line)
	}
	if inWord {
		out = append(out, cur.String())
	}
	return out, nil
}

// README placeholders in the role commands, replaced by the lab's own names.
const (
	readmeUser    = "vault-agent@pve"
	readmeToken   = "vault-agent@pve!agent"
	readmeStorage = "backup"
)

// READMERole returns the pveum commands the README gives for a PVE major version
// (the shell block after the "<!-- proxmox-role:pveN -->" marker), with its
// placeholder token and storage replaced by tokenID and storage.
func READMERole(major int, tokenID, storage string) ([]string, error) {
	_, file, _, _ := runtime.Caller(0)
	f, err := os.Open(filepath.Join(filepath.Dir(file), "..", "..", "README.md"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	marker := fmt.Sprintf("<!-- proxmox-role:pve%d -->", major)
	var out []string
	state := 0 // 0 before the marker, 1 before the fence, 2 inside
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case state == 0 && line == marker:
			state = 1
		case state == 1 && strings.HasPrefix(line, "```"):
			state = 2
		case state == 2 && strings.HasPrefix(line, "```"):
			return out, nil
		case state == 2 && strings.HasPrefix(line, "pveum "):
			if storage == "" && strings.Contains(line, "/storage/"+readmeStorage) {
				continue
			}
			user, _, _ := strings.Cut(tokenID, "!")
			line = strings.ReplaceAll(line, readmeToken, tokenID)
			line = strings.ReplaceAll(line, readmeUser, user)
			line = strings.ReplaceAll(line, "/storage/"+readmeStorage, "/storage/"+storage)
			out = append(out, line)
		}
	}
	return nil, fmt.Errorf("README.md has no %s block", marker)
}

// GrantREADMERole runs the README's role commands for the fake's version, for its
// token, with storage as the snapshot storage ("" for none).
func (p *PVE) GrantREADMERole(storage string) error {
	p.mu.Lock()
	major := p.major
	p.mu.Unlock()
	cmds, err := READMERole(major, p.TokenID, storage)
	if err != nil {
		return err
	}
	for _, c := range cmds {
		if err := p.Pveum(c); err != nil {
			return fmt.Errorf("%s: %w", c, err)
		}
	}
	return nil
}
