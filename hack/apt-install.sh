# Sourced by the install scripts: apt_install COMMAND PACKAGE installs a
# Debian package for a missing command, or says how to when it cannot
# (not root, or no apt-get), and exits.

apt_install() {
	if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
		echo "install-tools: $1 is missing and cannot be installed automatically (needs root and apt-get): install Debian package $2" >&2
		exit 1
	fi
	echo "install-tools: installing $2 with apt-get" >&2
	if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2"; } >/tmp/isthmus-apt.log 2>&1; then
		echo "install-tools: apt-get install $2 failed; see /tmp/isthmus-apt.log" >&2
		tail -5 /tmp/isthmus-apt.log >&2
		exit 1
	fi
}
