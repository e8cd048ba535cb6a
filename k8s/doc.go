// Package k8s owns the Kubernetes side of the product: the Vault Helm release (Helm v3
// SDK, never the helm binary), the StorageClass and local PersistentVolumes bound to the
// provisioned hostPaths (client-go server-side apply), and the Vault server pods
// (discovery, waiting, rolling an OnDelete StatefulSet one pod at a time).
//
// Invariants: re-installing with the same chart and values makes no new revision; a
// user value that contradicts an enforced one is reported, never overwritten; a pod
// that does not come up is named with the reason (unbound PVC, unschedulable …).
//
// It imports only the standard library, Helm and client-go; never the agent or another
// domain package (enforced by internal/deptest).
package k8s
