package dns

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	mdns "github.com/miekg/dns"
)

// ClustersetZone is the zone the proxy answers for on its own: a name
// under it that is not in the table does not exist (NXDOMAIN), and is
// never asked of the cluster DNS.
const ClustersetZone = "clusterset.local."

// entry is one name of the table.
type entry struct {
	addr netip.Addr
	// ip is addr as the 4 or 16 bytes an A or AAAA record carries, made
	// once per table; answers share it read-only.
	ip net.IP
}

// table is an immutable name table; SetTable swaps in a new one whole.
type table struct {
	// hosts maps canonical names (lower case, fully qualified) to
	// their addresses.
	hosts map[string]entry
	// ents are the names under ClustersetZone that have table names
	// below them without being in the table themselves (empty
	// non-terminals). They get NODATA, not NXDOMAIN: a resolver that
	// treats NXDOMAIN as "nothing below exists" (RFC 8020) would
	// otherwise lose every service under ns.svc.clusterset.local once
	// someone asked for that name.
	ents map[string]struct{}
	// soa is the zone's SOA record, in the authority section of
	// negative answers under ClustersetZone so they can be cached for
	// its minimum TTL (RFC 2308).
	soa *mdns.SOA
}

// newTable validates and normalizes in. Every problem is reported at once,
// and any problem means no table.
func newTable(in map[string]netip.Addr, serial uint32, negativeTTL uint32) (*table, error) {
	t := &table{
		hosts: make(map[string]entry, len(in)),
		ents:  make(map[string]struct{}),
		soa: &mdns.SOA{
			Hdr: mdns.RR_Header{Name: ClustersetZone, Rrtype: mdns.TypeSOA, Class: mdns.ClassINET, Ttl: negativeTTL},
			// The names are placeholders: nobody can query the zone
			// but the pod behind this proxy.
			Ns:      "ns.dns." + ClustersetZone,
			Mbox:    "hostmaster." + ClustersetZone,
			Serial:  serial,
			Refresh: 7200,
			Retry:   1800,
			Expire:  86400,
			Minttl:  negativeTTL,
		},
	}
	names := make([]string, 0, len(in))
	for name := range in {
		names = append(names, name)
	}
	slices.Sort(names) // errors in a stable order
	var errs []error
	for _, name := range names {
		addr := in[name]
		canon, err := canonicalName(name, 2)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !addr.IsValid() || addr.IsUnspecified() {
			errs = append(errs, fmt.Errorf("name %q: address %q is not a usable IP address", name, addr))
			continue
		}
		addr = addr.Unmap().WithZone("")
		if prev, dup := t.hosts[canon]; dup && prev.addr != addr {
			errs = append(errs, fmt.Errorf("name %q: %s and %s both claimed (names are case-insensitive)", canon, prev.addr, addr))
			continue
		}
		t.hosts[canon] = entry{addr: addr, ip: net.IP(addr.AsSlice())}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("dns table: %w", errors.Join(errs...))
	}
	for name := range t.hosts {
		for p := parent(name); p != "" && under(p, ClustersetZone); p = parent(p) {
			if _, ok := t.hosts[p]; !ok {
				t.ents[p] = struct{}{}
			}
		}
	}
	return t, nil
}

// canonicalName returns name lower case and fully qualified, or an error
// if it is not a plain name of at least minLabels labels: no wildcards,
// escapes or spaces.
func canonicalName(name string, minLabels int) (string, error) {
	canon := strings.ToLower(strings.TrimSpace(name))
	if canon != "" && !strings.HasSuffix(canon, ".") {
		canon += "."
	}
	switch {
	case canon == "" || canon == ".":
		return "", fmt.Errorf("name %q: empty", name)
	case strings.ContainsAny(canon, "*"):
		return "", fmt.Errorf("name %q: wildcards are not supported", name)
	case strings.ContainsAny(canon, "\\ \t\"();@$"):
		return "", fmt.Errorf("name %q: not a host name", name)
	}
	labels, ok := mdns.IsDomainName(canon)
	if !ok {
		return "", fmt.Errorf("name %q: not a valid domain name", name)
	}
	if labels < minLabels {
		return "", fmt.Errorf("name %q: fewer than %d labels", name, minLabels)
	}
	return canon, nil
}

// parent returns name without its first label, "" for the root. name is
// fully qualified and has no escapes (table names never do).
func parent(name string) string {
	i := strings.IndexByte(name, '.')
	if i < 0 || i == len(name)-1 {
		return ""
	}
	return name[i+1:]
}

// under reports whether name lies strictly below zone. Both are fully
// qualified and lower case; name may hold escapes (it comes from the
// wire), so the dot before zone must be a real label boundary, not "\.".
func under(name, zone string) bool {
	n := len(name) - len(zone)
	if n < 2 || name[n-1] != '.' || name[n:] != zone {
		return false
	}
	backslashes := 0
	for i := n - 2; i >= 0 && name[i] == '\\'; i-- {
		backslashes++
	}
	return backslashes%2 == 0
}

// inZone reports whether name is zone or lies below it.
func inZone(name, zone string) bool {
	return name == zone || under(name, zone)
}
