package xdsclient

import "regexp"

// The inbound chains' envoy.filters.network.rbac filters, decoded into a
// small tree evaluated once per connection, after the TLS handshake: by
// the caller's SPIFFE ID and the connection's original destination port,
// the only attributes a network filter of the contract's subset reads.
// Regexes are compiled at decode time; evaluating allocates nothing.

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

// Allows reports whether a connection from the caller whose SPIFFE ID is
// id to the original destination port port may go on, by Envoy's rules:
// denied when a DENY policy matches; then, when there is an ALLOW filter,
// denied unless one of its policies matches (an ALLOW filter without
// policies denies everything). A nil r allows everything.
func (r *NetworkRBAC) Allows(id string, port uint16) bool {
	if r == nil {
		return true
	}
	if r.Deny != nil && r.Deny.matches(id, port) {
		return false
	}
	return r.Allow == nil || r.Allow.matches(id, port)
}

// RBACRules is one RBAC filter: its stat_prefix and rules.policies.
type RBACRules struct {
	// StatPrefix is stat_prefix (required).
	StatPrefix string
	// Policies are rules.policies, sorted by name (a map on the wire).
	// Empty: no policy matches.
	Policies []RBACPolicy
}

func (r *RBACRules) matches(id string, port uint16) bool {
	for i := range r.Policies {
		if r.Policies[i].matches(id, port) {
			return true
		}
	}
	return false
}

// RBACPolicy is one policy: it matches a connection when at least one of
// its permissions and at least one of its principals match. The decoder
// guarantees both lists are non-empty.
type RBACPolicy struct {
	Name        string
	Permissions []Permission
	Principals  []Principal
}

func (p *RBACPolicy) matches(id string, port uint16) bool {
	perm := false
	for i := range p.Permissions {
		if p.Permissions[i].matches(port) {
			perm = true
			break
		}
	}
	if !perm {
		return false
	}
	for i := range p.Principals {
		if p.Principals[i].matches(id) {
			return true
		}
	}
	return false
}

// PermissionKind is which rule of the contract's subset a Permission is.
type PermissionKind uint8

// The permission rules the network filter accepts.
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
}

func (p *Permission) matches(port uint16) bool {
	switch p.Kind {
	case PermissionAny:
		return true
	case PermissionPorts:
		return uint32(port) >= p.Lo && uint32(port) < p.Hi
	case PermissionAnd:
		for i := range p.Rules {
			if !p.Rules[i].matches(port) {
				return false
			}
		}
		return true
	case PermissionOr:
		for i := range p.Rules {
			if p.Rules[i].matches(port) {
				return true
			}
		}
		return false
	case PermissionNot:
		return !p.Rules[0].matches(port)
	}
	return false
}

// PrincipalKind is which identifier of the contract's subset a Principal
// is.
type PrincipalKind uint8

// The principal identifiers the network filter accepts.
const (
	// PrincipalAny is any: true.
	PrincipalAny PrincipalKind = iota + 1
	// PrincipalName is authenticated.principal_name: Name matches the
	// caller's SPIFFE ID, the URI SAN of its certificate.
	PrincipalName
	// PrincipalAnd is and_ids: every one of IDs matches.
	PrincipalAnd
	// PrincipalOr is or_ids: at least one of IDs matches.
	PrincipalOr
	// PrincipalNot is not_id: IDs[0] does not match.
	PrincipalNot
)

// Principal is one RBAC principal of the contract's subset.
type Principal struct {
	Kind PrincipalKind
	// Name is PrincipalName's principal_name.
	Name StringMatch
	// IDs are the nested principals of PrincipalAnd, PrincipalOr and
	// PrincipalNot (exactly one for the latter).
	IDs []Principal
}

func (p *Principal) matches(id string) bool {
	switch p.Kind {
	case PrincipalAny:
		return true
	case PrincipalName:
		return p.Name.Matches(id)
	case PrincipalAnd:
		for i := range p.IDs {
			if !p.IDs[i].matches(id) {
				return false
			}
		}
		return true
	case PrincipalOr:
		for i := range p.IDs {
			if p.IDs[i].matches(id) {
				return true
			}
		}
		return false
	case PrincipalNot:
		return !p.IDs[0].matches(id)
	}
	return false
}

// StringMatchKind is which of a StringMatcher's patterns a StringMatch
// is.
type StringMatchKind uint8

// The StringMatcher patterns a principal_name may use.
const (
	MatchExact StringMatchKind = iota + 1
	MatchPrefix
	MatchSuffix
	// MatchRegex is safe_regex.regex: RE2 syntax (Go's regexp), matched
	// against the whole string, as Envoy does.
	MatchRegex
)

// StringMatch is a StringMatcher of exact, prefix, suffix or safe_regex.
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
