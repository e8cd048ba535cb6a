// Package agent sequences the operator-facing flows (provision, install, init, unseal,
// backup, recover, and the daemon) as ordered, named steps that check state before
// acting. It composes the domain packages (provision, k8s, vault) through small
// interfaces it declares itself, and is the only package that knows all of them.
//
// It is filled flow by flow as the issues land; the dependency rules it lives under are
// enforced by internal/deptest.
package agent
