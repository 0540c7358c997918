package xdsclient

import (
	"net/netip"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Addresses in RBAC, as Istio writes them from an AuthorizationPolicy:
// direct_remote_ip (source.ip, ipBlocks) and remote_ip (remote.ip,
// remoteIpBlocks) principals, destination_ip (destination.ip)
// permissions, each a CidrRange.

func cidr(addr string, bits uint32) *corev3.CidrRange {
	return &corev3.CidrRange{AddressPrefix: addr, PrefixLen: wrapperspb.UInt32(bits)}
}

func prinDirectIP(addr string, bits uint32) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_DirectRemoteIp{DirectRemoteIp: cidr(addr, bits)}}
}

func prinRemoteIP(addr string, bits uint32) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_RemoteIp{RemoteIp: cidr(addr, bits)}}
}

// prinSourceIP is the deprecated source_ip, which the decoder refuses.
func prinSourceIP(addr string, bits uint32) *rbacv3.Principal {
	//lint:ignore SA1019 the deprecated principal is what must be refused
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_SourceIp{SourceIp: cidr(addr, bits)}}
}

func permDestIP(addr string, bits uint32) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationIp{DestinationIp: cidr(addr, bits)}}
}

// The three decode, on network and HTTP filters alike, wherever a
// principal or permission can be, to ranges masked as Envoy masks them;
// an IPv4-mapped range of /96 or more is its IPv4 range.
func TestSidecarDecodeRBACAddresses(t *testing.T) {
	m := newSidecarMutable(t)
	withRBAC(m, 1, rbacFilter(t, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
		"p": rbacPolicy(perms(permAnd(permDestIP("10.0.0.1", 32), permNot(permDestIP("fd00::", 8)))),
			prinOr(prinDirectIP("10.1.2.3", 8), prinNot(prinRemoteIP("::ffff:192.168.1.0", 120)), prinAnd(prinAny(), prinRemoteIP("2001:db8::", 0)))),
	}))
	withHTTPRBAC(t, m, 0, httpRBACFilter(t, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{
		"p": rbacPolicy(perms(permOr(permDestIP("::ffff:10.0.0.0", 80), permDestIP("0.0.0.0", 0))), prinRemoteIP("127.0.0.1", 32)),
	}))
	cfg, err := m.decode(t)
	require.NoError(t, err)

	pfx := netip.MustParsePrefix
	require.Equal(t, &RBACRules{StatPrefix: "tcp.", Policies: []RBACPolicy{{Name: "p",
		Permissions: []Permission{{Kind: PermissionAnd, Rules: []Permission{
			{Kind: PermissionDestinationIP, CIDR: pfx("10.0.0.1/32")},
			{Kind: PermissionNot, Rules: []Permission{{Kind: PermissionDestinationIP, CIDR: pfx("fd00::/8")}}},
		}}},
		Principals: []Principal{{Kind: PrincipalOr, IDs: []Principal{
			{Kind: PrincipalDirectRemoteIP, CIDR: pfx("10.0.0.0/8")},
			{Kind: PrincipalNot, IDs: []Principal{{Kind: PrincipalRemoteIP, CIDR: pfx("192.168.1.0/24")}}},
			{Kind: PrincipalAnd, IDs: []Principal{{Kind: PrincipalAny}, {Kind: PrincipalRemoteIP, CIDR: pfx("::/0")}}},
		}}},
	}}}, cfg.Sidecar.Inbound.Chains[1].RBAC.Allow)
	require.Equal(t, &RBACRules{Policies: []RBACPolicy{{Name: "p",
		Permissions: []Permission{{Kind: PermissionOr, Rules: []Permission{
			// Shorter than /96: an IPv6 range (masked, its ffff gone),
			// which no IPv4 address is in.
			{Kind: PermissionDestinationIP, CIDR: pfx("::/80")},
			{Kind: PermissionDestinationIP, CIDR: pfx("0.0.0.0/0")},
		}}},
		Principals: []Principal{{Kind: PrincipalRemoteIP, CIDR: pfx("127.0.0.1/32")}},
	}}}, cfg.Sidecar.Inbound.Chains[0].HTTP.RBAC.Deny)
}

// Each bad range is refused with the field that says it, on either kind
// of filter; so is the deprecated source_ip.
func TestSidecarDecodeRefusesRBACAddresses(t *testing.T) {
	const (
		netPolicy  = `listener "inbound": filter_chains[0].filters[0].typed_config.rules.policies["p"].`
		httpPolicy = `listener "inbound": filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.rules.policies["p"].`
	)
	for _, tc := range []struct {
		name string
		perm *rbacv3.Permission
		prin *rbacv3.Principal
		want string // after the policy's path
	}{
		{"CIDR notation", nil, prinDirectIP("10.0.0.0/8", 8), `principals[0].direct_remote_ip.address_prefix: "10.0.0.0/8" is not an IP address`},
		{"a name", nil, prinRemoteIP("localhost", 32), `principals[0].remote_ip.address_prefix: "localhost" is not an IP address`},
		{"empty", nil, &rbacv3.Principal{Identifier: &rbacv3.Principal_RemoteIp{RemoteIp: &corev3.CidrRange{}}}, `principals[0].remote_ip.address_prefix: "" is not an IP address`},
		{"leading zeros", nil, prinDirectIP("010.0.0.1", 32), `principals[0].direct_remote_ip.address_prefix: "010.0.0.1" is not an IP address`},
		{"zone", nil, prinDirectIP("fe80::1%eth0", 128), `principals[0].direct_remote_ip.address_prefix: "fe80::1%eth0" is not an IP address`},
		{"IPv4 /33", nil, prinDirectIP("10.0.0.0", 33), `principals[0].direct_remote_ip.prefix_len: 33 is more than the 32 bits of an IPv4 address_prefix`},
		{"IPv6 /129", nil, prinRemoteIP("fd00::", 129), `principals[0].remote_ip.prefix_len: 129 is more than the 128 bits of an IPv6 address_prefix`},
		{"nested in not_id and or_ids", nil, prinNot(prinOr(prinAny(), prinDirectIP("10.0.0.0", 40))),
			`principals[0].not_id.or_ids.ids[1].direct_remote_ip.prefix_len: 40 is more than the 32 bits of an IPv4 address_prefix`},
		{"destination_ip", permDestIP("10.0.0.x", 32), nil, `permissions[0].destination_ip.address_prefix: "10.0.0.x" is not an IP address`},
		{"destination_ip /33 in and_rules", permAnd(permAny(), permDestIP("10.0.0.1", 33)), nil,
			`permissions[0].and_rules.rules[1].destination_ip.prefix_len: 33 is more than the 32 bits of an IPv4 address_prefix`},
		{"source_ip", nil, prinSourceIP("10.0.0.0", 8),
			`principals[0].source_ip: is deprecated and not supported (use direct_remote_ip)`},
		{"source_ip in and_ids", nil, prinAnd(prinAny(), prinSourceIP("10.0.0.0", 8)),
			`principals[0].and_ids.ids[1].source_ip: is deprecated and not supported (use direct_remote_ip)`},
	} {
		perm, prin := tc.perm, tc.prin
		if perm == nil {
			perm = permAny()
		}
		if prin == nil {
			prin = prinAny()
		}
		policies := map[string]*rbacv3.Policy{"p": rbacPolicy(perms(perm), prin)}
		t.Run(tc.name+", network", func(t *testing.T) {
			m := newSidecarMutable(t)
			withRBAC(m, 0, rbacFilter(t, rbacv3.RBAC_ALLOW, policies))
			requireNACK(t, m, netPolicy+tc.want)
		})
		t.Run(tc.name+", HTTP", func(t *testing.T) {
			m := newSidecarMutable(t)
			withHTTPRBAC(t, m, 0, httpRBACFilter(t, rbacv3.RBAC_DENY, policies))
			requireNACK(t, m, httpPolicy+tc.want)
		})
	}
	// A field of CidrRange's the contract does not name cannot be
	// written: it has only the two.
	require.Equal(t, 2, (&corev3.CidrRange{}).ProtoReflect().Descriptor().Fields().Len())
}

// The evaluator matches ranges as Envoy's CidrRange does: IPv4 and IPv6
// apart, IPv4-mapped addresses as the IPv4 ones they map, zones
// ignored, an unknown address in no range.
func TestRBACAddressMatching(t *testing.T) {
	addr := netip.MustParseAddr
	for _, tc := range []struct {
		name     string
		addr     string
		bits     uint32
		in, out  []string
		mappedIn bool // the range's IPv4 addresses, mapped, are in too
	}{
		{"IPv4 /8", "10.0.0.0", 8, []string{"10.0.0.0", "10.255.255.255", "10.1.2.3", "::ffff:10.1.2.3"}, []string{"11.0.0.0", "9.255.255.255", "::a00:1", "fd00::a00:1"}, true},
		{"IPv4 /32", "192.168.1.7", 32, []string{"192.168.1.7", "::ffff:192.168.1.7"}, []string{"192.168.1.6", "192.168.1.8"}, true},
		{"IPv4 unmasked", "10.1.2.3", 16, []string{"10.1.0.0", "10.1.255.255"}, []string{"10.2.0.0"}, true},
		{"IPv4 /0", "0.0.0.0", 0, []string{"0.0.0.0", "255.255.255.255", "127.0.0.1", "::ffff:1.2.3.4"}, []string{"::", "::1", "2001:db8::1"}, true},
		{"IPv6 /64", "2001:db8:1:2::", 64, []string{"2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::1%eth0"}, []string{"2001:db8:1:3::1", "10.0.0.1"}, false},
		{"IPv6 /128", "::1", 128, []string{"::1"}, []string{"::2", "127.0.0.1"}, false},
		{"IPv6 /0", "::", 0, []string{"::", "2001:db8::1", "fe80::1%lo"}, []string{"10.0.0.1", "::ffff:10.0.0.1", "0.0.0.0"}, false},
		{"mapped /120 is IPv4 /24", "::ffff:192.168.1.0", 120, []string{"192.168.1.9", "::ffff:192.168.1.9"}, []string{"192.168.2.9"}, true},
		{"mapped /96 is IPv4 /0", "::ffff:0.0.0.0", 96, []string{"1.2.3.4"}, []string{"::1"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			direct := &NetworkRBAC{Allow: rbacRules(t, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permAny()), prinDirectIP(tc.addr, tc.bits))})}
			remote := &NetworkRBAC{Allow: rbacRules(t, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permAny()), prinRemoteIP(tc.addr, tc.bits))})}
			dest := &NetworkRBAC{Allow: rbacRules(t, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permDestIP(tc.addr, tc.bits)), prinAny())})}
			notDirect := &NetworkRBAC{Allow: rbacRules(t, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permAny()), prinNot(prinDirectIP(tc.addr, tc.bits)))})}
			for _, s := range tc.in {
				a := addr(s)
				require.True(t, direct.Allows(&RBACRequest{PeerIP: a}), "direct_remote_ip %s/%d has %s", tc.addr, tc.bits, s)
				require.True(t, remote.Allows(&RBACRequest{PeerIP: a}), "remote_ip %s/%d has %s", tc.addr, tc.bits, s)
				require.True(t, dest.Allows(&RBACRequest{DestinationIP: a}), "destination_ip %s/%d has %s", tc.addr, tc.bits, s)
				require.False(t, dest.Allows(&RBACRequest{PeerIP: a}), "destination_ip reads the destination, not the peer")
				require.False(t, direct.Allows(&RBACRequest{DestinationIP: a}), "direct_remote_ip reads the peer, not the destination")
				require.False(t, notDirect.Allows(&RBACRequest{PeerIP: a}))
			}
			for _, s := range tc.out {
				a := addr(s)
				require.False(t, direct.Allows(&RBACRequest{PeerIP: a}), "direct_remote_ip %s/%d has not %s", tc.addr, tc.bits, s)
				require.False(t, remote.Allows(&RBACRequest{PeerIP: a}), "remote_ip %s/%d has not %s", tc.addr, tc.bits, s)
				require.False(t, dest.Allows(&RBACRequest{DestinationIP: a}), "destination_ip %s/%d has not %s", tc.addr, tc.bits, s)
				require.True(t, notDirect.Allows(&RBACRequest{PeerIP: a}), "not_id of the range has %s", s)
			}
			// An unknown address (the old Allows) is in no range.
			require.False(t, direct.Allows(&RBACRequest{}))
			require.False(t, direct.Allows(&RBACRequest{ID: idCaller, Port: 80}))
			require.False(t, dest.Allows(&RBACRequest{ID: idCaller, Port: 80}))
			require.True(t, notDirect.Allows(&RBACRequest{ID: idCaller, Port: 80}))
		})
	}
}

// Addresses with the rest of a rule, as Istio combines them: and_ids of
// a principal and a range (from.source.principals with ipBlocks), a
// DENY on remoteIpBlocks before an ALLOW, notIpBlocks as not_id, and
// when destination.ip with a port; in HTTP RBAC with the request's
// attributes too.
func TestRBACAddressesInRules(t *testing.T) {
	const lb = "127.0.0.1"
	peer := func(id, ip string) *RBACRequest {
		return &RBACRequest{ID: id, Port: 8080, PeerIP: netip.MustParseAddr(ip)}
	}
	r := &NetworkRBAC{
		Deny: rbacRules(t, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{
			"remote": rbacPolicy(perms(permAny()), prinRemoteIP("10.9.0.0", 16)),
		}),
		Allow: rbacRules(t, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
			"caller from 10/8": rbacPolicy(perms(permAny()), prinAnd(prinExact(idCaller), prinDirectIP("10.0.0.0", 8))),
			"anyone not from 172.16/12 to 9000": rbacPolicy(perms(permAnd(permPort(9000), permDestIP("10.0.0.1", 32))),
				prinNot(prinDirectIP("172.16.0.0", 12))),
		}),
	}
	for _, c := range []struct {
		req  *RBACRequest
		want bool
	}{
		{peer(idCaller, "10.1.1.1"), true},
		{peer(idCaller, "::ffff:10.1.1.1"), true},
		{peer(idBeta, "10.1.1.1"), false},   // and_ids: the principal too
		{peer(idCaller, lb), false},         // and_ids: the range too
		{peer(idCaller, "10.9.1.1"), false}, // the DENY first
		{&RBACRequest{ID: idBeta, Port: 9000, PeerIP: netip.MustParseAddr(lb), DestinationIP: netip.MustParseAddr("10.0.0.1")}, true},
		{&RBACRequest{ID: idBeta, Port: 9000, PeerIP: netip.MustParseAddr(lb), DestinationIP: netip.MustParseAddr("10.0.0.2")}, false},
		{&RBACRequest{ID: idBeta, Port: 9000, PeerIP: netip.MustParseAddr("172.16.0.1"), DestinationIP: netip.MustParseAddr("10.0.0.1")}, false},
		{&RBACRequest{ID: idBeta, Port: 9001, PeerIP: netip.MustParseAddr(lb), DestinationIP: netip.MustParseAddr("10.0.0.1")}, false},
		{&RBACRequest{Port: 9000, DestinationIP: netip.MustParseAddr("10.0.0.1")}, true}, // unknown peer: not in 172.16/12
	} {
		require.Equal(t, c.want, r.Allows(c.req), "%s from %v to %v:%d", c.req.ID, c.req.PeerIP, c.req.DestinationIP, c.req.Port)
	}

	h, _, err := decodeHTTPRBAC(httpRBACFilter(t, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{
		"p": rbacPolicy(perms(permAnd(permPath(smPrefix("/admin/")), permDestIP("10.0.0.1", 32))), prinNot(prinRemoteIP("10.0.0.0", 8))),
	}))
	require.NoError(t, err)
	rb := &HTTPRBAC{Deny: h}
	req := func(path, from string) *RBACRequest {
		return &RBACRequest{ID: idCaller, Port: 8080, Method: "GET", Path: path, PeerIP: netip.MustParseAddr(from), DestinationIP: netip.MustParseAddr("10.0.0.1")}
	}
	require.False(t, rb.Allows(req("/admin/x", lb)))
	require.True(t, rb.Allows(req("/admin/x", "10.2.3.4")))
	require.True(t, rb.Allows(req("/public", lb)))
}

// BenchmarkNetworkRBACAllowsAddresses is one connection's decision
// against Istio's shape for ipBlocks and remoteIpBlocks: no allocation.
func BenchmarkNetworkRBACAllowsAddresses(b *testing.B) {
	r := &NetworkRBAC{
		Deny: rbacRules(b, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{
			"ns[demo]-policy[deny-remote]-rule[0]": rbacPolicy(perms(permAny()), prinOr(prinRemoteIP("192.168.0.0", 16), prinRemoteIP("fd00::", 8))),
		}),
		Allow: rbacRules(b, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
			"ns[demo]-policy[allow-pods]-rule[0]": rbacPolicy(perms(permAnd(permPort(8080), permDestIP("10.0.0.1", 32))),
				prinAnd(prinRegex(`spiffe://alpha/ns/demo/.*`), prinOr(prinDirectIP("10.0.0.0", 8), prinDirectIP("172.16.0.0", 12)))),
		}),
	}
	in := &RBACRequest{ID: idCaller, Port: 8080, PeerIP: netip.MustParseAddr("::ffff:10.2.3.4"), DestinationIP: netip.MustParseAddr("10.0.0.1")}
	out := &RBACRequest{ID: idCaller, Port: 8080, PeerIP: netip.MustParseAddr("192.168.1.1"), DestinationIP: netip.MustParseAddr("10.0.0.1")}
	require.True(b, r.Allows(in))
	require.False(b, r.Allows(out))
	b.ReportAllocs()
	for b.Loop() {
		if r.Allows(in) == r.Allows(out) {
			b.Fatal("the two decisions are the same")
		}
	}
	if a := testing.AllocsPerRun(100, func() { r.Allows(in); r.Allows(out) }); a != 0 {
		b.Fatalf("%v allocations per decision", a)
	}
}
