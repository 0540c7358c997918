#!/usr/bin/env bash
# Installs what the tests and the demo need, each only when missing:
#   etcd       Debian's etcd-server (needs root and apt-get)
#   iproute2   `ip`, for network namespaces when running as root
#   iptables   keeps each simulated cluster's API server off the shared WAN,
#              and captures pods' traffic for their sidecars
#   setpriv    (util-linux) runs a pod's app and sidecar as their own users
#   staticcheck, kustomize and h2spec (the HTTP/2 conformance suite
#              TestH2Spec runs against the sidecar) into the given bin
#              directory
set -euo pipefail

bin="$1"
staticcheck_version="$2"
kustomize_version="$3"
h2spec_version="$4"
mkdir -p "${bin}"

# shellcheck source=hack/apt-install.sh
source "$(dirname "$0")/apt-install.sh"

command -v etcd >/dev/null 2>&1 || apt_install etcd etcd-server
if [[ "$(id -u)" == 0 ]]; then
	command -v ip >/dev/null 2>&1 || apt_install ip iproute2
	command -v iptables >/dev/null 2>&1 || apt_install iptables iptables
	command -v setpriv >/dev/null 2>&1 || apt_install setpriv util-linux
fi

if [[ ! -x "${bin}/staticcheck" ]] || ! "${bin}/staticcheck" -version 2>/dev/null | grep -q "(${staticcheck_version#v})"; then
	echo "install-tools: go install staticcheck ${staticcheck_version}" >&2
	if ! GOBIN="${bin}" go install "honnef.co/go/tools/cmd/staticcheck@${staticcheck_version}"; then
		echo "install-tools: could not install staticcheck ${staticcheck_version} from the Go module proxy" >&2
		exit 1
	fi
fi

if [[ ! -x "${bin}/kustomize" ]] || ! "${bin}/kustomize" version 2>/dev/null | grep -q "${kustomize_version}"; then
	echo "install-tools: go install kustomize ${kustomize_version}" >&2
	if ! GOBIN="${bin}" go install "sigs.k8s.io/kustomize/kustomize/v5@${kustomize_version}"; then
		echo "install-tools: could not install kustomize ${kustomize_version} from the Go module proxy" >&2
		exit 1
	fi
fi

# h2spec prints no release version of its own (go install's build says
# 2.0.0), so a binary there is taken as it is.
if [[ ! -x "${bin}/h2spec" ]]; then
	echo "install-tools: go install h2spec ${h2spec_version}" >&2
	if ! GOBIN="${bin}" go install "github.com/summerwind/h2spec/cmd/h2spec@${h2spec_version}"; then
		echo "install-tools: could not install h2spec ${h2spec_version} from the Go module proxy" >&2
		exit 1
	fi
fi
