#!/usr/bin/env bash
# Prints the daemon's restart→unsealed latency (p50/p95) and idle RSS/CPU (issue 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lab-bins.sh >/dev/null
make build >/dev/null
go run ./internal/lab/benchunseal -agent bin/pve-vault-agent "$@"
