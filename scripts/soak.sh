#!/usr/bin/env bash
# A long compressed-time soak of the daemon as the built binary (issue 12): the same test
# `make test` runs for 45 s, for PVA_SOAK_SECONDS (default 1800). Token periods and the
# backup schedule scale with it; Vault restarts, a bad-then-good SIGHUP, a stopped
# kube-apiserver and a kill -9 are injected throughout. Prints slots covered, snapshots,
# the longest watchdog gap and the tokens' state at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lab-bins.sh >/dev/null
secs=${PVA_SOAK_SECONDS:-1800}
PVA_SOAK_SECONDS=$secs go test -count=1 -timeout "$((secs * 2 + 600))s" -run '^TestSoak$' -v ./cmd/agent | grep -E 'soak|watchdog|PASS|FAIL|ok'
