#!/usr/bin/env bash
# Runs every fuzz test of the module with coverage guidance, one after
# another, each for FUZZTIME (default 30s): go test -fuzz takes one
# target at a time. `make test` runs only their seed corpora.
#
# The sidecar's mesh fuzzers (FuzzH1Downstream, FuzzH1Upstream,
# FuzzH2Downstream, FuzzH2Upstream) run two sidecars and wait up to a
# stream idle timeout on many inputs, so they manage tens of inputs a
# second; new-coverage inputs are minimized for FUZZMINIMIZETIME (5s)
# instead of Go's 60s, which at that pace looks like a hang.
#
# A failing input is written under the package's testdata/fuzz/<Name>/
# and the script stops there; `go test -run '<Name>/<file>' ./<pkg>`
# replays it. FUZZ narrows the run to fuzz tests matching a regexp.
set -euo pipefail

fuzztime=${FUZZTIME:-30s}
minimize=${FUZZMINIMIZETIME:-5s}
only=${FUZZ:-.}

cd "$(dirname "$0")/.."
mapfile -t pkgs < <(grep -rl --include='*_test.go' '^func Fuzz' . | xargs -n1 dirname | sort -u)
for pkg in "${pkgs[@]}"; do
	mapfile -t names < <(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' | grep -E -- "$only" || true)
	for name in "${names[@]}"; do
		echo "fuzz: $pkg $name for $fuzztime"
		go test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" -fuzzminimizetime "$minimize" "$pkg"
	done
done
