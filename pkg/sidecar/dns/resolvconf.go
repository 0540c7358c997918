package dns

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
)

// maxNameservers is how many nameserver lines count, as in glibc (MAXNS):
// a resolv.conf that works for the app's own resolver works for the proxy.
const maxNameservers = 3

// resolvConf is what the proxy takes from a resolv.conf(5) file.
type resolvConf struct {
	// nameservers are the upstreams, in file order (port 53).
	nameservers []netip.AddrPort
	// search is the search list, as written (the last search or
	// domain line wins, as in glibc).
	search []string
}

func readResolvConf(path string) (resolvConf, error) {
	f, err := os.Open(path)
	if err != nil {
		return resolvConf{}, err
	}
	defer f.Close()
	rc, err := parseResolvConf(f)
	if err != nil {
		return resolvConf{}, fmt.Errorf("%s: %w", path, err)
	}
	return rc, nil
}

// parseResolvConf reads the nameserver, search and domain lines; other
// lines (options, sortlist) mean nothing to a forwarder. A nameserver that
// is not an IP address is an error: glibc would skip it, and a silently
// shorter upstream list is worse than a sidecar that says why it cannot
// start.
func parseResolvConf(r io.Reader) (resolvConf, error) {
	var rc resolvConf
	var errs []error
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if i := strings.IndexAny(line, "#;"); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "nameserver":
			if len(f) < 2 {
				errs = append(errs, fmt.Errorf("line %d: nameserver without an address", n))
				continue
			}
			addr, err := netip.ParseAddr(f[1])
			if err != nil {
				errs = append(errs, fmt.Errorf("line %d: nameserver %q is not an IP address", n, f[1]))
				continue
			}
			if len(rc.nameservers) < maxNameservers {
				rc.nameservers = append(rc.nameservers, netip.AddrPortFrom(addr.Unmap(), 53))
			}
		case "search":
			rc.search = searchDomains(f[1:])
		case "domain":
			rc.search = searchDomains(f[1:min(2, len(f))])
		}
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, err)
	}
	return rc, errors.Join(errs...)
}

// searchDomains are the domains of a search (or domain) line, without
// the root ".", which systemd-resolved writes when there is none and
// which glibc and the kubelet skip: searching under the root is the
// name as it is.
func searchDomains(fields []string) []string {
	var out []string
	for _, d := range fields {
		if d != "." {
			out = append(out, d)
		}
	}
	return out
}
