package xdsclient

import (
	"errors"
	"fmt"
	"regexp"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
)

const (
	rbacName = "envoy.filters.network.rbac"
	rbacType = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
)

// The network RBAC subset of docs/sidecar-xds.md: the attributes a
// network filter can see of a connection that are the caller's SPIFFE ID
// and the destination port; everything else (HTTP attributes, IPs,
// metadata, CEL, shadow rules) is refused by name.
var (
	scRBACFields       = allow[*netrbacv3.RBAC]("stat_prefix", "rules", "enforcement_type")
	scRBACRulesFields  = allow[*rbacv3.RBAC]("action", "policies")
	scRBACPolicyFields = allow[*rbacv3.Policy]("permissions", "principals")
	scPermissionFields = allow[*rbacv3.Permission]("any", "destination_port", "destination_port_range", "and_rules", "or_rules", "not_rule")
	scPermissionSet    = allow[*rbacv3.Permission_Set]("rules")
	scPortRangeFields  = allow[*typev3.Int32Range]("start", "end")
	scPrincipalFields  = allow[*rbacv3.Principal]("any", "authenticated", "and_ids", "or_ids", "not_id")
	scPrincipalSet     = allow[*rbacv3.Principal_Set]("ids")
	scAuthenticated    = allow[*rbacv3.Principal_Authenticated]("principal_name")
	scNameMatcher      = allow[*matcherv3.StringMatcher]("exact", "prefix", "suffix", "safe_regex", "ignore_case")
	scRegexFields      = allow[*matcherv3.RegexMatcher]("regex")
)

// decodeRBACFilters decodes an inbound chain's RBAC filters, those before
// its terminal filter: at most one DENY, then at most one ALLOW. nil when
// there are none.
func decodeRBACFilters(filters []*listenerv3.Filter) (*NetworkRBAC, error) {
	if len(filters) == 0 {
		return nil, nil
	}
	var errs []error
	r := new(NetworkRBAC)
	for i, f := range filters {
		rules, action, err := decodeNetworkRBAC(f)
		if err != nil {
			errs = append(errs, withinIndex("filters", i, err))
			continue
		}
		switch {
		case action == rbacv3.RBAC_DENY && r.Deny == nil && r.Allow == nil:
			r.Deny = rules
		case action == rbacv3.RBAC_ALLOW && r.Allow == nil:
			r.Allow = rules
		default:
			errs = append(errs, fieldErr("filters["+itoa(i)+"].typed_config.rules.action",
				action.String()+" after "+prevAction(r)+" filter: want at most one DENY filter, then at most one ALLOW filter (Istio's order)"))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return r, nil
}

// prevAction names the RBAC filter already decoded, for decodeRBACFilters'
// ordering error.
func prevAction(r *NetworkRBAC) string {
	if r.Allow != nil {
		return "an ALLOW"
	}
	return "a DENY"
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
	rules := m.GetRules()
	if rules == nil {
		errs = append(errs, fieldErr("typed_config.rules", "is missing"))
	} else {
		var err error
		r.Policies, err = decodeRBACRules(rules)
		errs = append(errs, within("typed_config.rules", err))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, 0, err
	}
	return r, rules.GetAction(), within("typed_config", pgv(m))
}

func decodeRBACRules(m *rbacv3.RBAC) ([]RBACPolicy, error) {
	errs := []error{scRBACRulesFields.check(m)}
	switch a := m.GetAction(); a {
	case rbacv3.RBAC_ALLOW, rbacv3.RBAC_DENY:
	default:
		errs = append(errs, fieldErr("action", a.String()+" is not supported (ALLOW or DENY)"))
	}
	var policies []RBACPolicy
	for _, name := range sortedNames(m.GetPolicies()) {
		p, err := decodeRBACPolicy(m.GetPolicies()[name])
		if err != nil {
			errs = append(errs, within("policies["+quote(name)+"]", err))
			continue
		}
		p.Name = name
		policies = append(policies, p)
	}
	return policies, errors.Join(errs...)
}

func decodeRBACPolicy(m *rbacv3.Policy) (RBACPolicy, error) {
	var p RBACPolicy
	errs := []error{scRBACPolicyFields.check(m)}
	if len(m.GetPermissions()) == 0 {
		errs = append(errs, fieldErr("permissions", "is empty"))
	}
	if len(m.GetPrincipals()) == 0 {
		errs = append(errs, fieldErr("principals", "is empty"))
	}
	for i, pm := range m.GetPermissions() {
		perm, err := decodePermission(pm, 1)
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

func decodePermission(m *rbacv3.Permission, depth int) (Permission, error) {
	if depth > maxRBACDepth {
		return Permission{}, errTooDeep
	}
	if err := scPermissionFields.check(m); err != nil {
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
	case *rbacv3.Permission_AndRules:
		rules, err := decodePermissionSet(r.AndRules, depth)
		return Permission{Kind: PermissionAnd, Rules: rules}, within("and_rules", err)
	case *rbacv3.Permission_OrRules:
		rules, err := decodePermissionSet(r.OrRules, depth)
		return Permission{Kind: PermissionOr, Rules: rules}, within("or_rules", err)
	case *rbacv3.Permission_NotRule:
		p, err := decodePermission(r.NotRule, depth+1)
		return Permission{Kind: PermissionNot, Rules: []Permission{p}}, within("not_rule", err)
	}
	return Permission{}, fieldErr("", "sets no rule (want any, destination_port, destination_port_range, and_rules, or_rules or not_rule)")
}

func decodePermissionSet(m *rbacv3.Permission_Set, depth int) ([]Permission, error) {
	return decodeSet(scPermissionSet.check(m), "rules", m.GetRules(), depth, decodePermission)
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
		sm, err := decodeNameMatcher(a.GetPrincipalName())
		return Principal{Kind: PrincipalName, Name: sm}, within("authenticated.principal_name", err)
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
	return Principal{}, fieldErr("", "sets no identifier (want any, authenticated, and_ids, or_ids or not_id)")
}

func decodePrincipalSet(m *rbacv3.Principal_Set, depth int) ([]Principal, error) {
	return decodeSet(scPrincipalSet.check(m), "ids", m.GetIds(), depth, decodePrincipal)
}

// decodeNameMatcher decodes a principal_name: exact, prefix, suffix
// (each with ignore_case or not) or safe_regex, compiled here and
// anchored at both ends, as Envoy matches a regex against the whole
// string.
func decodeNameMatcher(m *matcherv3.StringMatcher) (StringMatch, error) {
	if err := scNameMatcher.check(m); err != nil {
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
		return StringMatch{}, fieldErr("", "sets no pattern (want exact, prefix, suffix or safe_regex)")
	}
	return sm, nil
}
