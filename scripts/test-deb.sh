#!/usr/bin/env bash
# Builds the Debian package and proves it on this machine: dpkg -i installs the binary,
# the units and the config directory without enabling or starting the service; removal
# and purge keep the configuration. Needs root (CI runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
	if [ "${CI:-}" = true ]; then echo "test-deb: CI=true needs root to dpkg -i" >&2; exit 1; fi
	echo "test-deb: skipped outside CI: needs root to dpkg -i" >&2; exit 0
fi
if dpkg -s pve-vault-agent >/dev/null 2>&1; then
	echo "test-deb: pve-vault-agent is installed on this machine already; refusing to touch it" >&2; exit 1
fi
make deb >/dev/null
deb=$(ls -t bin/pve-vault-agent_*.deb | head -n1)
had_etc=0; [ -e /etc/pve-vault-agent ] && had_etc=1
fail() { echo "test-deb: FAIL: $*" >&2; dpkg -P pve-vault-agent >/dev/null 2>&1 || true; exit 1; }

dpkg -i "$deb" >/dev/null
/usr/bin/pve-vault-agent version >/dev/null || fail "installed binary does not run"
for f in /lib/systemd/system/pve-vault-agent.service /lib/systemd/system/pve-vault-agent-backup.timer /usr/share/doc/pve-vault-agent/config.example.yaml /usr/share/doc/pve-vault-agent/values.example.yaml \
	/usr/share/pve-vault-agent/prometheus/pve-vault-agent.rules.yml /usr/share/pve-vault-agent/grafana/pve-vault-agent.json; do
	[ -f "$f" ] || fail "$f not installed"
done
[ "$(stat -c %a /etc/pve-vault-agent/credentials)" = 700 ] || fail "credential directory is not 0700"
[ ! -e /etc/systemd/system/multi-user.target.wants/pve-vault-agent.service ] || fail "the service was enabled by the package"
# The installed units load exactly the credentials the example configuration names, once
# the drop-in config check prints is in place (and not before).
cp /usr/share/doc/pve-vault-agent/config.example.yaml /etc/pve-vault-agent/config.yaml
if out=$(/usr/bin/pve-vault-agent config check 2>&1 >/dev/null); then fail "config check passed with units lacking the example's credentials"; fi
grep -q "does not load pve-token:/etc/pve-vault-agent/credentials/pve-token.cred" <<<"$out" || fail "config check did not name the missing credential: $out"
sed -n '/^mkdir -p/,/^systemctl daemon-reload/p' <<<"$out" | grep -v '^systemctl ' | sh || fail "the printed drop-in did not install"
/usr/bin/pve-vault-agent config check >/dev/null 2>&1 || fail "config check still fails with the drop-in it printed"
rm -rf /etc/systemd/system/pve-vault-agent.service.d /etc/systemd/system/pve-vault-agent-backup.service.d
echo "marker: kept" > /etc/pve-vault-agent/config.yaml
dpkg -r pve-vault-agent >/dev/null
[ ! -e /usr/bin/pve-vault-agent ] || fail "binary left after removal"
grep -q "marker: kept" /etc/pve-vault-agent/config.yaml || fail "config lost on removal"
dpkg -P pve-vault-agent >/dev/null 2>&1 || true
grep -q "marker: kept" /etc/pve-vault-agent/config.yaml || fail "config lost on purge"
rm -f /etc/pve-vault-agent/config.yaml
[ "$had_etc" = 1 ] || rm -rf /etc/pve-vault-agent
echo "test-deb: ok: $deb installs, does not enable or start the service, keeps the config on remove and purge"
