package capture

import (
	"errors"
	"fmt"
	"net/netip"
)

// The sidecar's ports (Istio's conventions, see the architecture's Ports).
const (
	DefaultOutboundPort = 15001
	DefaultInboundPort  = 15006
	DefaultDNSPort      = 15053
	// DefaultProxyUID is the uid the sidecar runs as (Istio's 1337).
	DefaultProxyUID = 1337
)

// DefaultProxyPorts are the ports the sidecar serves itself besides the
// capture ports: admin (15000), health and merged metrics (15020), and
// readiness (15021).
var DefaultProxyPorts = []uint16{15000, 15020, 15021}

// Config says what to capture. Use DefaultConfig and change what differs:
// the zero value is not valid (it has no capture ports and no proxy uid).
type Config struct {
	// OutboundPort receives the app's outbound TCP connections (the
	// sidecar's outbound listener, on every address).
	OutboundPort uint16
	// InboundPort receives TCP connections to the pod from outside (the
	// sidecar's inbound listener, on every address).
	InboundPort uint16
	// DNSPort receives the app's DNS queries, UDP and TCP to port 53, on
	// 127.0.0.1 (::1 for IPv6). Zero leaves DNS alone.
	DNSPort uint16
	// DNSServers narrows DNS capture to queries sent to these addresses
	// (Istio's default: the resolv.conf servers, so a local dnsmasq can
	// still reach its upstreams). Empty captures port 53 to any address.
	DNSServers []netip.Addr

	// ProxyUIDs and ProxyGIDs identify the sidecar's own processes: their
	// connections and queries are never captured, or the sidecar would
	// capture itself. At least one uid or gid is required.
	ProxyUIDs []uint32
	ProxyGIDs []uint32

	// ProxyPorts are inbound ports the sidecar serves itself; connections
	// to them, and to the capture ports, are never captured.
	ProxyPorts []uint16
	// ExcludeInboundPorts are further inbound ports that reach the app
	// directly.
	ExcludeInboundPorts []uint16
	// ExcludeOutboundPorts are destination ports the app reaches directly.
	ExcludeOutboundPorts []uint16
	// ExcludeOutboundCIDRs are destinations the app reaches directly.
	ExcludeOutboundCIDRs []netip.Prefix

	// IPv6 captures IPv6 as well (ip6tables). Without it inbound IPv6 is
	// refused (ChainInput6Block) and the app's outbound IPv6 goes direct,
	// and IPv6 DNS servers and CIDRs are an error.
	IPv6 bool
}

// DefaultConfig is Istio's default capture: all inbound and outbound TCP
// except the sidecar's own, and DNS to any server, for a sidecar running
// as uid and gid 1337.
func DefaultConfig() Config {
	return Config{
		OutboundPort: DefaultOutboundPort,
		InboundPort:  DefaultInboundPort,
		DNSPort:      DefaultDNSPort,
		ProxyUIDs:    []uint32{DefaultProxyUID},
		ProxyGIDs:    []uint32{DefaultProxyUID},
		ProxyPorts:   append([]uint16(nil), DefaultProxyPorts...),
	}
}

// maxID is (uid_t)-1, which the kernel never gives a process.
const maxID = 1<<32 - 1

// Validate reports every problem of c at once.
func (c Config) Validate() error {
	var errs []error
	if c.OutboundPort == 0 {
		errs = append(errs, errors.New("outbound capture port: 0 is not a port"))
	}
	if c.InboundPort == 0 {
		errs = append(errs, errors.New("inbound capture port: 0 is not a port"))
	}
	if c.OutboundPort != 0 && c.OutboundPort == c.InboundPort {
		errs = append(errs, fmt.Errorf("inbound and outbound capture ports are both %d: the sidecar could not tell the directions apart", c.InboundPort))
	}
	if c.DNSPort != 0 && (c.DNSPort == c.InboundPort || c.DNSPort == c.OutboundPort) {
		errs = append(errs, fmt.Errorf("DNS capture port %d is also a TCP capture port", c.DNSPort))
	}
	if c.DNSPort == 0 && len(c.DNSServers) > 0 {
		errs = append(errs, errors.New("DNS servers are given but DNS capture is off (DNS port 0)"))
	}
	for _, a := range c.DNSServers {
		switch {
		case !a.IsValid():
			errs = append(errs, errors.New("DNS server: empty address"))
		case a.Zone() != "":
			errs = append(errs, fmt.Errorf("DNS server %s: iptables cannot match an address with a zone", a))
		case a.Is4In6():
			errs = append(errs, fmt.Errorf("DNS server %s: write IPv4-mapped addresses as IPv4 (%s)", a, a.Unmap()))
		case a.Is6() && !c.IPv6:
			errs = append(errs, fmt.Errorf("DNS server %s is IPv6 but IPv6 capture is off", a))
		}
	}
	if len(c.ProxyUIDs) == 0 && len(c.ProxyGIDs) == 0 {
		errs = append(errs, errors.New("no proxy uid or gid: the sidecar's own traffic would be captured in a loop"))
	}
	for _, id := range c.ProxyUIDs {
		if id == maxID {
			errs = append(errs, fmt.Errorf("proxy uid %d is not a uid", id))
		}
	}
	for _, id := range c.ProxyGIDs {
		if id == maxID {
			errs = append(errs, fmt.Errorf("proxy gid %d is not a gid", id))
		}
	}
	for _, l := range []struct {
		name  string
		ports []uint16
	}{{"proxy ports", c.ProxyPorts}, {"excluded inbound ports", c.ExcludeInboundPorts}, {"excluded outbound ports", c.ExcludeOutboundPorts}} {
		for _, p := range l.ports {
			if p == 0 {
				errs = append(errs, fmt.Errorf("%s: 0 is not a port", l.name))
			}
		}
	}
	for _, p := range c.ExcludeOutboundCIDRs {
		switch {
		case !p.IsValid():
			errs = append(errs, errors.New("excluded outbound CIDR: empty prefix"))
		case p.Addr().Zone() != "":
			errs = append(errs, fmt.Errorf("excluded outbound CIDR %s: iptables cannot match an address with a zone", p))
		case p.Addr().Is4In6():
			errs = append(errs, fmt.Errorf("excluded outbound CIDR %s: write IPv4-mapped prefixes as IPv4", p))
		case p.Addr().Is6() && !c.IPv6:
			errs = append(errs, fmt.Errorf("excluded outbound CIDR %s is IPv6 but IPv6 capture is off", p))
		}
	}
	return errors.Join(errs...)
}
