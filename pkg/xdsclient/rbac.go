package xdsclient

import (
	"net/netip"
	"regexp"
	"strings"
)

// The inbound side's RBAC filters, decoded into one small tree with one
// evaluator: a chain's envoy.filters.network.rbac, decided once per
// connection after the TLS handshake by the caller's SPIFFE ID, the
// connection's peer address and its original destination address and
// port; and an inbound HTTP connection manager's envoy.filters.http.rbac,
// decided per request by those and the request's method, authority, path
// and headers. Regexes are compiled and address ranges parsed at decode
// time; evaluating allocates nothing.

// maxRBACDepth bounds the nesting of and_rules, or_rules and not_rule
// (and_ids, or_ids, not_id): a permission or principal at the top of a
// policy is at depth 1. Deeper is refused, so evaluation recurses a
// bounded number of times whatever a server sends.
const maxRBACDepth = 16

// NetworkRBAC is an inbound chain's envoy.filters.network.rbac filters,
// in Istio's order: at most one with action DENY, then at most one with
// action ALLOW. A chain without RBAC filters has a nil *NetworkRBAC.
type NetworkRBAC struct {
	// Deny is the DENY filter's rules; nil when there is none.
	Deny *RBACRules
	// Allow is the ALLOW filter's rules; nil when there is none.
	Allow *RBACRules
}

// Allows reports whether the connection c may go on, by Envoy's
// rules: denied when a DENY policy matches; then, when there is an ALLOW
// filter, denied unless one of its policies matches (an ALLOW filter
// without policies denies everything). It reads c's ID, Port, PeerIP and
// DestinationIP. A nil r allows everything.
func (r *NetworkRBAC) Allows(c *RBACRequest) bool {
	if r == nil {
		return true
	}
	return decide(r.Deny, r.Allow, c)
}

// HTTPRBAC is an inbound HTTP connection manager's envoy.filters.http.rbac
// filters, before its router, in Istio's order: at most one with action
// DENY, then at most one with action ALLOW. A connection manager without
// them has a nil *HTTPRBAC.
type HTTPRBAC struct {
	// Deny is the DENY filter's rules; nil when there is none.
	Deny *RBACRules
	// Allow is the ALLOW filter's rules; nil when there is none.
	Allow *RBACRules
}

// Allows reports whether the request req may go on, by Envoy's rules, as
// NetworkRBAC.Allows does for a connection. A nil r allows everything.
func (r *HTTPRBAC) Allows(req *RBACRequest) bool {
	if r == nil {
		return true
	}
	return decide(r.Deny, r.Allow, req)
}

// decide is Envoy's decision: denied when a DENY policy matches; then,
// when there is an ALLOW filter, denied unless one of its policies
// matches.
func decide(deny, allow *RBACRules, req *RBACRequest) bool {
	if deny != nil && deny.matches(req) {
		return false
	}
	return allow == nil || allow.matches(req)
}

// RBACRequest is what an RBAC decision reads: a connection's caller, peer
// address and original destination address and port and, for HTTP RBAC,
// one request's method, authority, path and headers. Network RBAC sets
// only ID, Port, PeerIP and DestinationIP; the other fields are read
// only by HTTP rules, which a network filter cannot have. Nothing of it
// is kept.
type RBACRequest struct {
	// ID is the caller's SPIFFE ID, the URI SAN of its verified SVID;
	// empty when there is none (a plaintext connection on a raw_buffer
	// chain): unauthenticated, which no authenticated principal matches
	// and the not_id of one does.
	ID string
	// Port is the connection's original destination port.
	Port uint16
	// PeerIP is the connection's peer address, the downstream socket's
	// remote address: what direct_remote_ip and remote_ip match (the
	// sidecar's connection managers trust no X-Forwarded-For hop, so
	// Envoy's remote address is the peer's too). A caller from another
	// cluster arrives through the east-west gateway, whose address this
	// then is. The zero Addr (unknown) matches no range.
	PeerIP netip.Addr
	// DestinationIP is the connection's original destination address,
	// the address the caller dialled (SO_ORIGINAL_DST): what
	// destination_ip matches. The zero Addr (unknown) matches no range.
	DestinationIP netip.Addr
	// Method is :method (the HTTP/1.1 request line's method).
	Method string
	// Authority is :authority: the HTTP/1.1 Host, or the authority of an
	// absolute-form request target; empty when there is none.
	Authority string
	// Path is :path as received, with its query: the HTTP/1.1 request
	// target in origin form (the path and query of an absolute-form
	// one). Empty when there is none (CONNECT).
	Path string
	// Headers are the request's other header fields; nil: none.
	Headers RBACHeaders
}

// RBACHeaders are a request's header fields as an HTTP path holds them.
type RBACHeaders interface {
	// Lookup returns the values of the fields named name (lower case,
	// never a pseudo-header), joined with "," in the order received
	// ("; " for cookie, whose crumbs Envoy's header map joins so), as
	// Envoy gives them to its matchers; false when the request has none.
	// The string may be valid only until the next call.
	Lookup(name string) (string, bool)
}

// header is the value of the request's field f, or of the header name
// for HeaderOther.
func (r *RBACRequest) header(f HeaderField, name string) (string, bool) {
	switch f {
	case HeaderMethod:
		return r.Method, r.Method != ""
	case HeaderAuthority:
		return r.Authority, r.Authority != ""
	case HeaderPath:
		return r.Path, r.Path != ""
	}
	if r.Headers == nil {
		return "", false
	}
	return r.Headers.Lookup(name)
}

// RBACRules is one RBAC filter: its stat_prefix and rules.policies.
type RBACRules struct {
	// StatPrefix is a network filter's stat_prefix (required); empty for
	// an HTTP filter, which has none in the contract.
	StatPrefix string
	// Policies are rules.policies, sorted by name (a map on the wire).
	// Empty: no policy matches.
	Policies []RBACPolicy
}

func (r *RBACRules) matches(req *RBACRequest) bool {
	for i := range r.Policies {
		if r.Policies[i].matches(req) {
			return true
		}
	}
	return false
}

// RBACPolicy is one policy: it matches a connection or request when at
// least one of its permissions and at least one of its principals match.
// The decoder guarantees both lists are non-empty.
type RBACPolicy struct {
	Name        string
	Permissions []Permission
	Principals  []Principal
}

func (p *RBACPolicy) matches(req *RBACRequest) bool {
	perm := false
	for i := range p.Permissions {
		if p.Permissions[i].matches(req) {
			perm = true
			break
		}
	}
	if !perm {
		return false
	}
	for i := range p.Principals {
		if p.Principals[i].matches(req) {
			return true
		}
	}
	return false
}

// PermissionKind is which rule of the contract's subset a Permission is.
type PermissionKind uint8

// The permission rules the network and HTTP filters accept.
const (
	// PermissionAny is any: true.
	PermissionAny PermissionKind = iota + 1
	// PermissionPorts is destination_port (a range of one port) or
	// destination_port_range.
	PermissionPorts
	// PermissionAnd is and_rules: every one of Rules matches.
	PermissionAnd
	// PermissionOr is or_rules: at least one of Rules matches.
	PermissionOr
	// PermissionNot is not_rule: Rules[0] does not match.
	PermissionNot
	// PermissionHeader is header (HTTP filters only): Header matches.
	PermissionHeader
	// PermissionURLPath is url_path (HTTP filters only): URLPath matches
	// the request's path without its query and fragment.
	PermissionURLPath
	// PermissionDestinationIP is destination_ip: the connection's
	// original destination address is in CIDR.
	PermissionDestinationIP
)

// Permission is one RBAC permission of the contract's subset.
type Permission struct {
	Kind PermissionKind
	// Lo and Hi are the ports [Lo, Hi) of PermissionPorts, Hi exclusive
	// as in Envoy's Int32Range: destination_port p is [p, p+1).
	Lo, Hi uint32
	// Rules are the nested permissions of PermissionAnd, PermissionOr
	// and PermissionNot (exactly one for the latter).
	Rules []Permission
	// Header is PermissionHeader's matcher.
	Header *HeaderMatch
	// URLPath is PermissionURLPath's url_path.path.
	URLPath *StringMatch
	// CIDR is PermissionDestinationIP's range, masked.
	CIDR netip.Prefix
}

func (p *Permission) matches(req *RBACRequest) bool {
	switch p.Kind {
	case PermissionAny:
		return true
	case PermissionPorts:
		return uint32(req.Port) >= p.Lo && uint32(req.Port) < p.Hi
	case PermissionAnd:
		for i := range p.Rules {
			if !p.Rules[i].matches(req) {
				return false
			}
		}
		return true
	case PermissionOr:
		for i := range p.Rules {
			if p.Rules[i].matches(req) {
				return true
			}
		}
		return false
	case PermissionNot:
		return !p.Rules[0].matches(req)
	case PermissionHeader:
		return p.Header.matches(req)
	case PermissionURLPath:
		// Envoy's url_path: no :path matches nothing; else the path
		// without its query and fragment.
		if req.Path == "" {
			return false
		}
		return p.URLPath.Matches(URLPath(req.Path))
	case PermissionDestinationIP:
		return inRange(p.CIDR, req.DestinationIP)
	}
	return false
}

// inRange is Envoy's CidrRange.isInRange: a, IPv4-mapped IPv6 unmapped
// and its zone dropped, is in r, an IPv4 range never matching an IPv6
// address nor the other way round. The zero Addr is in no range.
func inRange(r netip.Prefix, a netip.Addr) bool {
	return r.Contains(a.Unmap().WithZone(""))
}

// URLPath is a :path without its query and fragment, as Envoy's
// PathUtil::removeQueryAndFragment.
func URLPath(path string) string {
	if i := strings.IndexAny(path, "?#"); i >= 0 {
		return path[:i]
	}
	return path
}

// HeaderField is which of a request's fields a HeaderMatch reads.
type HeaderField uint8

// The fields a header matcher can name: the pseudo-headers, which the
// request view carries apart, or any other header.
const (
	// HeaderOther is the header fields named Name.
	HeaderOther HeaderField = iota
	// HeaderMethod is :method.
	HeaderMethod
	// HeaderAuthority is :authority, and host, which Envoy's header map
	// keeps as :authority (HTTP/1.1's Host).
	HeaderAuthority
	// HeaderPath is :path, query included.
	HeaderPath
)

// HeaderMatch is a HeaderMatcher of the contract's subset: a name with
// string_match or present_match: true, and invert_match.
type HeaderMatch struct {
	// Name is name, lower-cased.
	Name string
	// Field is what Name names.
	Field HeaderField
	// Present is present_match: true: the header is there, whatever its
	// value. Otherwise Value is string_match.
	Present bool
	Value   StringMatch
	// Invert is invert_match.
	Invert bool
}

// matches is Envoy's HeaderUtility: a header the request does not have
// matches nothing, inverted or not, except present_match inverted
// (absent is what it asks); one it has matches when its value (all its
// values joined with ",") matches, or not when inverted.
func (h *HeaderMatch) matches(req *RBACRequest) bool {
	v, ok := req.header(h.Field, h.Name)
	switch {
	case !ok:
		return h.Present && h.Invert
	case h.Present:
		return !h.Invert
	}
	return h.Value.Matches(v) != h.Invert
}

// PrincipalKind is which identifier of the contract's subset a Principal
// is.
type PrincipalKind uint8

// The principal identifiers the network and HTTP filters accept.
const (
	// PrincipalAny is any: true.
	PrincipalAny PrincipalKind = iota + 1
	// PrincipalName is authenticated.principal_name: Name matches the
	// caller's SPIFFE ID, the URI SAN of its certificate; never a caller
	// without one (plaintext).
	PrincipalName
	// PrincipalAnd is and_ids: every one of IDs matches.
	PrincipalAnd
	// PrincipalOr is or_ids: at least one of IDs matches.
	PrincipalOr
	// PrincipalNot is not_id: IDs[0] does not match.
	PrincipalNot
	// PrincipalDirectRemoteIP is direct_remote_ip (Istio's source.ip,
	// ipBlocks): the connection's peer address is in CIDR.
	PrincipalDirectRemoteIP
	// PrincipalRemoteIP is remote_ip (Istio's remote.ip,
	// remoteIpBlocks): Envoy's remote address, the original client's by
	// X-Forwarded-For when the connection manager trusts hops. The
	// sidecar's trust none (xff_num_trusted_hops 0, Istio's default),
	// so it is the peer address, as for PrincipalDirectRemoteIP.
	PrincipalRemoteIP
)

// Principal is one RBAC principal of the contract's subset.
type Principal struct {
	Kind PrincipalKind
	// Name is PrincipalName's principal_name.
	Name StringMatch
	// IDs are the nested principals of PrincipalAnd, PrincipalOr and
	// PrincipalNot (exactly one for the latter).
	IDs []Principal
	// CIDR is the range of PrincipalDirectRemoteIP and
	// PrincipalRemoteIP, masked.
	CIDR netip.Prefix
}

func (p *Principal) matches(req *RBACRequest) bool {
	switch p.Kind {
	case PrincipalAny:
		return true
	case PrincipalName:
		// Envoy's authenticated matcher never matches a connection
		// without a peer certificate (a plaintext caller, id ""),
		// whatever its principal_name: not even a pattern that matches
		// the empty string (safe_regex ".*", prefix "").
		return req.ID != "" && p.Name.Matches(req.ID)
	case PrincipalAnd:
		for i := range p.IDs {
			if !p.IDs[i].matches(req) {
				return false
			}
		}
		return true
	case PrincipalOr:
		for i := range p.IDs {
			if p.IDs[i].matches(req) {
				return true
			}
		}
		return false
	case PrincipalNot:
		return !p.IDs[0].matches(req)
	case PrincipalDirectRemoteIP, PrincipalRemoteIP:
		return inRange(p.CIDR, req.PeerIP)
	}
	return false
}

// StringMatchKind is which of a StringMatcher's patterns a StringMatch
// is.
type StringMatchKind uint8

// The StringMatcher patterns the RBAC filters accept: a principal_name
// all but MatchContains, a header's or a path's all.
const (
	MatchExact StringMatchKind = iota + 1
	MatchPrefix
	MatchSuffix
	// MatchRegex is safe_regex.regex: RE2 syntax (Go's regexp), matched
	// against the whole string, as Envoy does.
	MatchRegex
	// MatchContains is contains: Value anywhere in the string.
	MatchContains
)

// StringMatch is a StringMatcher of exact, prefix, suffix, contains or
// safe_regex.
type StringMatch struct {
	Kind StringMatchKind
	// Value is the exact string, prefix, suffix or regex as sent.
	Value string
	// IgnoreCase is ignore_case (ASCII, as Envoy's); never with
	// MatchRegex.
	IgnoreCase bool

	// re is Value compiled, anchored at both ends, for MatchRegex.
	re *regexp.Regexp
}

// Matches reports whether s matches m.
func (m *StringMatch) Matches(s string) bool {
	switch m.Kind {
	case MatchExact:
		return m.equal(s, m.Value)
	case MatchPrefix:
		return len(s) >= len(m.Value) && m.equal(s[:len(m.Value)], m.Value)
	case MatchSuffix:
		return len(s) >= len(m.Value) && m.equal(s[len(s)-len(m.Value):], m.Value)
	case MatchRegex:
		return m.re.MatchString(s)
	case MatchContains:
		if !m.IgnoreCase {
			return strings.Contains(s, m.Value)
		}
		for i := 0; i+len(m.Value) <= len(s); i++ {
			if m.equal(s[i:i+len(m.Value)], m.Value) {
				return true
			}
		}
	}
	return false
}

func (m *StringMatch) equal(a, b string) bool {
	if !m.IgnoreCase {
		return a == b
	}
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		if lowerASCII(a[i]) != lowerASCII(b[i]) {
			return false
		}
	}
	return true
}

func lowerASCII(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}
