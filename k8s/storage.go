package k8s

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
	storagev1ac "k8s.io/client-go/applyconfigurations/storage/v1"
)

// FieldManager owns the objects the agent applies.
const FieldManager = "pve-vault-agent"

// Volume is the data directory of one Vault pod: ordinal i of the StatefulSet lives
// on Node at Path.
type Volume struct {
	Node string
	Path string
}

// StorageSpec describes the storage objects of one release.
type StorageSpec struct {
	Release string
	// Size is the PV capacity; it must cover server.dataStorage.size.
	Size string
	// Volumes[i] holds the data of pod <release>-i.
	Volumes []Volume
}

// StorageClassName is the no-provisioner class of a release's volumes.
func StorageClassName(namespace, release string) string {
	return fmt.Sprintf("pva-%s-%s", namespace, release)
}

// PVName is the PersistentVolume of pod ordinal i.
func PVName(namespace, release string, i int) string {
	return fmt.Sprintf("pva-%s-%s-%d", namespace, release, i)
}

// ClaimName is the PVC the chart's volumeClaimTemplate "data" makes for pod ordinal i.
func ClaimName(release string, i int) string { return fmt.Sprintf("data-%s-%d", release, i) }

// EnsureStorage applies (server-side, owned by the agent) a no-provisioner StorageClass
// and one local PersistentVolume per pod, with node affinity to its node, Retain, and a
// claimRef to the pod's PVC so pod i always lands where its data is. A PV left Released
// by a deleted PVC is made available to the new claim again. Returns the PV names.
func (c *Cluster) EnsureStorage(ctx context.Context, spec StorageSpec) ([]string, error) {
	ns := c.cfg.Namespace
	sc, pvs, err := StorageObjects(ns, spec)
	if err != nil {
		return nil, err
	}
	if _, err := c.Clients.StorageV1().StorageClasses().Apply(ctx, sc, metav1.ApplyOptions{FieldManager: FieldManager, Force: true}); err != nil {
		return nil, fmt.Errorf("apply StorageClass %s: %w", *sc.Name, err)
	}
	var names []string
	for i, pv := range pvs {
		name := *pv.Name
		if err := c.releaseStaleClaim(ctx, name, ClaimName(spec.Release, i)); err != nil {
			return nil, err
		}
		if _, err := c.Clients.CoreV1().PersistentVolumes().Apply(ctx, pv, metav1.ApplyOptions{FieldManager: FieldManager, Force: true}); err != nil {
			return nil, fmt.Errorf("apply PersistentVolume %s (node %s, %s): %w", name, spec.Volumes[i].Node, spec.Volumes[i].Path, err)
		}
		names = append(names, name)
	}
	return names, nil
}

// StorageObjects are the StorageClass and PersistentVolumes EnsureStorage applies for
// a release in namespace ns (render writes them for git).
func StorageObjects(ns string, spec StorageSpec) (*storagev1ac.StorageClassApplyConfiguration, []*corev1ac.PersistentVolumeApplyConfiguration, error) {
	size, err := resource.ParseQuantity(spec.Size)
	if err != nil {
		return nil, nil, fmt.Errorf("storage size %q: %w", spec.Size, err)
	}
	scName := StorageClassName(ns, spec.Release)
	labels := map[string]string{"app.kubernetes.io/managed-by": FieldManager, "app.kubernetes.io/instance": spec.Release, "pva.io/namespace": ns}
	sc := storagev1ac.StorageClass(scName).
		WithLabels(labels).
		WithProvisioner("kubernetes.io/no-provisioner").
		WithReclaimPolicy(corev1.PersistentVolumeReclaimRetain).
		WithVolumeBindingMode("WaitForFirstConsumer")
	var pvs []*corev1ac.PersistentVolumeApplyConfiguration
	for i, v := range spec.Volumes {
		pv := corev1ac.PersistentVolume(PVName(ns, spec.Release, i)).
			WithLabels(labels).
			WithSpec(corev1ac.PersistentVolumeSpec().
				WithCapacity(corev1.ResourceList{corev1.ResourceStorage: size}).
				WithAccessModes(corev1.ReadWriteOnce).
				WithPersistentVolumeReclaimPolicy(corev1.PersistentVolumeReclaimRetain).
				WithStorageClassName(scName).
				WithVolumeMode(corev1.PersistentVolumeFilesystem).
				WithLocal(corev1ac.LocalVolumeSource().WithPath(v.Path)).
				WithClaimRef(corev1ac.ObjectReference().WithKind("PersistentVolumeClaim").WithAPIVersion("v1").WithNamespace(ns).WithName(ClaimName(spec.Release, i))).
				WithNodeAffinity(corev1ac.VolumeNodeAffinity().WithRequired(corev1ac.NodeSelector().WithNodeSelectorTerms(
					corev1ac.NodeSelectorTerm().WithMatchExpressions(corev1ac.NodeSelectorRequirement().
						WithKey("kubernetes.io/hostname").WithOperator(corev1.NodeSelectorOpIn).WithValues(v.Node))))))
		pvs = append(pvs, pv)
	}
	return sc, pvs, nil
}

// releaseStaleClaim clears the claimRef UID of a Released PV whose PVC is gone or was
// recreated, so the (new) claim of the same name binds to it again: the data on the
// node is kept (Retain) and reused, which is the point.
func (c *Cluster) releaseStaleClaim(ctx context.Context, pvName, claim string) error {
	pv, err := c.Clients.CoreV1().PersistentVolumes().Get(ctx, pvName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read PersistentVolume %s: %w", pvName, err)
	}
	ref := pv.Spec.ClaimRef
	if ref == nil || ref.UID == "" || pv.Status.Phase != corev1.VolumeReleased {
		return nil
	}
	pvc, err := c.Clients.CoreV1().PersistentVolumeClaims(c.cfg.Namespace).Get(ctx, claim, metav1.GetOptions{})
	if err == nil && pvc.UID == ref.UID {
		return nil
	}
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("read PersistentVolumeClaim %s: %w", claim, err)
	}
	patch := []byte(`{"spec":{"claimRef":{"uid":null,"resourceVersion":null}}}`)
	if _, err := c.Clients.CoreV1().PersistentVolumes().Patch(ctx, pvName, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("make released PersistentVolume %s available again: %w", pvName, err)
	}
	c.log.Info("reusing released volume", "pv", pvName, "claim", claim)
	// The volume binder looks at a pending claim again only at its periodic resync
	// (15 s by default): touch the claim so it binds now.
	if err == nil {
		touch := []byte(fmt.Sprintf(`{"metadata":{"annotations":{"pva.io/volume-released":%q}}}`, pvName+"@"+pv.ResourceVersion))
		_, err := c.Clients.CoreV1().PersistentVolumeClaims(c.cfg.Namespace).Patch(ctx, claim, types.MergePatchType, touch, metav1.PatchOptions{})
		switch {
		case apierrors.IsForbidden(err):
			// A missing permission is said, not waited out at every rebuild.
			return fmt.Errorf("touch PersistentVolumeClaim %s so the binder binds it now: %w", claim, err)
		case err != nil && !apierrors.IsNotFound(err):
			c.log.Debug("touch claim", "claim", claim, "err", err)
		}
	}
	return nil
}

// SchedulableNodes counts nodes that accept pods (not cordoned).
func (c *Cluster) SchedulableNodes(ctx context.Context) (int, error) {
	nodes, err := c.Clients.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return 0, fmt.Errorf("list nodes: %w", err)
	}
	n := 0
	for _, node := range nodes.Items {
		if !node.Spec.Unschedulable {
			n++
		}
	}
	return n, nil
}
