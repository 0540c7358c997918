package authz

import (
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	httprbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	securityv1beta1 "istio.io/api/security/v1beta1"
)

// NetworkFilterName and HTTPFilterName are the RBAC filters' names.
const (
	NetworkFilterName = "envoy.filters.network.rbac"
	HTTPFilterName    = "envoy.filters.http.rbac"
)

// networkStatPrefix is Istio's for the network RBAC filter.
const networkStatPrefix = "tcp."

// localAlias is the trust domain Istio's policies name the local one by.
const localAlias = "cluster.local"

// Note is something of a policy the sidecars do not enforce as written,
// and what they do instead (always what denies more).
type Note struct {
	// Policy is "namespace/name".
	Policy string
	Reason string
}

// Level is what a sidecar decides on: a connection (TCP chains) or a
// request (HTTP chains).
type Level int

const (
	// Connection is decided once per connection, from the caller's
	// SPIFFE ID and address and the destination address and port:
	// envoy.filters.network.rbac.
	Connection Level = iota
	// Request is decided per HTTP request, from those and the
	// request's method, host, path and headers: envoy.filters.http.rbac.
	Request
)

// RBAC is the RBAC of a set of policies at one level: the policies
// that refuse (from DENY policies, and CUSTOM ones, whose external
// authorizer Isthmus cannot ask) and, when any ALLOW policy is in the
// set, the ones that let through. Immutable.
type RBAC struct {
	Level Level
	// Deny and Allow are the rules of the DENY and ALLOW filters; Allow
	// is nil when no ALLOW policy applies (everything not denied is
	// allowed), and may be empty (nothing is).
	Deny, Allow map[string]*rbacv3.Policy
	// Notes are what is not enforced as written, in policy order.
	Notes []Note
}

// rules are the filters' rules, DENY first, then ALLOW (Istio's order);
// none when nothing is denied or required.
func (r *RBAC) rules() []*rbacv3.RBAC {
	var out []*rbacv3.RBAC
	if len(r.Deny) > 0 {
		out = append(out, &rbacv3.RBAC{Action: rbacv3.RBAC_DENY, Policies: r.Deny})
	}
	if r.Allow != nil {
		out = append(out, &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: r.Allow})
	}
	return out
}

// typed encodes m deterministically: the policies are a map, and the
// same policies must encode to the same bytes (the listener's version).
func typed(m proto.Message) (*anypb.Any, error) {
	a := new(anypb.Any)
	return a, anypb.MarshalFrom(a, m, proto.MarshalOptions{Deterministic: true})
}

// Filters are the network RBAC filters of a TCP chain (r at level
// Connection).
func (r *RBAC) Filters() ([]*listenerv3.Filter, error) {
	var out []*listenerv3.Filter
	for _, rules := range r.rules() {
		cfg, err := typed(&netrbacv3.RBAC{StatPrefix: networkStatPrefix, Rules: rules})
		if err != nil {
			return nil, fmt.Errorf("network RBAC %s: %w", rules.GetAction(), err)
		}
		out = append(out, &listenerv3.Filter{Name: NetworkFilterName, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: cfg}})
	}
	return out, nil
}

// HTTPFilters are the HTTP RBAC filters of an HTTP chain's connection
// manager, before its router (r at level Request).
func (r *RBAC) HTTPFilters() ([]*hcmv3.HttpFilter, error) {
	var out []*hcmv3.HttpFilter
	for _, rules := range r.rules() {
		cfg, err := typed(&httprbacv3.RBAC{Rules: rules})
		if err != nil {
			return nil, fmt.Errorf("HTTP RBAC %s: %w", rules.GetAction(), err)
		}
		out = append(out, &hcmv3.HttpFilter{Name: HTTPFilterName, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: cfg}})
	}
	return out, nil
}

// DenyAll is the RBAC at level that lets nobody through: an ALLOW
// filter without policies.
func DenyAll(level Level) *RBAC {
	return &RBAC{Level: level, Allow: map[string]*rbacv3.Policy{}}
}

// Translate is the RBAC of set at level, whose local trust domain is
// localTD (Istio's "cluster.local" in a principal names it too). A nil
// set is nil.
func Translate(set *Set, localTD string, level Level) *RBAC {
	if set == nil {
		return nil
	}
	n := &RBAC{Level: level, Deny: map[string]*rbacv3.Policy{}}
	for _, p := range set.Policies {
		t := &translator{policy: p, localTD: localTD, level: level}
		spec := p.Spec
		if _, err := proto.Marshal(spec); err != nil {
			// Nothing the API server stores, but a policy that cannot be
			// read is one whose meaning is unknown: it denies everything.
			t.note(fmt.Sprintf("cannot be read (%v): it denies every caller", err))
			n.Deny[fmt.Sprintf("ns[%s]-policy[%s]-invalid", p.Namespace, p.Name)] = &rbacv3.Policy{
				Permissions: []*rbacv3.Permission{anyPermission()}, Principals: []*rbacv3.Principal{anyPrincipal()},
			}
			n.Notes = append(n.Notes, t.notes...)
			continue
		}
		var into map[string]*rbacv3.Policy
		deny := true
		switch spec.GetAction() {
		case securityv1beta1.AuthorizationPolicy_ALLOW:
			if n.Allow == nil {
				n.Allow = map[string]*rbacv3.Policy{}
			}
			into, deny = n.Allow, false
		case securityv1beta1.AuthorizationPolicy_DENY:
			into = n.Deny
		case securityv1beta1.AuthorizationPolicy_CUSTOM:
			t.note("action CUSTOM needs an external authorizer, which Isthmus does not call: what its rules match is denied")
			into = n.Deny
		case securityv1beta1.AuthorizationPolicy_AUDIT:
			t.note("action AUDIT is not audited: the policy has no effect")
			n.Notes = append(n.Notes, t.notes...)
			continue
		default:
			t.note(fmt.Sprintf("action %d is unknown: what its rules match is denied", spec.GetAction()))
			into = n.Deny
		}
		for i, r := range spec.GetRules() {
			rp, ok := t.rule(i, r, deny)
			if ok {
				into[fmt.Sprintf("ns[%s]-policy[%s]-rule[%d]", p.Namespace, p.Name, i)] = rp
			}
		}
		n.Notes = append(n.Notes, t.notes...)
	}
	return n
}

// translator translates one policy's rules, noting what it cannot
// enforce.
type translator struct {
	policy  Policy
	localTD string
	level   Level
	notes   []Note
	// unenforced lists, for the rule being translated, the fields it
	// cannot match at its level.
	unenforced []string
}

func (t *translator) note(reason string) {
	t.notes = append(t.notes, Note{Policy: t.policy.Ref(), Reason: reason})
}

// rule is rule i; ok is false when it can never match (an ALLOW rule
// with a field a connection cannot be matched on). In a DENY rule those
// fields are left out, so the rule matches more: as Istio does for TCP.
func (t *translator) rule(i int, r *securityv1beta1.Rule, deny bool) (*rbacv3.Policy, bool) {
	t.unenforced = nil
	var principals []*rbacv3.Principal
	for _, f := range r.GetFrom() {
		principals = append(principals, t.source(f.GetSource()))
	}
	var permissions []*rbacv3.Permission
	for _, to := range r.GetTo() {
		permissions = append(permissions, t.operation(to.GetOperation()))
	}
	var whenPrincipals []*rbacv3.Principal
	var whenPermissions []*rbacv3.Permission
	for _, c := range r.GetWhen() {
		pr, pe := t.condition(c)
		if pr != nil {
			whenPrincipals = append(whenPrincipals, pr)
		}
		if pe != nil {
			whenPermissions = append(whenPermissions, pe)
		}
	}
	if len(t.unenforced) > 0 {
		// Said the same way at both levels unless a connection is why,
		// so that the same reason is one note.
		where := ""
		if slices.ContainsFunc(t.unenforced, func(s string) bool { return strings.HasSuffix(s, "("+notInConnection+")") }) {
			where = "on TCP ports, "
		}
		fields := strings.Join(t.unenforced, ", ")
		if !deny {
			t.note(fmt.Sprintf("%srule %d never matches: %s", where, i, fields))
			return nil, false
		}
		t.note(fmt.Sprintf("%srule %d is applied without %s", where, i, fields))
	}
	principal := andPrincipals(append([]*rbacv3.Principal{orPrincipals(principals)}, whenPrincipals...))
	permission := andPermissions(append([]*rbacv3.Permission{orPermissions(permissions)}, whenPermissions...))
	policy := &rbacv3.Policy{Permissions: []*rbacv3.Permission{permission}, Principals: []*rbacv3.Principal{principal}}
	if err := policy.Validate(); err != nil {
		// A value Envoy's RBAC cannot hold (a header name with a NUL,
		// say): the rule cannot be sent as written, and a listener
		// the sidecars refused would leave them on their last one.
		reason := clip(err.Error(), 200)
		if !deny {
			t.note(fmt.Sprintf("rule %d never matches: it has a value the sidecar cannot match (%s)", i, reason))
			return nil, false
		}
		t.note(fmt.Sprintf("rule %d denies every caller: it has a value the sidecar cannot match (%s)", i, reason))
		return &rbacv3.Policy{Permissions: []*rbacv3.Permission{anyPermission()}, Principals: []*rbacv3.Principal{anyPrincipal()}}, true
	}
	return policy, true
}

// clip is s cut to n bytes, with an ellipsis when cut.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "…"
}

// Why a field is not enforced.
const (
	notInConnection = "not in a connection"
	notEnforced     = "not enforced"
)

// unsupported records a field the rule cannot match, and why; the
// rule's principal or permission goes on without it.
func (t *translator) unsupported(field, why string) {
	t.unenforced = append(t.unenforced, field+" ("+why+")")
}

// source is one "from" entry: every field it sets must match.
func (t *translator) source(s *securityv1beta1.Source) *rbacv3.Principal {
	var all []*rbacv3.Principal
	add := func(field string, values []string, not bool, one func(string) *rbacv3.Principal) {
		if !t.innerStar(field, values) {
			all = appendPrincipal(all, principalOf(values, not, one))
		}
	}
	add("from.source.principals", s.GetPrincipals(), false, t.principal)
	add("from.source.notPrincipals", s.GetNotPrincipals(), true, t.principal)
	// Namespaces take a * anywhere, as Istio's (every * is a run of
	// characters); the other fields only at either end.
	add("", s.GetNamespaces(), false, namespacePrincipal)
	add("", s.GetNotNamespaces(), true, namespacePrincipal)
	add("from.source.serviceAccounts", s.GetServiceAccounts(), false, t.serviceAccount)
	add("from.source.notServiceAccounts", s.GetNotServiceAccounts(), true, t.serviceAccount)
	add("from.source.trustDomains", s.GetTrustDomains(), false, trustDomainPrincipal)
	add("from.source.notTrustDomains", s.GetNotTrustDomains(), true, trustDomainPrincipal)
	all = appendPrincipal(all, t.addresses("from.source.ipBlocks", s.GetIpBlocks(), false, directRemoteIP))
	all = appendPrincipal(all, t.addresses("from.source.notIpBlocks", s.GetNotIpBlocks(), true, directRemoteIP))
	all = appendPrincipal(all, t.addresses("from.source.remoteIpBlocks", s.GetRemoteIpBlocks(), false, remoteIP))
	all = appendPrincipal(all, t.addresses("from.source.notRemoteIpBlocks", s.GetNotRemoteIpBlocks(), true, remoteIP))
	for _, f := range []struct {
		name string
		set  bool
	}{
		{"from.source.requestPrincipals", len(s.GetRequestPrincipals()) > 0},
		{"from.source.notRequestPrincipals", len(s.GetNotRequestPrincipals()) > 0},
	} {
		if f.set {
			t.unsupported(f.name, notEnforced)
		}
	}
	return andPrincipals(all)
}

// operation is one "to" entry: every field it sets must match.
func (t *translator) operation(o *securityv1beta1.Operation) *rbacv3.Permission {
	all := appendPermission(nil, t.ports("to.operation.ports", o.GetPorts()))
	if p := t.ports("to.operation.notPorts", o.GetNotPorts()); p != nil {
		all = append(all, &rbacv3.Permission{Rule: &rbacv3.Permission_NotRule{NotRule: p}})
	}
	for _, f := range []struct {
		name   string
		values []string
		not    bool
		one    func(string) *rbacv3.Permission
	}{
		{"to.operation.hosts", o.GetHosts(), false, hostPermission},
		{"to.operation.notHosts", o.GetNotHosts(), true, hostPermission},
		{"to.operation.methods", o.GetMethods(), false, methodPermission},
		{"to.operation.notMethods", o.GetNotMethods(), true, methodPermission},
		{"to.operation.paths", o.GetPaths(), false, pathPermission},
		{"to.operation.notPaths", o.GetNotPaths(), true, pathPermission},
	} {
		if len(f.values) == 0 {
			continue
		}
		if t.level != Request {
			t.unsupported(f.name, notInConnection)
			continue
		}
		if f.name == "to.operation.paths" || f.name == "to.operation.notPaths" {
			if i := slices.IndexFunc(f.values, func(v string) bool { return strings.ContainsAny(v, "{}") }); i >= 0 {
				t.unsupported(f.name, fmt.Sprintf("%q: path templates are not enforced", f.values[i]))
				continue
			}
		}
		all = appendPermission(all, permissionOf(f.values, f.not, f.one))
	}
	return andPermissions(all)
}

// methodPermission matches a request's method, exactly (Istio's
// methods are case-sensitive); "*" any.
func methodPermission(v string) *rbacv3.Permission {
	if v == "*" {
		return anyPermission()
	}
	return headerPermission(":method", &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: v}})
}

// pathPermission matches a request's path (without its query), with
// Istio's wildcards: "prefix*", "*suffix", "*" any.
func pathPermission(v string) *rbacv3.Permission {
	if v == "*" {
		return anyPermission()
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{
		Rule: &matcherv3.PathMatcher_Path{Path: wildcardMatcher(v)},
	}}}
}

// hostPermission matches a request's host (":authority", HTTP/1.1's
// Host), case-insensitively as Istio does, with or without a port, with
// Istio's wildcards.
func hostPermission(v string) *rbacv3.Permission {
	if v == "*" {
		return anyPermission()
	}
	var re string
	switch {
	case strings.HasPrefix(v, "*"):
		re = `.*` + regexp.QuoteMeta(v[1:])
	case strings.HasSuffix(v, "*"):
		re = regexp.QuoteMeta(v[:len(v)-1]) + `[^:]*`
	default:
		re = regexp.QuoteMeta(v)
	}
	return headerPermission(":authority", &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{
		SafeRegex: &matcherv3.RegexMatcher{Regex: `(?i)` + re + `(:[0-9]+)?`},
	}})
}

// headerPermission matches when the request's header name has a value m
// matches.
func headerPermission(name string, m *matcherv3.StringMatcher) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{
		Name: name, HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: m},
	}}}
}

// headerValuePermission matches a header's value with Istio's
// wildcards; "*" is any value, the header present.
func headerValuePermission(name, v string) *rbacv3.Permission {
	if v == "*" {
		return &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{
			Name: name, HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: true},
		}}}
	}
	return headerPermission(name, wildcardMatcher(v))
}

// wildcardMatcher is v with Istio's wildcards: "prefix*" a prefix,
// "*suffix" a suffix, else exact.
func wildcardMatcher(v string) *matcherv3.StringMatcher {
	switch {
	case strings.HasSuffix(v, "*"):
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: v[:len(v)-1]}}
	case strings.HasPrefix(v, "*"):
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: v[1:]}}
	}
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: v}}
}

// ports matches any of the port numbers ps; nil when ps is empty, or
// when one of them is not a port number: then the whole field is one
// the rule cannot match, and goes (a DENY rule without it matches more
// than with the good values alone).
func (t *translator) ports(field string, ps []string) *rbacv3.Permission {
	if len(ps) == 0 {
		return nil
	}
	var any []*rbacv3.Permission
	for _, s := range ps {
		n, err := strconv.ParseUint(s, 10, 16)
		if err != nil || n == 0 {
			t.unsupported(field, fmt.Sprintf("%q is not a port number", s))
			return nil
		}
		any = append(any, &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationPort{DestinationPort: uint32(n)}})
	}
	return orPermissions(any)
}

// condition is one "when" entry: a principal or a permission, or
// neither when its key is not one a connection has.
func (t *translator) condition(c *securityv1beta1.Condition) (*rbacv3.Principal, *rbacv3.Permission) {
	key := c.GetKey()
	field := fmt.Sprintf("when %q", key)
	switch key {
	case "source.principal", "source.namespace":
		one := t.principal
		if key == "source.namespace" {
			one = namespacePrincipal
		} else if t.innerStar(field, slices.Concat(c.GetValues(), c.GetNotValues())) {
			return nil, nil
		}
		all := appendPrincipal(nil, principalOf(c.GetValues(), false, one))
		return andPrincipals(appendPrincipal(all, principalOf(c.GetNotValues(), true, one))), nil
	case "source.ip", "remote.ip":
		one := directRemoteIP
		if key == "remote.ip" {
			one = remoteIP
		}
		all := appendPrincipal(nil, t.addresses(field+" values", c.GetValues(), false, one))
		return andPrincipals(appendPrincipal(all, t.addresses(field+" notValues", c.GetNotValues(), true, one))), nil
	case "destination.ip":
		var all []*rbacv3.Permission
		for _, f := range []struct {
			values []string
			not    bool
			name   string
		}{{c.GetValues(), false, " values"}, {c.GetNotValues(), true, " notValues"}} {
			ranges, ok := t.cidrs(field+f.name, f.values)
			if !ok || len(ranges) == 0 {
				continue
			}
			any := make([]*rbacv3.Permission, len(ranges))
			for i, r := range ranges {
				any[i] = &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationIp{DestinationIp: r}}
			}
			p := orPermissions(any)
			if f.not {
				p = &rbacv3.Permission{Rule: &rbacv3.Permission_NotRule{NotRule: p}}
			}
			all = append(all, p)
		}
		return nil, andPermissions(all)
	case "destination.port":
		var all []*rbacv3.Permission
		if p := t.ports(field+" values", c.GetValues()); p != nil {
			all = append(all, p)
		}
		if p := t.ports(field+" notValues", c.GetNotValues()); p != nil {
			all = append(all, &rbacv3.Permission{Rule: &rbacv3.Permission_NotRule{NotRule: p}})
		}
		return nil, andPermissions(all)
	}
	name, ok := requestHeader(key)
	switch {
	case ok && t.level == Request:
		one := func(v string) *rbacv3.Permission { return headerValuePermission(name, v) }
		all := appendPermission(nil, permissionOf(c.GetValues(), false, one))
		return nil, andPermissions(appendPermission(all, permissionOf(c.GetNotValues(), true, one)))
	case ok:
		t.unsupported(field, notInConnection)
	default:
		t.unsupported(field, notEnforced)
	}
	return nil, nil
}

// addresses matches a caller whose address is in any of the ranges
// values (Istio's "1.2.3.4" or "10.0.0.0/16", IPv4 or IPv6), or, not,
// in none; nil when values is empty, or when one of them is not an
// address or range: then the whole field goes, as a bad port does.
func (t *translator) addresses(field string, values []string, not bool, one func(*corev3.CidrRange) *rbacv3.Principal) *rbacv3.Principal {
	ranges, ok := t.cidrs(field, values)
	if !ok || len(ranges) == 0 {
		return nil
	}
	any := make([]*rbacv3.Principal, len(ranges))
	for i, r := range ranges {
		any[i] = one(r)
	}
	p := orPrincipals(any)
	if not {
		p = &rbacv3.Principal{Identifier: &rbacv3.Principal_NotId{NotId: p}}
	}
	return p
}

// cidrs are values as Envoy's CIDR ranges (a lone address is a range of
// itself); ok is false, the field recorded as one the rule cannot
// match, when one of them is neither an address nor a range.
func (t *translator) cidrs(field string, values []string) (ranges []*corev3.CidrRange, ok bool) {
	for _, v := range values {
		p, err := netip.ParsePrefix(v)
		if err != nil {
			a, aerr := netip.ParseAddr(v)
			if aerr != nil || a.Zone() != "" {
				t.unsupported(field, fmt.Sprintf("%q is not an IP address or CIDR range", v))
				return nil, false
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			// An IPv4 range written IPv4-mapped: the sidecar sees IPv4
			// callers as IPv4.
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		p = p.Masked()
		ranges = append(ranges, &corev3.CidrRange{AddressPrefix: p.Addr().String(), PrefixLen: wrapperspb.UInt32(uint32(p.Bits()))})
	}
	return ranges, true
}

// directRemoteIP matches the connection's peer (Istio's ipBlocks and
// source.ip): for a caller in another cluster, its east-west gateway.
func directRemoteIP(r *corev3.CidrRange) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_DirectRemoteIp{DirectRemoteIp: r}}
}

// remoteIP matches the original client (Istio's remoteIpBlocks and
// remote.ip): the peer too, since the sidecars trust no
// X-Forwarded-For hop, as Istio's default.
func remoteIP(r *corev3.CidrRange) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_RemoteIp{RemoteIp: r}}
}

// principalOf matches when one(v) matches for any of values, or, not,
// for none of them; nil when values is empty (the field is not set).
func principalOf(values []string, not bool, one func(string) *rbacv3.Principal) *rbacv3.Principal {
	if len(values) == 0 {
		return nil
	}
	any := make([]*rbacv3.Principal, len(values))
	for i, v := range values {
		any[i] = one(v)
	}
	p := orPrincipals(any)
	if not {
		p = &rbacv3.Principal{Identifier: &rbacv3.Principal_NotId{NotId: p}}
	}
	return p
}

// permissionOf is principalOf for permissions.
func permissionOf(values []string, not bool, one func(string) *rbacv3.Permission) *rbacv3.Permission {
	if len(values) == 0 {
		return nil
	}
	any := make([]*rbacv3.Permission, len(values))
	for i, v := range values {
		any[i] = one(v)
	}
	p := orPermissions(any)
	if not {
		p = &rbacv3.Permission{Rule: &rbacv3.Permission_NotRule{NotRule: p}}
	}
	return p
}

// appendPrincipal and appendPermission append p unless it is nil.
func appendPrincipal(all []*rbacv3.Principal, p *rbacv3.Principal) []*rbacv3.Principal {
	if p == nil {
		return all
	}
	return append(all, p)
}

func appendPermission(all []*rbacv3.Permission, p *rbacv3.Permission) []*rbacv3.Permission {
	if p == nil {
		return all
	}
	return append(all, p)
}

// requestHeader is the header name of a "request.headers[<name>]"
// condition key, lower-cased.
func requestHeader(key string) (string, bool) {
	name, ok := strings.CutPrefix(key, "request.headers[")
	if !ok {
		return "", false
	}
	name, ok = strings.CutSuffix(name, "]")
	if !ok || name == "" || strings.ContainsAny(name, "[]") {
		return "", false
	}
	name = strings.ToLower(name)
	if strings.HasPrefix(name, ":") && name != ":method" && name != ":authority" && name != ":path" {
		// The sidecar's RBAC knows these pseudo-headers only: another
		// (:scheme, say) is a field it cannot match, not one to send.
		return "", false
	}
	return name, true
}

// principal matches a principal as Istio writes it,
// "<trust-domain>/ns/<namespace>/sa/<account>", with one "*" at either
// end for a suffix or prefix, or "*" alone for any authenticated peer.
// "cluster.local" as its trust domain also names the local one.
func (t *translator) principal(v string) *rbacv3.Principal {
	switch {
	case v == "*":
		return presentPrincipal()
	case strings.HasPrefix(v, "*"):
		return principalName(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: v[1:]}})
	case strings.HasSuffix(v, "*"):
		return t.aliased(v[:len(v)-1], func(s string) *matcherv3.StringMatcher {
			return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "spiffe://" + s}}
		})
	}
	return t.aliased(v, func(s string) *matcherv3.StringMatcher {
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "spiffe://" + s}}
	})
}

// aliased is match(v), or, when v's trust domain is Istio's
// "cluster.local", match of v or of v in the local trust domain.
func (t *translator) aliased(v string, match func(string) *matcherv3.StringMatcher) *rbacv3.Principal {
	rest, ok := strings.CutPrefix(v, localAlias+"/")
	if !ok || t.localTD == "" || t.localTD == localAlias {
		return principalName(match(v))
	}
	return orPrincipals([]*rbacv3.Principal{principalName(match(v)), principalName(match(t.localTD + "/" + rest))})
}

// serviceAccount matches "<namespace>/<account>", or "<account>" of the
// policy's namespace, in any trust domain.
func (t *translator) serviceAccount(v string) *rbacv3.Principal {
	ns, sa, ok := strings.Cut(v, "/")
	if !ok {
		ns, sa = t.policy.Namespace, v
	}
	return principalRegex(`spiffe://[^/]+/ns/` + regexp.QuoteMeta(ns) + `/sa/` + regexp.QuoteMeta(sa))
}

// namespacePrincipal matches the peers of a namespace, where each "*"
// stands for any characters of the name, as Istio's namespaces do; "*"
// alone for any namespace.
func namespacePrincipal(v string) *rbacv3.Principal {
	seg := `[^/]+`
	if v != "*" {
		parts := strings.Split(v, "*")
		for i, p := range parts {
			parts[i] = regexp.QuoteMeta(p)
		}
		seg = strings.Join(parts, `[^/]*`)
	}
	return principalRegex(`spiffe://[^/]+/ns/` + seg + `/sa/[^/]+`)
}

// trustDomainPrincipal matches the peers of a trust domain, with the
// same wildcards.
func trustDomainPrincipal(v string) *rbacv3.Principal {
	return principalRegex(`spiffe://` + wildcardSegment(v) + `/.+`)
}

// innerStar reports whether a value of field (not "": a field whose
// values take a * anywhere) has a * other than Istio's wildcards, one
// at either end or alone, and if so records the field as one the rule
// cannot match: it goes, failing closed as every other.
func (t *translator) innerStar(field string, values []string) bool {
	if field == "" {
		return false
	}
	for _, v := range values {
		if len(v) > 2 && strings.Contains(v[1:len(v)-1], "*") {
			t.unsupported(field, fmt.Sprintf("%q: a * inside a value is not enforced", v))
			return true
		}
	}
	return false
}

// wildcardSegment is a regular expression for one path segment written
// with Istio's wildcards: "*", "prefix*", "*suffix", or exact.
func wildcardSegment(v string) string {
	switch {
	case v == "*":
		return `[^/]+`
	case strings.HasPrefix(v, "*"):
		return `[^/]*` + regexp.QuoteMeta(v[1:])
	case strings.HasSuffix(v, "*"):
		return regexp.QuoteMeta(v[:len(v)-1]) + `[^/]*`
	}
	return regexp.QuoteMeta(v)
}

func principalName(m *matcherv3.StringMatcher) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: m}}}
}

func principalRegex(re string) *rbacv3.Principal {
	return principalName(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: re}}})
}

// presentPrincipal matches any authenticated peer (Istio's "*").
func presentPrincipal() *rbacv3.Principal { return principalRegex(`.+`) }

func anyPrincipal() *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Any{Any: true}}
}

func anyPermission() *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Any{Any: true}}
}

// orPrincipals matches when any of ps does; "any" when ps is empty (no
// "from": every source).
func orPrincipals(ps []*rbacv3.Principal) *rbacv3.Principal {
	switch len(ps) {
	case 0:
		return anyPrincipal()
	case 1:
		return ps[0]
	}
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_OrIds{OrIds: &rbacv3.Principal_Set{Ids: ps}}}
}

// andPrincipals matches when all of ps do; "any" when ps is empty.
func andPrincipals(ps []*rbacv3.Principal) *rbacv3.Principal {
	ps = dropAnyPrincipals(ps)
	switch len(ps) {
	case 0:
		return anyPrincipal()
	case 1:
		return ps[0]
	}
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_AndIds{AndIds: &rbacv3.Principal_Set{Ids: ps}}}
}

func dropAnyPrincipals(ps []*rbacv3.Principal) []*rbacv3.Principal {
	var out []*rbacv3.Principal
	for _, p := range ps {
		if !p.GetAny() {
			out = append(out, p)
		}
	}
	return out
}

func orPermissions(ps []*rbacv3.Permission) *rbacv3.Permission {
	switch len(ps) {
	case 0:
		return anyPermission()
	case 1:
		return ps[0]
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: ps}}}
}

func andPermissions(ps []*rbacv3.Permission) *rbacv3.Permission {
	var kept []*rbacv3.Permission
	for _, p := range ps {
		if !p.GetAny() {
			kept = append(kept, p)
		}
	}
	switch len(kept) {
	case 0:
		return anyPermission()
	case 1:
		return kept[0]
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: kept}}}
}
