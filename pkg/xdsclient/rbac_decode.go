package xdsclient

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	httprbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
)

const (
	rbacName     = "envoy.filters.network.rbac"
	rbacType     = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
	httpRBACName = "envoy.filters.http.rbac"
	httpRBACType = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
)

// The RBAC subsets of docs/sidecar-xds.md. A network filter sees of a
// connection the caller's SPIFFE ID, its peer address and its original
// destination address and port; an HTTP filter also each request's
// method, authority, path and headers. Everything else (the deprecated
// source_ip, metadata, CEL, shadow rules, per-rule stats, …) is refused
// by name.
var (
	scRBACFields          = allow[*netrbacv3.RBAC]("stat_prefix", "rules", "enforcement_type")
	scHTTPRBACFields      = allow[*httprbacv3.RBAC]("rules")
	scRBACRulesFields     = allow[*rbacv3.RBAC]("action", "policies")
	scRBACPolicyFields    = allow[*rbacv3.Policy]("permissions", "principals")
	scPermissionFields    = allow[*rbacv3.Permission]("any", "destination_port", "destination_port_range", "destination_ip", "and_rules", "or_rules", "not_rule")
	scHTTPPermissionField = allow[*rbacv3.Permission]("any", "destination_port", "destination_port_range", "destination_ip", "and_rules", "or_rules", "not_rule", "header", "url_path")
	scPermissionSet       = allow[*rbacv3.Permission_Set]("rules")
	scPortRangeFields     = allow[*typev3.Int32Range]("start", "end")
	scHeaderMatcherFields = allow[*routev3.HeaderMatcher]("name", "string_match", "present_match", "invert_match")
	scPathMatcherFields   = allow[*matcherv3.PathMatcher]("path")
	scPrincipalFields     = allow[*rbacv3.Principal]("any", "authenticated", "direct_remote_ip", "remote_ip", "and_ids", "or_ids", "not_id")
	scCIDRFields          = allow[*corev3.CidrRange]("address_prefix", "prefix_len")
	scPrincipalSet        = allow[*rbacv3.Principal_Set]("ids")
	scAuthenticated       = allow[*rbacv3.Principal_Authenticated]("principal_name")
	scNameMatcher         = allow[*matcherv3.StringMatcher]("exact", "prefix", "suffix", "safe_regex", "ignore_case")
	scValueMatcher        = allow[*matcherv3.StringMatcher]("exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case")
	scRegexFields         = allow[*matcherv3.RegexMatcher]("regex")
)

// rbacDialect is what one kind of RBAC filter's permissions may say.
type rbacDialect struct {
	permissions *fieldSet[*rbacv3.Permission]
	// rules names the permission rules, for a permission that sets none.
	rules string
}

var (
	networkRBAC = &rbacDialect{permissions: scPermissionFields,
		rules: "any, destination_port, destination_port_range, destination_ip, and_rules, or_rules or not_rule"}
	httpRBAC = &rbacDialect{permissions: scHTTPPermissionField,
		rules: "any, destination_port, destination_port_range, destination_ip, header, url_path, and_rules, or_rules or not_rule"}
)

// rbacPlacement checks where the RBAC filters named name sit in a list of
// n filters (field), nameOf giving each one's name: on an inbound chain
// only, all before the list's one other filter (terminal names it), at
// most two. It returns how many there are, how many lead the list (those
// to decode), and the problems.
func rbacPlacement(field, name, terminal string, n int, nameOf func(int) string, inbound bool) (count, lead int, errs []error) {
	for i := range n {
		if nameOf(i) != name {
			continue
		}
		count++
		switch {
		case !inbound:
			errs = append(errs, fieldErr(field+"["+itoa(i)+"].name", name+" is not supported on the outbound listener (inbound chains only)"))
		case i != count-1:
			errs = append(errs, fieldErr(field+"["+itoa(i)+"].name", name+" after "+terminal+": RBAC filters come before it"))
		}
	}
	if !inbound || count == 0 {
		return count, 0, errs
	}
	if count > 2 {
		errs = append(errs, fieldErr(field, "want at most two "+name+" (DENY, then ALLOW), got "+itoa(count)))
	}
	for lead < n && nameOf(lead) == name {
		lead++
	}
	return count, lead, errs
}

// decodeRBACFilters decodes an inbound chain's RBAC filters, those before
// its terminal filter: at most one DENY, then at most one ALLOW. nil when
// there are none.
func decodeRBACFilters(filters []*listenerv3.Filter) (*NetworkRBAC, error) {
	if len(filters) == 0 {
		return nil, nil
	}
	deny, allow, err := decodeRBACOrder("filters", len(filters), func(i int) (*RBACRules, rbacv3.RBAC_Action, error) {
		return decodeNetworkRBAC(filters[i])
	})
	if err != nil {
		return nil, err
	}
	return &NetworkRBAC{Deny: deny, Allow: allow}, nil
}

// decodeHTTPRBACFilters decodes an inbound HTTP connection manager's RBAC
// filters, those before its router, as decodeRBACFilters.
func decodeHTTPRBACFilters(filters []*hcmv3.HttpFilter) (*HTTPRBAC, error) {
	if len(filters) == 0 {
		return nil, nil
	}
	deny, allow, err := decodeRBACOrder("http_filters", len(filters), func(i int) (*RBACRules, rbacv3.RBAC_Action, error) {
		return decodeHTTPRBAC(filters[i])
	})
	if err != nil {
		return nil, err
	}
	return &HTTPRBAC{Deny: deny, Allow: allow}, nil
}

// decodeRBACOrder decodes the n RBAC filters of the list field, decode
// giving filter i's rules and action, in Istio's order: at most one DENY,
// then at most one ALLOW.
func decodeRBACOrder(field string, n int, decode func(i int) (*RBACRules, rbacv3.RBAC_Action, error)) (deny, allow *RBACRules, err error) {
	var errs []error
	for i := range n {
		rules, action, err := decode(i)
		if err != nil {
			errs = append(errs, withinIndex(field, i, err))
			continue
		}
		switch {
		case action == rbacv3.RBAC_DENY && deny == nil && allow == nil:
			deny = rules
		case action == rbacv3.RBAC_ALLOW && allow == nil:
			allow = rules
		default:
			prev := "a DENY"
			if allow != nil {
				prev = "an ALLOW"
			}
			errs = append(errs, fieldErr(field+"["+itoa(i)+"].typed_config.rules.action",
				action.String()+" after "+prev+" filter: want at most one DENY filter, then at most one ALLOW filter (Istio's order)"))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, nil, err
	}
	return deny, allow, nil
}

// decodeNetworkRBAC decodes one envoy.filters.network.rbac filter.
func decodeNetworkRBAC(f *listenerv3.Filter) (*RBACRules, rbacv3.RBAC_Action, error) {
	if err := filterFields.check(f); err != nil {
		return nil, 0, err
	}
	if f.GetTypedConfig() == nil {
		return nil, 0, fieldErr("typed_config", "is missing")
	}
	m := new(netrbacv3.RBAC)
	if err := unpackTyped(f.GetTypedConfig(), rbacType, m); err != nil {
		return nil, 0, err
	}
	errs := []error{within("typed_config", scRBACFields.check(m))}
	r := &RBACRules{StatPrefix: m.GetStatPrefix()}
	if r.StatPrefix == "" {
		errs = append(errs, fieldErr("typed_config.stat_prefix", "is empty"))
	}
	if e := m.GetEnforcementType(); e != netrbacv3.RBAC_ONE_TIME_ON_FIRST_BYTE {
		errs = append(errs, fieldErr("typed_config.enforcement_type", e.String()+" is not supported (ONE_TIME_ON_FIRST_BYTE: the sidecar decides once per connection)"))
	}
	var err error
	r.Policies, err = decodeFilterRules(m.GetRules(), networkRBAC)
	errs = append(errs, err)
	if err := errors.Join(errs...); err != nil {
		return nil, 0, err
	}
	return r, m.GetRules().GetAction(), within("typed_config", pgv(m))
}

// decodeHTTPRBAC decodes one envoy.filters.http.rbac filter: rules, and
// nothing else.
func decodeHTTPRBAC(hf *hcmv3.HttpFilter) (*RBACRules, rbacv3.RBAC_Action, error) {
	if err := scHTTPFilterFields.check(hf); err != nil {
		return nil, 0, err
	}
	if hf.GetTypedConfig() == nil {
		return nil, 0, fieldErr("typed_config", "is missing")
	}
	m := new(httprbacv3.RBAC)
	if err := unpackTyped(hf.GetTypedConfig(), httpRBACType, m); err != nil {
		return nil, 0, err
	}
	r := new(RBACRules)
	var err error
	r.Policies, err = decodeFilterRules(m.GetRules(), httpRBAC)
	if err := errors.Join(within("typed_config", scHTTPRBACFields.check(m)), err); err != nil {
		return nil, 0, err
	}
	return r, m.GetRules().GetAction(), within("typed_config", pgv(m))
}

// decodeFilterRules decodes a filter's rules (required) in dialect d;
// problems are under typed_config.rules.
func decodeFilterRules(rules *rbacv3.RBAC, d *rbacDialect) ([]RBACPolicy, error) {
	if rules == nil {
		return nil, fieldErr("typed_config.rules", "is missing")
	}
	policies, err := decodeRBACRules(rules, d)
	return policies, within("typed_config.rules", err)
}

func decodeRBACRules(m *rbacv3.RBAC, d *rbacDialect) ([]RBACPolicy, error) {
	errs := []error{scRBACRulesFields.check(m)}
	switch a := m.GetAction(); a {
	case rbacv3.RBAC_ALLOW, rbacv3.RBAC_DENY:
	default:
		errs = append(errs, fieldErr("action", a.String()+" is not supported (ALLOW or DENY)"))
	}
	var policies []RBACPolicy
	for _, name := range sortedNames(m.GetPolicies()) {
		p, err := decodeRBACPolicy(m.GetPolicies()[name], d)
		if err != nil {
			errs = append(errs, within("policies["+quote(name)+"]", err))
			continue
		}
		p.Name = name
		policies = append(policies, p)
	}
	return policies, errors.Join(errs...)
}

func decodeRBACPolicy(m *rbacv3.Policy, d *rbacDialect) (RBACPolicy, error) {
	var p RBACPolicy
	errs := []error{scRBACPolicyFields.check(m)}
	if len(m.GetPermissions()) == 0 {
		errs = append(errs, fieldErr("permissions", "is empty"))
	}
	if len(m.GetPrincipals()) == 0 {
		errs = append(errs, fieldErr("principals", "is empty"))
	}
	for i, pm := range m.GetPermissions() {
		perm, err := decodePermission(pm, 1, d)
		errs = append(errs, withinIndex("permissions", i, err))
		p.Permissions = append(p.Permissions, perm)
	}
	for i, pr := range m.GetPrincipals() {
		prin, err := decodePrincipal(pr, 1)
		errs = append(errs, withinIndex("principals", i, err))
		p.Principals = append(p.Principals, prin)
	}
	return p, errors.Join(errs...)
}

var errTooDeep = fieldErr("", fmt.Sprintf("nested deeper than %d levels", maxRBACDepth))

func decodePermission(m *rbacv3.Permission, depth int, d *rbacDialect) (Permission, error) {
	if depth > maxRBACDepth {
		return Permission{}, errTooDeep
	}
	// The dialect's allow-list refuses header and url_path on a network
	// filter: only an HTTP filter's permissions reach their cases.
	if err := d.permissions.check(m); err != nil {
		return Permission{}, err
	}
	switch r := m.GetRule().(type) {
	case *rbacv3.Permission_Any:
		if !r.Any {
			return Permission{}, fieldErr("any", "false is not supported (true)")
		}
		return Permission{Kind: PermissionAny}, nil
	case *rbacv3.Permission_DestinationPort:
		if r.DestinationPort == 0 || r.DestinationPort > 65535 {
			return Permission{}, fieldErr("destination_port", fmt.Sprintf("%d is not a port", r.DestinationPort))
		}
		return Permission{Kind: PermissionPorts, Lo: r.DestinationPort, Hi: r.DestinationPort + 1}, nil
	case *rbacv3.Permission_DestinationPortRange:
		rg := r.DestinationPortRange
		if err := scPortRangeFields.check(rg); err != nil {
			return Permission{}, within("destination_port_range", err)
		}
		if s, e := rg.GetStart(), rg.GetEnd(); s < 0 || s >= e || e > 65536 {
			return Permission{}, fieldErr("destination_port_range", fmt.Sprintf("[%d, %d) is not a range of ports (0 <= start < end <= 65536, end exclusive)", s, e))
		}
		return Permission{Kind: PermissionPorts, Lo: uint32(rg.GetStart()), Hi: uint32(rg.GetEnd())}, nil
	case *rbacv3.Permission_DestinationIp:
		cidr, err := decodeCIDR(r.DestinationIp)
		return Permission{Kind: PermissionDestinationIP, CIDR: cidr}, within("destination_ip", err)
	case *rbacv3.Permission_AndRules:
		rules, err := decodePermissionSet(r.AndRules, depth, d)
		return Permission{Kind: PermissionAnd, Rules: rules}, within("and_rules", err)
	case *rbacv3.Permission_OrRules:
		rules, err := decodePermissionSet(r.OrRules, depth, d)
		return Permission{Kind: PermissionOr, Rules: rules}, within("or_rules", err)
	case *rbacv3.Permission_NotRule:
		p, err := decodePermission(r.NotRule, depth+1, d)
		return Permission{Kind: PermissionNot, Rules: []Permission{p}}, within("not_rule", err)
	case *rbacv3.Permission_Header:
		h, err := decodeHeaderMatcher(r.Header)
		return Permission{Kind: PermissionHeader, Header: h}, within("header", err)
	case *rbacv3.Permission_UrlPath:
		sm, err := decodePathMatcher(r.UrlPath)
		return Permission{Kind: PermissionURLPath, URLPath: sm}, within("url_path", err)
	}
	return Permission{}, fieldErr("", "sets no rule (want "+d.rules+")")
}

func decodePermissionSet(m *rbacv3.Permission_Set, depth int, d *rbacDialect) ([]Permission, error) {
	return decodeSet(scPermissionSet.check(m), "rules", m.GetRules(), depth, func(m *rbacv3.Permission, depth int) (Permission, error) {
		return decodePermission(m, depth, d)
	})
}

// decodeHeaderMatcher decodes a header permission: a name, lower-cased
// as Envoy's header map keeps names (host is :authority there; of the
// other pseudo-headers only :method and :path are read), with
// string_match or present_match: true, and invert_match.
func decodeHeaderMatcher(m *routev3.HeaderMatcher) (*HeaderMatch, error) {
	if err := scHeaderMatcherFields.check(m); err != nil {
		return nil, err
	}
	h := &HeaderMatch{Name: strings.ToLower(m.GetName()), Invert: m.GetInvertMatch()}
	var errs []error
	switch {
	case h.Name == "":
		errs = append(errs, fieldErr("name", "is empty"))
	case h.Name == ":method":
		h.Field = HeaderMethod
	case h.Name == ":authority", h.Name == "host":
		h.Field = HeaderAuthority
	case h.Name == ":path":
		h.Field = HeaderPath
	case h.Name[0] == ':':
		errs = append(errs, fieldErr("name", fmt.Sprintf("pseudo-header %q is not supported (:method, :authority or :path)", m.GetName())))
	}
	switch s := m.GetHeaderMatchSpecifier().(type) {
	case *routev3.HeaderMatcher_StringMatch:
		var err error
		h.Value, err = decodeStringMatcher(s.StringMatch, scValueMatcher, valuePatterns)
		errs = append(errs, within("string_match", err))
	case *routev3.HeaderMatcher_PresentMatch:
		if !s.PresentMatch {
			errs = append(errs, fieldErr("present_match", "false is not supported (true; with invert_match for an absent header)"))
		}
		h.Present = true
	default:
		errs = append(errs, fieldErr("", "sets no match (want string_match or present_match)"))
	}
	return h, errors.Join(errs...)
}

// decodePathMatcher decodes a url_path: its path, a StringMatcher.
func decodePathMatcher(m *matcherv3.PathMatcher) (*StringMatch, error) {
	if err := scPathMatcherFields.check(m); err != nil {
		return nil, err
	}
	if m.GetPath() == nil {
		return nil, fieldErr("path", "is missing")
	}
	sm, err := decodeStringMatcher(m.GetPath(), scValueMatcher, valuePatterns)
	return &sm, within("path", err)
}

// decodeSet decodes the members of an and/or set (the field named
// field), each one level deeper, after the set's own check (checked):
// an empty set is refused.
func decodeSet[M any, T any](checked error, field string, members []M, depth int, decode func(M, int) (T, error)) ([]T, error) {
	errs := []error{checked}
	if len(members) == 0 {
		errs = append(errs, fieldErr(field, "is empty"))
	}
	out := make([]T, 0, len(members))
	for i, m := range members {
		v, err := decode(m, depth+1)
		errs = append(errs, withinIndex(field, i, err))
		out = append(out, v)
	}
	return out, errors.Join(errs...)
}

func decodePrincipal(m *rbacv3.Principal, depth int) (Principal, error) {
	if depth > maxRBACDepth {
		return Principal{}, errTooDeep
	}
	if _, ok := m.GetIdentifier().(*rbacv3.Principal_SourceIp); ok {
		// Deprecated in Envoy's API for direct_remote_ip and remote_ip,
		// which Istio sends.
		return Principal{}, fieldErr("source_ip", "is deprecated and not supported (use direct_remote_ip)")
	}
	if err := scPrincipalFields.check(m); err != nil {
		return Principal{}, err
	}
	switch id := m.GetIdentifier().(type) {
	case *rbacv3.Principal_Any:
		if !id.Any {
			return Principal{}, fieldErr("any", "false is not supported (true)")
		}
		return Principal{Kind: PrincipalAny}, nil
	case *rbacv3.Principal_Authenticated_:
		a := id.Authenticated
		if err := scAuthenticated.check(a); err != nil {
			return Principal{}, within("authenticated", err)
		}
		if a.GetPrincipalName() == nil {
			return Principal{}, fieldErr("authenticated.principal_name", "is missing")
		}
		sm, err := decodeStringMatcher(a.GetPrincipalName(), scNameMatcher, namePatterns)
		return Principal{Kind: PrincipalName, Name: sm}, within("authenticated.principal_name", err)
	case *rbacv3.Principal_DirectRemoteIp:
		cidr, err := decodeCIDR(id.DirectRemoteIp)
		return Principal{Kind: PrincipalDirectRemoteIP, CIDR: cidr}, within("direct_remote_ip", err)
	case *rbacv3.Principal_RemoteIp:
		cidr, err := decodeCIDR(id.RemoteIp)
		return Principal{Kind: PrincipalRemoteIP, CIDR: cidr}, within("remote_ip", err)
	case *rbacv3.Principal_AndIds:
		ids, err := decodePrincipalSet(id.AndIds, depth)
		return Principal{Kind: PrincipalAnd, IDs: ids}, within("and_ids", err)
	case *rbacv3.Principal_OrIds:
		ids, err := decodePrincipalSet(id.OrIds, depth)
		return Principal{Kind: PrincipalOr, IDs: ids}, within("or_ids", err)
	case *rbacv3.Principal_NotId:
		p, err := decodePrincipal(id.NotId, depth+1)
		return Principal{Kind: PrincipalNot, IDs: []Principal{p}}, within("not_id", err)
	}
	return Principal{}, fieldErr("", "sets no identifier (want any, authenticated, direct_remote_ip, remote_ip, and_ids, or_ids or not_id)")
}

// decodeCIDR decodes a CidrRange as Envoy's CidrRange::create does: an
// IP address (no zone, no "/len") and prefix_len (absent: 0, as in
// Envoy), at most the address's bits, the address masked to it. An
// IPv4-mapped IPv6 address_prefix with prefix_len 96 or more is the IPv4
// range it maps (prefix_len-96), as peer addresses are compared
// unmapped; with less it stays an IPv6 range, which no IPv4 address is
// in.
func decodeCIDR(m *corev3.CidrRange) (netip.Prefix, error) {
	if err := scCIDRFields.check(m); err != nil {
		return netip.Prefix{}, err
	}
	a, err := netip.ParseAddr(m.GetAddressPrefix())
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, fieldErr("address_prefix", fmt.Sprintf("%q is not an IP address", m.GetAddressPrefix()))
	}
	bits := m.GetPrefixLen().GetValue()
	if max := uint32(a.BitLen()); bits > max {
		family := "IPv4"
		if a.Is6() {
			family = "IPv6"
		}
		return netip.Prefix{}, fieldErr("prefix_len", fmt.Sprintf("%d is more than the %d bits of an %s address_prefix", bits, max, family))
	}
	if a.Is4In6() && bits >= 96 {
		a, bits = a.Unmap(), bits-96
	}
	return netip.PrefixFrom(a, int(bits)).Masked(), nil
}

func decodePrincipalSet(m *rbacv3.Principal_Set, depth int) ([]Principal, error) {
	return decodeSet(scPrincipalSet.check(m), "ids", m.GetIds(), depth, decodePrincipal)
}

// The patterns a principal_name may use, and a header's or a path's.
const (
	namePatterns  = "exact, prefix, suffix or safe_regex"
	valuePatterns = "exact, prefix, suffix, contains or safe_regex"
)

// decodeStringMatcher decodes a StringMatcher of the fields allows
// (patterns names them): exact, prefix, suffix, contains (each with
// ignore_case or not) or safe_regex, compiled here and anchored at both
// ends, as Envoy matches a regex against the whole string.
func decodeStringMatcher(m *matcherv3.StringMatcher, fields *fieldSet[*matcherv3.StringMatcher], patterns string) (StringMatch, error) {
	if err := fields.check(m); err != nil {
		return StringMatch{}, err
	}
	sm := StringMatch{IgnoreCase: m.GetIgnoreCase()}
	switch p := m.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		sm.Kind, sm.Value = MatchExact, p.Exact
	case *matcherv3.StringMatcher_Prefix:
		sm.Kind, sm.Value = MatchPrefix, p.Prefix
	case *matcherv3.StringMatcher_Suffix:
		sm.Kind, sm.Value = MatchSuffix, p.Suffix
	case *matcherv3.StringMatcher_Contains:
		sm.Kind, sm.Value = MatchContains, p.Contains
	case *matcherv3.StringMatcher_SafeRegex:
		if err := scRegexFields.check(p.SafeRegex); err != nil {
			return StringMatch{}, within("safe_regex", err)
		}
		if sm.IgnoreCase {
			return StringMatch{}, fieldErr("ignore_case", "is not supported with safe_regex (Envoy ignores it there; write (?i) in the regex)")
		}
		sm.Kind, sm.Value = MatchRegex, p.SafeRegex.GetRegex()
		// Compiled alone first: anchored, "a)|(b" would compile.
		_, err := regexp.Compile(sm.Value)
		if err == nil {
			sm.re, err = regexp.Compile(`^(?:` + sm.Value + `)$`)
		}
		if err != nil {
			return StringMatch{}, fieldErr("safe_regex.regex", fmt.Sprintf("%q does not compile: %v", sm.Value, err))
		}
	default:
		return StringMatch{}, fieldErr("", "sets no pattern (want "+patterns+")")
	}
	return sm, nil
}
