// Package k8s owns the Kubernetes side: the Vault Helm release (Helm v3 SDK), the
// StorageClass and PersistentVolumes bound to the provisioned hostPaths, and discovery
// of Vault server pods (client-go). It imports only the standard library, Helm and
// client-go; never the agent or another domain package (enforced by internal/deptest).
package k8s
