package provision

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
)

// APIError is a Proxmox API answer of 400 or more, with the reason the API puts in
// its status line ("403 Permission check failed (/vms/201, VM.Monitor)") and, for a
// 400, the per-parameter errors of its body. go-proxmox folds 401 and 403 into one
// ErrNotAuthorized and reads 595's empty body as JSON; the resolver's transport returns
// an APIError instead, so every failure keeps what Proxmox said.
type APIError struct {
	Path   string // under /api2/json, e.g. /nodes/pve1/qemu/201/status/current
	Code   int
	Reason string
	Params map[string]string
}

func (e *APIError) Error() string {
	s := fmt.Sprintf("%d %s", e.Code, e.Reason)
	if len(e.Params) > 0 {
		b, _ := json.Marshal(e.Params)
		s += " " + string(b)
	}
	return s
}

// Permission is the ACL path and privileges of a 403 ("/vms/201", "VM.Monitor"); ok is
// false when the reason is not a permission check.
func (e *APIError) Permission() (path, privs string, ok bool) {
	inner, found := strings.CutPrefix(e.Reason, "Permission check failed (")
	if e.Code != http.StatusForbidden || !found {
		return "", "", false
	}
	path, privs, ok = strings.Cut(strings.TrimSuffix(inner, ")"), ", ")
	return path, privs, ok
}

// apiTransport turns every answer of 400 or more into an *APIError before go-proxmox
// sees it. The body is read up to 64 KiB: Proxmox's error bodies are small.
type apiTransport struct {
	base     http.RoundTripper
	basePath string
}

func (t *apiTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	res, err := t.base.RoundTrip(req)
	if err != nil || res.StatusCode < 400 {
		return res, err
	}
	defer res.Body.Close()
	e := &APIError{Path: strings.TrimPrefix(req.URL.Path, t.basePath), Code: res.StatusCode,
		Reason: strings.TrimSpace(strings.TrimPrefix(res.Status, fmt.Sprint(res.StatusCode)))}
	var body struct {
		Errors map[string]string `json:"errors"`
	}
	if b, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10)); len(b) > 0 && json.Unmarshal(b, &body) == nil {
		e.Params = body.Errors
	}
	return nil, e
}

// asAPIError finds the APIError inside what http.Client and go-proxmox wrap around it.
func asAPIError(err error) (*APIError, bool) {
	var e *APIError
	if errors.As(err, &e) {
		return e, true
	}
	return nil, false
}

// get reads path into v, mapping a failure to the package's errors; node is the PVE
// node the request is proxied to ("" when none), for messages.
func (r *Resolver) get(ctx context.Context, node, path string, v any) error {
	err := r.client.Get(ctx, path, v)
	if err == nil {
		return nil
	}
	e, ok := asAPIError(err)
	if !ok {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // the URL is in the message already as the operation
		}
		return fmt.Errorf("GET %s: %w", path, err)
	}
	return r.explain(ctx, node, e)
}

// explain maps an API failure to an error that names the cause and the fix.
func (r *Resolver) explain(ctx context.Context, node string, e *APIError) error {
	user, _, _ := strings.Cut(r.tokenID, "!")
	switch {
	case e.Code == http.StatusUnauthorized:
		return fmt.Errorf("%w (%v): check proxmox.token_id (%s) and the token secret, and that the token has not expired (pveum user token list %s)", ErrUnauthorized, e, r.tokenID, user)
	case e.Code == http.StatusForbidden:
		path, privs, ok := e.Permission()
		if !ok {
			return fmt.Errorf("%w: GET %s: %v", ErrForbidden, e.Path, e)
		}
		major := r.major(ctx)
		return fmt.Errorf("%w: the token %s lacks %s on %s (Proxmox: %v); grant it the role from the README: "+
			"pveum role add %s --privs %q (or role modify if the role exists), then "+
			"pveum acl modify %s --users %s --tokens '%s' --roles %s",
			ErrForbidden, r.tokenID, strings.ReplaceAll(privs, "|", " or "), path, e,
			RoleName, strings.Join(RolePrivileges(major), " "), aclPathFor(path), user, r.tokenID, RoleName)
	case e.Code == 595 || e.Code == 596:
		where := "the PVE node that holds it"
		if node != "" {
			where = "PVE node " + node
		}
		return fmt.Errorf("%w: %s does not answer the API (%v): start it or bring it back into the cluster (pvecm status); a VM there cannot be reached until then", ErrNodeOffline, where, e)
	case strings.Contains(e.Reason, "No QEMU guest agent configured"):
		return fmt.Errorf("%w (%v): enable it in the VM's Options (qm set <vmid> --agent enabled=1, then stop and start the VM) and install qemu-guest-agent in the guest", ErrGuestAgent, e)
	case strings.Contains(e.Reason, "QEMU guest agent is not running"):
		return fmt.Errorf("%w (%v): install and start qemu-guest-agent in the VM (systemctl enable --now qemu-guest-agent)", ErrGuestAgent, e)
	case strings.Contains(e.Reason, "is not running"):
		return fmt.Errorf("%w (%v)", ErrVMStopped, e)
	case strings.HasPrefix(e.Reason, "Configuration file") && strings.Contains(e.Reason, "does not exist"):
		return fmt.Errorf("%w (%v)", ErrUnknownVM, e)
	case strings.Contains(e.Reason, "hostname lookup"):
		return fmt.Errorf("%w: %q is not a node of this Proxmox cluster (%v): set proxmox.node to this host's name as pvecm nodes lists it", ErrUnknownNode, node, e)
	}
	return fmt.Errorf("GET %s: %w", e.Path, e)
}

// aclPathFor is where the README's role is granted for a failed check: the VM or the
// storage the check named.
func aclPathFor(path string) string {
	if path == "" {
		return "/"
	}
	return path
}

// RoleName is the custom role the README creates for the agent's token.
const RoleName = "PVEVaultAgent"

// RolePrivileges is the least the agent's token needs on a PVE major version: VM.Audit
// on the node VMs (cluster resources, status/current), the guest agent's read-only
// network query (VM.Monitor on PVE 8; PVE 9 removed VM.Monitor and checks
// VM.GuestAgent.Audit), and Datastore.Audit on the snapshot storage (GET /storage and
// its status). Nothing on / or /nodes: the agent never reads cluster or node status.
func RolePrivileges(major int) []string {
	if major >= 9 {
		return []string{"VM.Audit", "VM.GuestAgent.Audit", "Datastore.Audit"}
	}
	return []string{"VM.Audit", "VM.Monitor", "Datastore.Audit"}
}

// major is the API's major version (GET /version needs no privilege), read once; 8
// when it cannot be read.
func (r *Resolver) major(ctx context.Context) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pveMajor != 0 {
		return r.pveMajor
	}
	var v struct {
		Release string `json:"release"`
	}
	if err := r.client.Get(ctx, "/version", &v); err != nil {
		return 8
	}
	var m int
	if _, err := fmt.Sscanf(v.Release, "%d", &m); err != nil || m == 0 {
		return 8
	}
	r.pveMajor = m
	return m
}
