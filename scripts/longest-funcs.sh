#!/usr/bin/env bash
# Prints the ten longest functions of the product code at a revision (default HEAD) and,
# with a second revision, at that one too: the figure issue 15's note compares.
set -euo pipefail
cd "$(dirname "$0")/.."
for rev in "${@:-HEAD}"; do
	tmp=$(mktemp -d)
	git archive "$rev" | tar -x -C "$tmp"
	echo "== $rev ($(git log -1 --format=%s "$rev" | cut -c1-60))"
	go run ./scripts/funclen "$tmp"
	rm -rf "$tmp"
done
