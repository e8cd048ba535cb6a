#!/usr/bin/env bash
# Prints backup-now's throughput beside curl and `vault operator raft snapshot save`, and
# its peak RSS at two data sizes (issue 6). Takes a few minutes: it loads Vault first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lab-bins.sh >/dev/null
command -v curl >/dev/null || { echo "bench-backup: curl is missing (make lab-bins installs it)" >&2; exit 1; }
make build >/dev/null
go run ./internal/lab/benchbackup -agent bin/pve-vault-agent "$@"
