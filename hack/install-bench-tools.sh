#!/usr/bin/env bash
# Installs what make bench-sidecar needs, each only when missing:
#   nginx      the peer proxy (Debian's)
#   h2load     the maximum-rate load generator (Debian's nghttp2-client)
#   ip, iptables  the network namespaces and the sidecar's capture in them
#   fortio     the fixed-rate load generator, into the given bin directory
set -euo pipefail

fortio_version="$2"
mkdir -p "$1"
bin="$(cd "$1" && pwd)" # go install wants GOBIN absolute
# shellcheck source=hack/apt-install.sh
source "$(dirname "$0")/apt-install.sh"

command -v nginx >/dev/null 2>&1 || apt_install nginx nginx
command -v h2load >/dev/null 2>&1 || apt_install h2load nghttp2-client
command -v ip >/dev/null 2>&1 || apt_install ip iproute2
command -v iptables >/dev/null 2>&1 || apt_install iptables iptables

# Later fortio releases need grol.io/grol versions the Go module proxy
# refuses; this one builds from the proxy alone.
if [[ ! -x "${bin}/fortio" ]] || [[ "$("${bin}/fortio" version 2>/dev/null)" != "${fortio_version#v}" ]]; then
	echo "install-tools: go install fortio ${fortio_version}" >&2
	if ! GOBIN="${bin}" go install "fortio.org/fortio@${fortio_version}"; then
		echo "install-tools: could not install fortio ${fortio_version} from the Go module proxy" >&2
		exit 1
	fi
fi
