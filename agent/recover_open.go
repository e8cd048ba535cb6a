package agent

import "fmt"

// openFacts is what recover reads before deciding how to open the first pod: its seal
// state, the clusters that answer, and the files an interrupted recover left.
type openFacts struct {
	// First pod (the one a restore goes into).
	Initialized, Sealed bool
	// ClusterID of the first pod when it is unsealed.
	ClusterID string
	// OursOpen: some pod is unsealed with the keyfile's cluster id (an HA cluster that
	// survived, or a restore already completed and unsealed).
	OursOpen bool
	// KeyfileCluster is the keyfile's cluster id.
	KeyfileCluster string
	// Throwaway: a sealed throwaway keyfile exists (an interrupted recover), whose
	// cluster is ThrowawayCluster.
	Throwaway        bool
	ThrowawayCluster string
	// PendingInit: a throwaway init was started and its keys never reached the disk (a
	// kill -9 inside the one window an interruption cannot be deferred through).
	PendingInit bool
}

// openAction is how recover opens the first pod.
type openAction string

const (
	openOurs            openAction = "ours"             // the cluster's own data is open: no restore
	openUnsealOurs      openAction = "unseal-ours"      // sealed, initialised, not a throwaway: try the keyfile
	openResume          openAction = "resume"           // the throwaway cluster is open: restore into it
	openUnsealThrowaway openAction = "unseal-throwaway" // sealed throwaway: its keys, or (rejected) the restore happened
	openThrowawayInit   openAction = "throwaway-init"   // empty: initialise a throwaway cluster
	openWipeLost        openAction = "wipe-lost"        // our own throwaway whose keys were never stored: wipe it, start again
	openRefuse          openAction = "refuse"           // another cluster's data: never overwritten
)

// decideOpen is recover's decision, pure so it can be table-tested: it never overwrites
// data that is neither the keyfile's cluster nor the agent's own throwaway.
func decideOpen(f openFacts) (openAction, string) {
	switch {
	case f.OursOpen:
		return openOurs, "the cluster opens with the keyfile: no restore needed"
	case !f.Initialized:
		return openThrowawayInit, "the first pod is empty: a throwaway cluster receives the snapshot"
	case !f.Sealed && f.KeyfileCluster != "" && f.ClusterID == f.KeyfileCluster:
		return openOurs, "the first pod is open with the keyfile's cluster: no restore needed"
	case !f.Sealed && f.Throwaway && f.ClusterID != "" && f.ClusterID == f.ThrowawayCluster:
		return openResume, "the throwaway cluster of an interrupted recover is open: resuming"
	case !f.Sealed:
		return openRefuse, fmt.Sprintf("the first pod is open with cluster %s, which is neither the keyfile's (%s) nor a throwaway of the agent's", f.ClusterID, f.KeyfileCluster)
	case f.Throwaway:
		return openUnsealThrowaway, "sealed with an interrupted recover's throwaway keys on file"
	case f.PendingInit:
		return openWipeLost, "an interrupted recover initialised a throwaway cluster whose keys were never stored"
	}
	return openUnsealOurs, "initialised and sealed: trying the keyfile"
}
