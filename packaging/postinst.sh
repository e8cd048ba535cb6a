#!/bin/sh
# Make systemd see the units; never enable or start the service here: it needs a
# configuration, credentials and `pve-vault-agent init` first.
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi
if [ ! -f /etc/pve-vault-agent/config.yaml ]; then
	echo "pve-vault-agent: write /etc/pve-vault-agent/config.yaml (see /usr/share/doc/pve-vault-agent/), then: provision, install, init, and systemctl enable --now pve-vault-agent"
fi
exit 0
