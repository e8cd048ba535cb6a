#!/bin/sh
# Configuration (/etc/pve-vault-agent) and state (/var/lib/pve-vault-agent: the sealed
# keyfile and the snapshots) are kept on removal and purge alike: deleting them could
# lose the only way back into Vault. Remove them by hand when you mean it.
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
