#!/usr/bin/env bash
# Installs everything the test lab needs, idempotently:
#   - openssh-server (apt) for the sshd "node VM";
#   - the Vault server (v1.21.4, built from the Go module; test fixture only, never shipped);
#   - etcd v3.7.3, kube-apiserver and kube-controller-manager v1.37.2 from the pinned
#     wrapper modules under internal/lab/bins;
#   - SeaweedFS (weed), a real S3-compatible server for the off-host copy tests, built
#     from its module at the version in versions.env (its own go.mod, replaces included);
#   - Mailpit, a real SMTP server with an API to read what arrived (notification tests);
#   - Flux's source-controller and helm-controller (the pair Flux 2.7 ships) from the
#     pinned wrapper module internal/lab/bins/flux, and their CRDs from the modules'
#     config/crd/bases, for the GitOps tests;
#   - promtool, from Debian's prometheus package (extracted, not installed: no service),
#     for the shipped alert rules' unit tests.
# Binaries are cached outside the repository, keyed by version, in $PVA_LAB_CACHE, else
# /var/cache/pve-vault-agent-lab as root (readable by the uid-100 Vault the tests run),
# else $XDG_CACHE_HOME/pve-vault-agent-lab. internal/lab.CacheDir follows the same rule.
# A cached binary is reused; a missing one is built. Prints the cache directory last.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${PVA_LAB_CACHE:-}" ]; then cache=$PVA_LAB_CACHE
elif [ "$(id -u)" -eq 0 ]; then cache=/var/cache/pve-vault-agent-lab
else cache=${XDG_CACHE_HOME:-$HOME/.cache}/pve-vault-agent-lab; fi
# shellcheck source=../internal/lab/versions.env
. "$here/internal/lab/versions.env"
grep -q "require k8s.io/kubernetes v$KUBE_VERSION\$" "$here/internal/lab/bins/kube/go.mod" || { echo "lab-bins: internal/lab/bins/kube/go.mod does not require kubernetes v$KUBE_VERSION (versions.env)" >&2; exit 1; }
grep -q "require go.etcd.io/etcd/server/v3 v$ETCD_VERSION\$" "$here/internal/lab/bins/etcd/go.mod" || { echo "lab-bins: internal/lab/bins/etcd/go.mod does not require etcd v$ETCD_VERSION (versions.env)" >&2; exit 1; }
grep -q "github.com/fluxcd/helm-controller v$FLUX_HELM_CONTROLLER_VERSION\$" "$here/internal/lab/bins/flux/go.mod" && grep -q "github.com/fluxcd/source-controller v$FLUX_SOURCE_CONTROLLER_VERSION\$" "$here/internal/lab/bins/flux/go.mod" || { echo "lab-bins: internal/lab/bins/flux/go.mod does not require helm-controller v$FLUX_HELM_CONTROLLER_VERSION and source-controller v$FLUX_SOURCE_CONTROLLER_VERSION (versions.env)" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod

log() { printf 'lab-bins: %s\n' "$*" >&2; }
mkdir -p "$cache"

# --- apt packages -----------------------------------------------------------
need_pkgs=()
[ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
command -v ssh-keygen >/dev/null || need_pkgs+=(openssh-client)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v systemd-creds >/dev/null || need_pkgs+=(systemd)
command -v sudo >/dev/null || need_pkgs+=(sudo)
command -v curl >/dev/null || need_pkgs+=(curl)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v useradd >/dev/null || need_pkgs+=(passwd)
if [ ${#need_pkgs[@]} -gt 0 ]; then
	log "apt-get install ${need_pkgs[*]}"
	if [ "$(id -u)" -ne 0 ]; then
		log "need root to install ${need_pkgs[*]}: run 'sudo $0' once"; exit 1
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
mkdir -p /run/sshd 2>/dev/null || true

# build_to DEST_DIR CMD...: runs CMD with $out set to a fresh temp dir, then renames it
# into place so a killed build never leaves a half-filled cache entry.
build_to() {
	local dest=$1; shift
	[ -d "$dest" ] && return 0
	local tmp
	tmp=$(mktemp -d "$dest.tmp.XXXXXX")
	out=$tmp "$@"
	chmod 0755 "$tmp"
	mv -T "$tmp" "$dest"
}

# --- Vault --------------------------------------------------------------------
vault_build() {
	local src
	go mod download "github.com/hashicorp/vault@v$VAULT_VERSION"
	src="$out/src"
	cp -r "$(go env GOMODCACHE)/github.com/hashicorp/vault@v$VAULT_VERSION" "$src"
	chmod -R u+w "$src"
	# The published module zip lacks the directories these replaces point at.
	sed -i -E '/^replace github.com\/hashicorp\/vault\/(api|api\/auth\/approle|api\/auth\/kubernetes|api\/auth\/userpass|sdk) =>/d' "$src/go.mod"
	# Three compile fixes against the published sdk v0.21.0 (see shared/LAB.md).
	sed -i -E 's/^(func \(i \*IdentityStore\) activateDeduplication\(ctx context.Context, req \*logical.Request)\) error/\1, _ string) error/' "$src/vault/identity_store_util.go"
	sed -i -E 's/ActivationFunc\(ctx, nil\)/ActivationFunc(ctx, nil, "")/' "$src/vault/logical_system_activation_flags.go"
	sed -i -E 's/^(\t+)restoredKeyName, err := b\.lm\.RestorePolicy\(/\1restoredKeyName := keyName\n\1err := b.lm.RestorePolicy(/' "$src/builtin/logical/transit/path_restore.go"
	grep -q 'req \*logical.Request, _ string) error' "$src/vault/identity_store_util.go"
	grep -q 'ActivationFunc(ctx, nil, "")' "$src/vault/logical_system_activation_flags.go"
	grep -q 'restoredKeyName := keyName' "$src/builtin/logical/transit/path_restore.go"
	(cd "$src" && go build -trimpath -tags minimal -ldflags="-s -w" -o "$out/vault" .)
	rm -rf "$src"
}

# --- etcd ---------------------------------------------------------------------
etcd_build() {
	(cd "$here/internal/lab/bins/etcd" && go build -trimpath -ldflags="-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3)
}

# --- Kubernetes ---------------------------------------------------------------
kube_build() {
	local v=k8s.io/component-base/version
	(cd "$here/internal/lab/bins/kube" && go build -trimpath \
		-ldflags="-s -w -X $v.gitVersion=v$KUBE_VERSION -X $v.gitMajor=${KUBE_VERSION%%.*} -X $v.gitMinor=$(echo $KUBE_VERSION | cut -d. -f2)" \
		-o "$out/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager)
}

# module_build MODULE VERSION PACKAGE BINARY: builds a module's main package from a copy
# of its published source, with its own go.mod (replaces included).
module_build() {
	local mod=$1 ver=$2 pkg=$3 bin=$4 src="$out/src"
	go mod download "$mod@v$ver"
	cp -r "$(go env GOMODCACHE)/$mod@v$ver" "$src"
	chmod -R u+w "$src"
	(cd "$src" && go build -trimpath -ldflags="-s -w" -o "$out/$bin" "$pkg")
	rm -rf "$src"
}

# --- SeaweedFS and Mailpit ---------------------------------------------------------
weed_build() { module_build github.com/seaweedfs/seaweedfs "$SEAWEEDFS_VERSION" ./weed weed; }
mailpit_build() { module_build github.com/axllent/mailpit "$MAILPIT_VERSION" . mailpit; }

# --- Flux's controllers and CRDs --------------------------------------------------
flux_build() {
	local m
	(cd "$here/internal/lab/bins/flux" && go build -trimpath -ldflags="-s -w" -o "$out/" github.com/fluxcd/helm-controller github.com/fluxcd/source-controller)
	mkdir -p "$out/crds"
	for m in "helm-controller@v$FLUX_HELM_CONTROLLER_VERSION" "source-controller@v$FLUX_SOURCE_CONTROLLER_VERSION"; do
		(cd "$here/internal/lab/bins/flux" && go mod download "github.com/fluxcd/$m")
		cp "$(go env GOMODCACHE)/github.com/fluxcd/$m/config/crd/bases/"*.yaml "$out/crds/"
	done
	chmod 0644 "$out/crds/"*.yaml
}

# --- promtool (Debian's prometheus package, extracted) ----------------------------
promtool_fetch() {
	(cd "$out" && apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; })
	dpkg-deb -x "$out"/prometheus_*.deb "$out/root"
	cp "$out/root/usr/bin/promtool" "$out/promtool"
	"$out/promtool" --version 2>&1 | head -1 >"$out/VERSION"
	rm -rf "$out/root" "$out"/prometheus_*.deb
}

t0=$(date +%s)
[ -x "$cache/vault-$VAULT_VERSION/vault" ] || { log "building vault $VAULT_VERSION (cold: ~10 min)"; rm -rf "$cache/vault-$VAULT_VERSION"; build_to "$cache/vault-$VAULT_VERSION" vault_build; }
[ -x "$cache/etcd-$ETCD_VERSION/etcd" ] || { log "building etcd $ETCD_VERSION"; rm -rf "$cache/etcd-$ETCD_VERSION"; build_to "$cache/etcd-$ETCD_VERSION" etcd_build; }
[ -x "$cache/kube-$KUBE_VERSION/kube-apiserver" ] || { log "building kube-apiserver and kube-controller-manager $KUBE_VERSION (cold: ~10 min)"; rm -rf "$cache/kube-$KUBE_VERSION"; build_to "$cache/kube-$KUBE_VERSION" kube_build; }
[ -x "$cache/seaweedfs-$SEAWEEDFS_VERSION/weed" ] || { log "building SeaweedFS $SEAWEEDFS_VERSION (cold: ~5 min)"; rm -rf "$cache/seaweedfs-$SEAWEEDFS_VERSION"; build_to "$cache/seaweedfs-$SEAWEEDFS_VERSION" weed_build; }
[ -x "$cache/mailpit-$MAILPIT_VERSION/mailpit" ] || { log "building mailpit $MAILPIT_VERSION (cold: ~5 min)"; rm -rf "$cache/mailpit-$MAILPIT_VERSION"; build_to "$cache/mailpit-$MAILPIT_VERSION" mailpit_build; }
flux=flux-$FLUX_HELM_CONTROLLER_VERSION-$FLUX_SOURCE_CONTROLLER_VERSION
[ -x "$cache/$flux/helm-controller" ] || { log "building Flux helm-controller $FLUX_HELM_CONTROLLER_VERSION and source-controller $FLUX_SOURCE_CONTROLLER_VERSION (cold: ~9 min)"; rm -rf "$cache/$flux"; build_to "$cache/$flux" flux_build; }
[ -x "$cache/promtool/promtool" ] || { log "fetching promtool (Debian's prometheus package)"; rm -rf "$cache/promtool"; build_to "$cache/promtool" promtool_fetch; }
rm -rf "$cache"/*.tmp.* 2>/dev/null || true
log "ready in $(( $(date +%s) - t0 ))s: $cache"
echo "$cache"
