#!/usr/bin/env bash
# Prints an off-host push's throughput to the lab's S3 (SeaweedFS) beside a plain
# minio-go PutObject of the same 256 MiB file, and the push's peak RSS at 256 MiB and
# 1 GiB (issue 16). Takes about two minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lab-bins.sh >/dev/null
go run ./internal/lab/benchoffsite "$@"
