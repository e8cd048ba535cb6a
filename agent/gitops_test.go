package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
)

// fluxLab is a vaultLab whose release Flux owns: the real source-controller and
// helm-controller watch their own namespace, where the HelmRelease lives; Vault runs in
// the lab's namespace (the HelmRelease's targetNamespace), as flux-system and vault do.
type fluxLab struct {
	*vaultLab
	flux  *lab.Flux
	admin *k8s.Cluster // the lab's administrator, in the Vault namespace
	git   string       // the directory render --flux wrote (the git checkout)
}

func newFluxLab(t *testing.T, ctx context.Context, nodes int) *fluxLab {
	t.Helper()
	bins := lab.Need(t)
	cp := lab.SharedControlPlane(t)
	fx := lab.StartFlux(t, bins, cp, "fx-"+lab.RunID())
	vl := newVaultLabWith(t, labOptions{nodes: nodes, noInstall: true, configure: func(c *configs.Config) {
		c.Install.ManagedBy = configs.ManagedByFlux
		c.Install.HelmRelease = fx.Namespace + "/" + c.Chart.Release
		c.Chart.Path, c.Chart.Repository, c.Chart.Name, c.Chart.Version = "", fx.ChartRepo, "vault", "0.34.1"
	}})
	admin, err := os.ReadFile(cp.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cl, err := k8s.Connect(ctx, k8s.ClusterConfig{Kubeconfig: admin, Source: "lab admin", Namespace: vl.cfg.Chart.Namespace}, vl.log)
	if err != nil {
		t.Fatal(err)
	}
	return &fluxLab{vaultLab: vl, flux: fx, admin: cl, git: filepath.Join(vl.dir, "git")}
}

// commit renders into the git directory and applies it as kustomize-controller would.
func (fl *fluxLab) commit(t *testing.T, ctx context.Context) {
	t.Helper()
	files, err := Render(fl.cfg, RenderOptions{Flux: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := WriteRendered(fl.git, files); err != nil {
		t.Fatal(err)
	}
	rc, err := clientcmd.BuildConfigFromFlags("", lab.SharedControlPlane(t).Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"storage.yaml", "helmrepository.yaml", "helmrelease.yaml"} {
		b, err := os.ReadFile(filepath.Join(fl.git, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := lab.ApplyManifests(ctx, rc, string(b)); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
}

func (fl *fluxLab) helmRelease(t *testing.T, ctx context.Context) *k8s.HelmReleaseState {
	t.Helper()
	ns, name := fl.cfg.FluxHelmRelease()
	st, err := fl.admin.HelmRelease(ctx, ns, name)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// helmRecords are the revisions Helm keeps of the release (Flux stores them in the
// Vault namespace: storageNamespace).
func (fl *fluxLab) helmRecords(t *testing.T, ctx context.Context) []string {
	t.Helper()
	l, err := fl.cs.CoreV1().Secrets(fl.cfg.Chart.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "owner=helm,name=" + fl.cfg.Chart.Release})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, s := range l.Items {
		out = append(out, s.Labels["version"]+":"+s.Labels["status"])
	}
	return out
}

// reconcile asks helm-controller for a reconcile now (as `flux reconcile helmrelease`
// does) and waits until it has handled it; it returns the DriftDetected events of the
// HelmRelease so far.
func (fl *fluxLab) reconcile(t *testing.T, ctx context.Context) []corev1.Event {
	t.Helper()
	ns, name := fl.cfg.FluxHelmRelease()
	at := time.Now()
	if err := fl.admin.RequestReconcile(ctx, ns, name, at); err != nil {
		t.Fatal(err)
	}
	if _, err := fl.admin.WaitHelmReleaseReady(ctx, ns, name, at, 2*time.Minute); err != nil {
		t.Fatalf("reconcile: %v\n%s", err, fl.flux.Logs(30))
	}
	ev, err := fl.cs.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + name + ",reason=DriftDetected"})
	if err != nil {
		t.Fatal(err)
	}
	return ev.Items
}

// Flux owns the release: Flux installs Vault from what render --flux wrote; install and
// upgrade refuse (with managed_by: agent too, naming the owner) and apply nothing; init,
// unseal after a restart, backup, drill, restore, status and config check work as for the
// agent's own release; a chart upgrade through git restarts no pod and roll rolls them;
// recover suspends the HelmRelease, brings every rebuilt node back and resumes it, and a
// recover killed half-way leaves it suspended until a re-run resumes it. Afterwards the
// HelmRelease is Ready, helm-controller made exactly the install's and the upgrade's
// revisions, and with drift detection enabled it has nothing to correct (while an edit
// by hand to a chart object is found and corrected: the check is live). Each
// HelmRelease rule of the agent's roles is needed.
func TestFluxOwnsTheRelease(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	fl := newFluxLab(t, ctx, 3)
	cfg, env := fl.cfg, fl.env
	ns, name := cfg.FluxHelmRelease()
	if _, err := Provision(ctx, env, ProvisionOptions{}); err != nil {
		t.Fatal(err)
	}

	// Before Flux has installed anything, install refuses and applies nothing.
	_, err := Install(ctx, env, InstallOptions{})
	if !errors.Is(err, ErrManagedElsewhere) || !strings.Contains(strings.Join(Hints(err), " "), "render --flux") {
		t.Fatalf("install with managed_by flux: %v (hints %v)", err, Hints(err))
	}
	if _, err := fl.cs.StorageV1().StorageClasses().Get(ctx, k8s.StorageClassName(cfg.Chart.Namespace, cfg.Chart.Release), metav1.GetOptions{}); err == nil {
		t.Fatal("a refused install applied the StorageClass")
	}

	// Flux installs Vault from what render --flux wrote (the older chart: an upgrade
	// through git follows).
	cfg.Chart.Version = "0.33.0"
	t0 := time.Now()
	fl.commit(t, ctx)
	hr, err := fl.admin.WaitHelmReleaseReady(ctx, ns, name, time.Time{}, 3*time.Minute)
	if err != nil {
		t.Fatalf("Flux did not install the release: %v\n%s", err, fl.flux.Logs(40))
	}
	if _, err := fl.admin.WaitRunning(ctx, cfg.Chart.Release, len(cfg.Nodes), 2*time.Minute); err != nil {
		t.Fatalf("%v\n%s", err, fl.flux.Logs(20))
	}
	t.Logf("Flux installed the release (HelmRelease Ready, %s; history %v) and its pods run: %s", hr.Reason, hr.History, time.Since(t0).Round(time.Millisecond))
	owner, err := fl.admin.ReleaseOwner(ctx, cfg.Chart.Release)
	if err != nil || owner.Kind != k8s.OwnerFlux || owner.Namespace != ns || owner.Name != name {
		t.Fatalf("owner %+v: %v", owner, err)
	}
	records := fl.helmRecords(t, ctx)
	if len(records) != 1 || records[0] != "1:deployed" {
		t.Fatalf("Helm records after Flux's install: %v", records)
	}
	sts, err := fl.cs.AppsV1().StatefulSets(cfg.Chart.Namespace).Get(ctx, cfg.Chart.Release, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}

	// install and upgrade refuse, with managed_by flux and with managed_by agent, and
	// apply nothing.
	for _, managed := range []string{configs.ManagedByFlux, configs.ManagedByAgent} {
		c := *cfg
		c.Install.ManagedBy = managed
		e := NewEnv(&c, fl.log, EnvOptions{Waits: testWaits()})
		for _, opts := range []InstallOptions{{}, {RequireRelease: true}} {
			_, err := Install(ctx, e, opts)
			hints := strings.Join(Hints(err), " ")
			if !errors.Is(err, ErrManagedElsewhere) {
				t.Fatalf("managed_by %s, %+v: %v", managed, opts, err)
			}
			if managed == configs.ManagedByAgent && (!strings.Contains(err.Error(), "HelmRelease "+ns+"/"+name) || !strings.Contains(hints, "install.managed_by: flux")) {
				t.Fatalf("managed_by agent on Flux's release: %v\nhint: %s", err, hints)
			}
			if managed == configs.ManagedByFlux && !strings.Contains(hints, "backup-now") {
				t.Fatalf("upgrade hint: %s", hints)
			}
		}
		e.Close()
	}
	after, err := fl.cs.AppsV1().StatefulSets(cfg.Chart.Namespace).Get(ctx, cfg.Chart.Release, metav1.GetOptions{})
	if err != nil || after.ResourceVersion != sts.ResourceVersion || after.Generation != sts.Generation {
		t.Fatalf("a refused install changed the StatefulSet: %v", err)
	}
	if r := fl.helmRecords(t, ctx); len(r) != 1 {
		t.Fatalf("a refused install made a revision: %v", r)
	}

	// init, unseal after a restart, backup, drill: as for the agent's own release.
	if _, err := Init(ctx, env, InitOptions{}); err != nil {
		t.Fatalf("init: %v\n%s", err, tail(fl.logs.String(), 30))
	}
	kf := fl.keyfile(t)
	secret := "flux-" + lab.RunID()
	writeSecret(t, ctx, fl.leader(t, ctx), kf, secret)
	old, err := fl.cs.CoreV1().Pods(cfg.Chart.Namespace).Get(ctx, fl.pod(1), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := fl.cs.CoreV1().Pods(cfg.Chart.Namespace).Delete(ctx, fl.pod(1), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	err = lab.WaitFor(ctx, 2*time.Minute, fl.pod(1)+" back and unsealed", func(ctx context.Context) error {
		p, err := fl.cs.CoreV1().Pods(cfg.Chart.Namespace).Get(ctx, fl.pod(1), metav1.GetOptions{})
		if err != nil || p.UID == old.UID || p.Status.Phase != corev1.PodRunning {
			return errors.New("not running again yet")
		}
		res, err := Unseal(ctx, env)
		if err != nil {
			return err
		}
		for _, r := range res {
			if r.Node == fl.pod(1) && r.Error == "" && !r.Sealed {
				return nil
			}
		}
		return fmt.Errorf("not unsealed yet: %+v", res)
	})
	if err != nil {
		t.Fatal(err)
	}
	// A chart upgrade through git: Flux makes revision 2 and restarts no pod (OnDelete);
	// roll takes a snapshot, then rolls them, each unsealed again.
	uids := map[string]types.UID{}
	podList, err := fl.cs.CoreV1().Pods(cfg.Chart.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/instance=" + cfg.Chart.Release + ",component=server"})
	if err != nil || len(podList.Items) != len(cfg.Nodes) {
		t.Fatalf("%d server pods: %v", len(podList.Items), err)
	}
	for _, p := range podList.Items {
		uids[p.Name] = p.UID
	}
	cfg.Chart.Version = "0.34.1"
	t0 = time.Now()
	fl.commit(t, ctx)
	err = lab.WaitFor(ctx, 3*time.Minute, "Flux to upgrade the release", func(ctx context.Context) error {
		hr, err := fl.admin.HelmRelease(ctx, ns, name)
		if err != nil {
			return err
		}
		if hr.Ready != "True" || !hr.Observed || len(hr.History) != 2 || hr.History[0] != 2 {
			return fmt.Errorf("ready %s (%s), history %v", hr.Ready, hr.Reason, hr.History)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, fl.flux.Logs(30))
	}
	for pod, uid := range uids {
		p, err := fl.cs.CoreV1().Pods(cfg.Chart.Namespace).Get(ctx, pod, metav1.GetOptions{})
		if err != nil || p.UID != uid {
			t.Fatalf("Flux's upgrade restarted %s: %v", pod, err)
		}
	}
	t.Logf("Flux upgraded the release to chart 0.34.1 (revision 2, no pod restarted): %s", time.Since(t0).Round(time.Millisecond))
	t0 = time.Now()
	roll, err := RollPods(ctx, env)
	if err != nil || roll.Snapshot == "" || len(roll.Rolled) != len(cfg.Nodes) || roll.Rolled[len(roll.Rolled)-1] != roll.Active {
		t.Fatalf("roll after Flux's upgrade: %+v: %v\n%s", roll, err, tail(fl.logs.String(), 30))
	}
	t.Logf("roll: snapshot, then %s (active %s last): %s", strings.Join(roll.Rolled, ", "), roll.Active, time.Since(t0).Round(time.Millisecond))
	if again, err := RollPods(ctx, env); err != nil || len(again.Rolled) != 0 || again.Snapshot != "" {
		t.Fatalf("roll again: %+v: %v", again, err)
	}
	if got := readSecret(t, ctx, fl.leader(t, ctx), kf); got != secret {
		t.Fatalf("secret after the roll: %q", got)
	}

	backup, err := BackupNow(ctx, env, BackupOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := Drill(ctx, env, DrillOptions{}); err != nil {
		t.Fatalf("drill: %v %+v", err, rep)
	}

	// status and config check: Flux owns it, the HelmRelease is Ready, nothing drifted.
	st := GetStatus(ctx, env)
	if st.Owner == nil || st.Owner.Kind != k8s.OwnerFlux || st.HelmRelease == nil || st.HelmRelease.Ready != "True" || st.HelmRelease.Suspended ||
		strings.Contains(strings.ToLower(strings.Join(st.Attention, "\n")), "flux") || strings.Contains(strings.Join(st.Attention, "\n"), "drift") {
		t.Fatalf("status: owner %+v, helmrelease %+v, attention %v", st.Owner, st.HelmRelease, st.Attention)
	}
	rc, err := CheckRelease(ctx, env)
	if err != nil || len(rc.Problems) != 0 || len(rc.Drift) != 0 {
		t.Fatalf("config check: %+v: %v", rc, err)
	}
	// A configuration git does not follow (another uid) is named key by key, as an error.
	other := *cfg
	other.Vault.UID = 1000
	oenv := NewEnv(&other, fl.log, EnvOptions{Waits: testWaits()})
	rc, err = CheckRelease(ctx, oenv)
	oenv.Close()
	problems := strings.Join(rc.Problems, "\n")
	if err != nil || !strings.Contains(problems, "values drift: server.uid is 100, the agent requires 1000") ||
		!strings.Contains(problems, "server.statefulSet.securityContext.pod.runAsUser is 100, the agent requires 1000") {
		t.Fatalf("config check of a configuration git does not follow: %v\n%s", err, problems)
	}

	// Recover after every node was rebuilt, killed once half-way: the HelmRelease is
	// left suspended and said so; the re-run resumes it.
	for i := range cfg.Nodes {
		fl.rebuild(t, ctx, i)
	}
	ictx, icancel := context.WithCancel(ctx)
	ienv := NewEnv(cfg, slog.New(cancelOn{fl.log.Handler(), "recover", "restore", icancel}), EnvOptions{Waits: testWaits()})
	_, err = Recover(ictx, ienv, RecoverOptions{})
	icancel()
	ienv.Close()
	if err == nil {
		t.Fatal("the interrupted recover succeeded")
	}
	if !strings.Contains(err.Error(), "left suspended") || !strings.Contains(strings.Join(Hints(err), " "), "run the same command again") {
		t.Fatalf("interrupted recover: %v (hints %v)", err, Hints(err))
	}
	if hr := fl.helmRelease(t, ctx); !hr.Suspended {
		t.Fatal("the interrupted recover did not leave the HelmRelease suspended")
	}
	if st := GetStatus(ctx, env); !strings.Contains(strings.Join(st.Attention, "\n"), "is suspended") {
		t.Fatalf("status does not say the HelmRelease is suspended: %v", st.Attention)
	}
	t0 = time.Now()
	rep, err := Recover(ctx, env, RecoverOptions{})
	if err != nil {
		t.Fatalf("recover: %v\n%s\n%s", err, tail(fl.logs.String(), 40), fl.flux.Logs(20))
	}
	t.Logf("recover with Flux owning the release: %s; suspend: %s (%s), install: %s, resume: %s (%s)", time.Since(t0).Round(time.Millisecond),
		resultNamed(t, rep.Steps, "suspend").Result, resultNamed(t, rep.Steps, "suspend").Duration.Round(time.Millisecond),
		resultNamed(t, rep.Steps, "install").Result,
		resultNamed(t, rep.Steps, "resume").Result, resultNamed(t, rep.Steps, "resume").Duration.Round(time.Millisecond))
	if got := readSecret(t, ctx, fl.leader(t, ctx), kf); got != secret {
		t.Fatalf("secret after recover: %q", got)
	}

	// restore puts the backup back the same way: suspended, restored, resumed.
	writeSecret(t, ctx, fl.leader(t, ctx), kf, "written after the backup")
	rrep, err := Restore(ctx, env, backup.Snapshot.Path, RestoreOptions{})
	if err != nil {
		t.Fatalf("restore: %v\n%s", err, tail(fl.logs.String(), 30))
	}
	t.Logf("restore with Flux owning the release: suspend %s (%s), resume %s (%s)",
		resultNamed(t, rrep.Steps, "suspend").Result, resultNamed(t, rrep.Steps, "suspend").Duration.Round(time.Millisecond),
		resultNamed(t, rrep.Steps, "resume").Result, resultNamed(t, rrep.Steps, "resume").Duration.Round(time.Millisecond))
	if got := readSecret(t, ctx, fl.leader(t, ctx), kf); got != secret {
		t.Fatalf("secret after restore: %q", got)
	}

	// Afterwards: Ready, not suspended, the one revision of the install, nothing to
	// correct on a fresh reconcile with drift detection on.
	hr = fl.helmRelease(t, ctx)
	if hr.Suspended || hr.Ready != "True" || len(hr.History) != 2 || hr.History[0] != 2 || hr.History[1] != 1 {
		t.Fatalf("HelmRelease after recover: %+v", hr)
	}
	if drift := fl.reconcile(t, ctx); len(drift) != 0 {
		t.Fatalf("helm-controller found drift after the agent's work: %s", drift[0].Message)
	}
	if r := fl.helmRecords(t, ctx); len(r) != 2 || !slices.Contains(r, "1:superseded") || !slices.Contains(r, "2:deployed") {
		t.Fatalf("helm-controller made revisions the test did not expect: %v", r)
	}
	if strings.Contains(fl.flux.HelmControllerLog(), "DriftDetected") {
		t.Fatal("helm-controller logged a drift")
	}
	// The drift check is live: an edit by hand to a chart object is found and undone.
	svc := cfg.Chart.Release + "-internal"
	if _, err := fl.cs.CoreV1().Services(cfg.Chart.Namespace).Patch(ctx, svc, types.MergePatchType, []byte(`{"spec":{"publishNotReadyAddresses":false}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if drift := fl.reconcile(t, ctx); len(drift) == 0 {
		t.Fatalf("an edit by hand was not found: the drift check cannot fail\n%s", fl.flux.Logs(30))
	}
	if s, err := fl.cs.CoreV1().Services(cfg.Chart.Namespace).Get(ctx, svc, metav1.GetOptions{}); err != nil || !s.Spec.PublishNotReadyAddresses {
		t.Fatalf("helm-controller did not correct the edit: %v", err)
	}
	fl.assertNoSecrets(t, kf, fl.flux.Logs(1<<20))

	// Each HelmRelease rule the roles hold is needed: without it, the suspend recover
	// and restore start with is refused, naming the rule, and nothing is suspended.
	spec, err := RBACSpecFor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, role := range []string{k8s.RoleOperate, k8s.RoleInstall} {
		for i, r := range k8s.Rules(role, spec) {
			if r.Flow != "flux" {
				continue
			}
			n++
			err := withoutRule(t, ctx, fl.vaultLab, role, i, func() error { return runFlow(t, ctx, fl.vaultLab, r) })
			hints := strings.Join(Hints(err), "\n")
			if err == nil || !strings.Contains(hints, "Kubernetes refused") || !strings.Contains(hints, `resources: ["helmreleases"]`) || !strings.Contains(hints, "the "+role+" role has it") {
				t.Fatalf("without %s the suspend: %v\nhints: %s", k8s.RuleString(r), err, hints)
			}
			if fl.helmRelease(t, ctx).Suspended {
				t.Fatal("suspended without the rule")
			}
		}
	}
	if n != 2 {
		t.Fatalf("%d HelmRelease rules, want get (operate) and patch (install)", n)
	}
}
