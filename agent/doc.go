// Package agent sequences the operator-facing flows of pve-vault-agent: provision,
// install, upgrade, init, unseal, backup, restore, recover, drill, token rotation,
// status, and the daemon that runs several of them on its own.
//
// A flow is an ordered table of named steps over a state struct (steps.go): the runner
// times and logs each step, wraps its error with the step's name and records its
// result, and the printed plan comes from the same table. Steps check state before they
// act, so a re-run continues where an interrupted run stopped.
//
// Everything outside (configuration, logger, clock, keyfile source, Kubernetes, the
// Proxmox API, SSH, the Vault pods) reaches a flow through an Env built once where the
// binary is wired (cmd/agent). Waiting is done with one poll helper on the Env's clock,
// so tests can compress time. Flows that tests drive with fakes talk to the small
// interfaces they declare (podAPI for the daemon's watchers).
//
// Failures name the flow, the step and the pod or node; what the operator should do is
// carried separately (Hints) and printed on its own line. Secrets (shares, tokens, the
// kubeconfig, SSH and Proxmox credentials) never reach logs, errors or reports.
//
// It is the only package that knows provision, k8s and vault; internal/deptest keeps
// the arrows pointing one way.
package agent
