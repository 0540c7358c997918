#!/usr/bin/env bash
# Builds kube-apiserver and kube-controller-manager from the Go module proxy
# (the module in hack/tools/kube-apiserver pins the version) and caches them
# outside the clone, keyed by version, so later runs and fresh clones on the
# same machine skip the build. Prints the directory that holds them.
set -euo pipefail

KUBE_VERSION="v1.36.3"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${ISTHMUS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/isthmus}"
dir="${cache}/kube-${KUBE_VERSION}"

if [[ -x "${dir}/kube-apiserver" && -x "${dir}/kube-controller-manager" ]]; then
	echo "${dir}"
	exit 0
fi

if ! command -v go >/dev/null 2>&1; then
	echo "kube-binaries: go is not on PATH; install Go 1.26 or later" >&2
	exit 1
fi

mkdir -p "${dir}"
minor="${KUBE_VERSION#v1.}"
minor="${minor%%.*}"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=${KUBE_VERSION}"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor}"
ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"

tmp="$(mktemp -d "${dir}/.build.XXXXXX")"
trap 'rm -rf "${tmp}"' EXIT
echo "kube-binaries: building kube-apiserver and kube-controller-manager ${KUBE_VERSION} (a few minutes the first time)" >&2
start=$(date +%s)
if ! (cd "${here}/tools/kube-apiserver" && go build -trimpath -ldflags "${ldflags}" -o "${tmp}/" \
	k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager) >&2; then
	echo "kube-binaries: building kube-apiserver ${KUBE_VERSION} failed (is the Go module proxy reachable?)" >&2
	exit 1
fi
mv "${tmp}/kube-apiserver" "${tmp}/kube-controller-manager" "${dir}/"
echo "kube-binaries: built in $(( $(date +%s) - start ))s into ${dir}" >&2
echo "${dir}"
