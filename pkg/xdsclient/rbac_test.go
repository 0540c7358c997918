package xdsclient

import (
	"regexp"
	"strings"
	"testing"

	xdsmatcherv3 "github.com/cncf/xds/go/xds/type/matcher/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/stretchr/testify/require"
	exprv1alpha1 "google.golang.org/genproto/googleapis/api/expr/v1alpha1"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Builders for envoy.filters.network.rbac filters, as Istio writes them.

func rbacFilter(tb testing.TB, action rbacv3.RBAC_Action, policies map[string]*rbacv3.Policy) *listenerv3.Filter {
	return typedFilter(tb, rbacName, &netrbacv3.RBAC{StatPrefix: "tcp.", Rules: &rbacv3.RBAC{Action: action, Policies: policies}})
}

func rbacPolicy(perms []*rbacv3.Permission, prins ...*rbacv3.Principal) *rbacv3.Policy {
	return &rbacv3.Policy{Permissions: perms, Principals: prins}
}

func perms(p ...*rbacv3.Permission) []*rbacv3.Permission { return p }

func permAny() *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Any{Any: true}}
}

func permPort(p uint32) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationPort{DestinationPort: p}}
}

func permRange(start, end int32) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationPortRange{DestinationPortRange: &typev3.Int32Range{Start: start, End: end}}}
}

func permAnd(p ...*rbacv3.Permission) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: p}}}
}

func permOr(p ...*rbacv3.Permission) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: p}}}
}

func permNot(p *rbacv3.Permission) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_NotRule{NotRule: p}}
}

func prinAny() *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Any{Any: true}}
}

func prinName(m *matcherv3.StringMatcher) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: m}}}
}

func prinExact(id string) *rbacv3.Principal {
	return prinName(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id}})
}

func prinRegex(re string) *rbacv3.Principal {
	return prinName(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: re}}})
}

func prinOr(p ...*rbacv3.Principal) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_OrIds{OrIds: &rbacv3.Principal_Set{Ids: p}}}
}

func prinAnd(p ...*rbacv3.Principal) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_AndIds{AndIds: &rbacv3.Principal_Set{Ids: p}}}
}

func prinNot(p *rbacv3.Principal) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_NotId{NotId: p}}
}

const (
	idCaller = "spiffe://alpha/ns/demo/sa/caller"
	idWeb    = "spiffe://alpha/ns/shop/sa/web"
	idBeta   = "spiffe://beta/ns/demo/sa/caller"
)

// withRBAC puts filters in front of the inbound chain i's terminal filter.
func withRBAC(m *scMutable, i int, filters ...*listenerv3.Filter) {
	m.in.FilterChains[i].Filters = append(filters, m.in.FilterChains[i].Filters...)
}

// Istio's shape decodes to the model: DENY then ALLOW on the HTTP chain,
// one ALLOW without policies on the TCP chain; policies sorted by name,
// regexes compiled and anchored; nesting 16 deep is accepted.
func TestSidecarDecodeInboundRBAC(t *testing.T) {
	m := newSidecarMutable(t)
	deep := permPort(9000)
	for range maxRBACDepth - 1 {
		deep = permNot(deep)
	}
	withRBAC(m, 0,
		rbacFilter(t, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{
			"ns[demo]-policy[deny-9000]-rule[0]": rbacPolicy(perms(permPort(9000)), prinAny()),
		}),
		rbacFilter(t, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
			"b": rbacPolicy(perms(permAnd(permRange(8000, 8100), permNot(permPort(8050)))),
				prinOr(prinName(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "SPIFFE://beta/"}, IgnoreCase: true}),
					prinRegex(`spiffe://alpha/ns/[a-z]+/sa/web`))),
			"a":    rbacPolicy(perms(permAny()), prinExact(idCaller)),
			"deep": rbacPolicy(perms(deep), prinAnd(prinNot(prinAny()))),
		}))
	withRBAC(m, 1, rbacFilter(t, rbacv3.RBAC_ALLOW, nil))
	cfg, err := m.decode(t)
	require.NoError(t, err)
	in := cfg.Sidecar.Inbound

	ports := func(lo, hi uint32) Permission { return Permission{Kind: PermissionPorts, Lo: lo, Hi: hi} }
	wantDeep := ports(9000, 9001)
	for range maxRBACDepth - 1 {
		wantDeep = Permission{Kind: PermissionNot, Rules: []Permission{wantDeep}}
	}
	require.Equal(t, &NetworkRBAC{
		Deny: &RBACRules{StatPrefix: "tcp.", Policies: []RBACPolicy{
			{Name: "ns[demo]-policy[deny-9000]-rule[0]", Permissions: []Permission{ports(9000, 9001)}, Principals: []Principal{{Kind: PrincipalAny}}},
		}},
		Allow: &RBACRules{StatPrefix: "tcp.", Policies: []RBACPolicy{
			{Name: "a", Permissions: []Permission{{Kind: PermissionAny}}, Principals: []Principal{{Kind: PrincipalName, Name: StringMatch{Kind: MatchExact, Value: idCaller}}}},
			{Name: "b", Permissions: []Permission{{Kind: PermissionAnd, Rules: []Permission{ports(8000, 8100), {Kind: PermissionNot, Rules: []Permission{ports(8050, 8051)}}}}},
				Principals: []Principal{{Kind: PrincipalOr, IDs: []Principal{
					{Kind: PrincipalName, Name: StringMatch{Kind: MatchPrefix, Value: "SPIFFE://beta/", IgnoreCase: true}},
					{Kind: PrincipalName, Name: StringMatch{Kind: MatchRegex, Value: `spiffe://alpha/ns/[a-z]+/sa/web`, re: regexp.MustCompile(`^(?:spiffe://alpha/ns/[a-z]+/sa/web)$`)}},
				}}}},
			{Name: "deep", Permissions: []Permission{wantDeep}, Principals: []Principal{{Kind: PrincipalAnd, IDs: []Principal{{Kind: PrincipalNot, IDs: []Principal{{Kind: PrincipalAny}}}}}}},
		}},
	}, in.Chains[0].RBAC)
	require.NotNil(t, in.Chains[0].HTTP, "the terminal filter decodes as before")
	require.Equal(t, &NetworkRBAC{Allow: &RBACRules{StatPrefix: "tcp."}}, in.Chains[1].RBAC)
	require.NotNil(t, in.Chains[1].TCP)

	for _, tc := range []struct {
		id   string
		port uint16
		want bool
	}{
		{idCaller, 8080, true},
		{idCaller, 9000, false}, // denied first
		{idBeta, 8080, true},
		{idBeta, 8050, false},
		{idBeta, 8100, false},
		{idWeb, 8000, true},
		{idWeb + "x", 8000, false}, // the regex is anchored
		{"x" + idWeb, 8000, false},
	} {
		require.Equal(t, tc.want, in.Chains[0].RBAC.Allows(&RBACRequest{ID: tc.id, Port: tc.port}), "%s:%d", tc.id, tc.port)
		require.False(t, in.Chains[1].RBAC.Allows(&RBACRequest{ID: tc.id, Port: tc.port}), "an ALLOW without policies denies all")
	}

	// A chain without RBAC filters has none.
	m = newSidecarMutable(t)
	cfg, err = m.decode(t)
	require.NoError(t, err)
	require.Nil(t, cfg.Sidecar.Inbound.Chains[0].RBAC)
	require.True(t, cfg.Sidecar.Inbound.Chains[0].RBAC.Allows(&RBACRequest{ID: "", Port: 1}))
}

func TestSidecarDecodeRefusesRBAC(t *testing.T) {
	const (
		in     = `listener "inbound": filter_chains[0].`
		rbac0  = in + `filters[0].typed_config.`
		policy = rbac0 + `rules.policies["p"].`
	)
	allowAll := func(t *testing.T) *listenerv3.Filter {
		return rbacFilter(t, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permAny()), prinAny())})
	}
	denyAll := func(t *testing.T) *listenerv3.Filter {
		return rbacFilter(t, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permAny()), prinAny())})
	}
	// edit puts one ALLOW filter on chain 0 and lets fn change it.
	edit := func(fn func(*netrbacv3.RBAC)) func(t *testing.T, m *scMutable) {
		return func(t *testing.T, m *scMutable) {
			f := allowAll(t)
			editFilter(t, f, fn)
			withRBAC(m, 0, f)
		}
	}
	editPolicy := func(fn func(*rbacv3.Policy)) func(t *testing.T, m *scMutable) {
		return edit(func(r *netrbacv3.RBAC) { fn(r.Rules.Policies["p"]) })
	}
	withPerm := func(p *rbacv3.Permission) func(t *testing.T, m *scMutable) {
		return editPolicy(func(pol *rbacv3.Policy) { pol.Permissions = perms(p) })
	}
	withPrin := func(p *rbacv3.Principal) func(t *testing.T, m *scMutable) {
		return editPolicy(func(pol *rbacv3.Policy) { pol.Principals = []*rbacv3.Principal{p} })
	}
	tooDeep := permPort(80)
	for range maxRBACDepth {
		tooDeep = permNot(tooDeep)
	}
	tooDeepID := prinAny()
	for range maxRBACDepth {
		tooDeepID = prinOr(tooDeepID)
	}
	for _, tc := range []struct {
		name   string
		mutate func(t *testing.T, m *scMutable)
		want   string
	}{
		// Where the filters sit.
		{"after the terminal filter", func(t *testing.T, m *scMutable) {
			m.in.FilterChains[0].Filters = append(m.in.FilterChains[0].Filters, allowAll(t))
		}, in + `filters[1].name: envoy.filters.network.rbac after the terminal filter: RBAC filters come before it`},
		{"two DENY", func(t *testing.T, m *scMutable) { withRBAC(m, 0, denyAll(t), denyAll(t)) },
			in + `filters[1].typed_config.rules.action: DENY after a DENY filter: want at most one DENY filter, then at most one ALLOW filter (Istio's order)`},
		{"two ALLOW", func(t *testing.T, m *scMutable) { withRBAC(m, 0, allowAll(t), allowAll(t)) },
			in + `filters[1].typed_config.rules.action: ALLOW after an ALLOW filter`},
		{"ALLOW then DENY", func(t *testing.T, m *scMutable) { withRBAC(m, 0, allowAll(t), denyAll(t)) },
			in + `filters[1].typed_config.rules.action: DENY after an ALLOW filter`},
		{"three", func(t *testing.T, m *scMutable) { withRBAC(m, 0, denyAll(t), allowAll(t), allowAll(t)) },
			in + `filters: want at most two envoy.filters.network.rbac (DENY, then ALLOW), got 3`},
		{"RBAC alone", func(t *testing.T, m *scMutable) { m.in.FilterChains[0].Filters = []*listenerv3.Filter{allowAll(t)} },
			in + `filters: want exactly one envoy.filters.network.http_connection_manager or envoy.filters.network.tcp_proxy, got 0 filters`},
		{"on the outbound listener", func(t *testing.T, m *scMutable) {
			m.out.FilterChains[0].Filters = append([]*listenerv3.Filter{allowAll(t)}, m.out.FilterChains[0].Filters...)
		}, `listener "outbound": filter_chains[0].filters[0].name: envoy.filters.network.rbac is not supported on the outbound listener (inbound chains only)`},
		{"another network filter first", func(t *testing.T, m *scMutable) {
			withRBAC(m, 0, typedFilter(t, "envoy.filters.network.ext_authz", &routev3.Route{}))
		}, in + `filters: want exactly one envoy.filters.network.http_connection_manager or envoy.filters.network.tcp_proxy, got 2 filters`},
		{"wrong typed_config", func(t *testing.T, m *scMutable) {
			withRBAC(m, 0, typedFilter(t, rbacName, &rbacv3.RBAC{}))
		}, in + `filters[0].typed_config: unsupported type "type.googleapis.com/envoy.config.rbac.v3.RBAC" (want ` + rbacType + `)`},

		// The filter's own fields.
		{"stat_prefix", edit(func(r *netrbacv3.RBAC) { r.StatPrefix = "" }), rbac0 + `stat_prefix: is empty`},
		{"rules missing", edit(func(r *netrbacv3.RBAC) { r.Rules = nil }), rbac0 + `rules: is missing`},
		{"LOG", edit(func(r *netrbacv3.RBAC) { r.Rules.Action = rbacv3.RBAC_LOG }), rbac0 + `rules.action: LOG is not supported (ALLOW or DENY)`},
		{"shadow_rules", edit(func(r *netrbacv3.RBAC) { r.ShadowRules = &rbacv3.RBAC{} }), rbac0 + `shadow_rules: not supported`},
		{"shadow_rules_stat_prefix", edit(func(r *netrbacv3.RBAC) { r.ShadowRulesStatPrefix = "s" }), rbac0 + `shadow_rules_stat_prefix: not supported`},
		{"matcher", edit(func(r *netrbacv3.RBAC) { r.Matcher = &xdsmatcherv3.Matcher{} }), rbac0 + `matcher: not supported`},
		{"shadow_matcher", edit(func(r *netrbacv3.RBAC) { r.ShadowMatcher = &xdsmatcherv3.Matcher{} }), rbac0 + `shadow_matcher: not supported`},
		{"CONTINUOUS", edit(func(r *netrbacv3.RBAC) { r.EnforcementType = netrbacv3.RBAC_CONTINUOUS }),
			rbac0 + `enforcement_type: CONTINUOUS is not supported (ONE_TIME_ON_FIRST_BYTE`},
		{"delay_deny", edit(func(r *netrbacv3.RBAC) { r.DelayDeny = durationpb.New(1) }), rbac0 + `delay_deny: not supported`},
		{"audit_logging_options", edit(func(r *netrbacv3.RBAC) { r.Rules.AuditLoggingOptions = &rbacv3.RBAC_AuditLoggingOptions{} }),
			rbac0 + `rules.audit_logging_options: not supported`},

		// Policies.
		{"no permissions", editPolicy(func(p *rbacv3.Policy) { p.Permissions = nil }), policy + `permissions: is empty`},
		{"no principals", editPolicy(func(p *rbacv3.Policy) { p.Principals = nil }), policy + `principals: is empty`},
		{"condition", editPolicy(func(p *rbacv3.Policy) { p.Condition = &exprv1alpha1.Expr{} }), policy + `condition: not supported`},
		{"checked_condition", editPolicy(func(p *rbacv3.Policy) { p.CheckedCondition = &exprv1alpha1.CheckedExpr{} }), policy + `checked_condition: not supported`},

		// Permissions.
		{"header", withPerm(&rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{Name: "x"}}}), policy + `permissions[0].header: not supported`},
		{"url_path", withPerm(&rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{}}}), policy + `permissions[0].url_path: not supported`},
		{"any false", withPerm(&rbacv3.Permission{Rule: &rbacv3.Permission_Any{}}), policy + `permissions[0].any: false is not supported (true)`},
		{"no rule", withPerm(&rbacv3.Permission{}), policy + `permissions[0]: sets no rule`},
		{"port 0", withPerm(permPort(0)), policy + `permissions[0].destination_port: 0 is not a port`},
		{"port 65536", withPerm(permPort(65536)), policy + `permissions[0].destination_port: 65536 is not a port`},
		{"empty range", withPerm(permRange(80, 80)), policy + `permissions[0].destination_port_range: [80, 80) is not a range of ports`},
		{"range past 65536", withPerm(permRange(80, 65537)), policy + `permissions[0].destination_port_range: [80, 65537) is not a range of ports`},
		{"negative range", withPerm(permRange(-1, 80)), policy + `permissions[0].destination_port_range: [-1, 80) is not a range of ports`},
		{"empty and_rules", withPerm(permAnd()), policy + `permissions[0].and_rules.rules: is empty`},
		{"nested requested_server_name", withPerm(permOr(permAny(), permNot(&rbacv3.Permission{Rule: &rbacv3.Permission_RequestedServerName{RequestedServerName: &matcherv3.StringMatcher{}}}))),
			policy + `permissions[0].or_rules.rules[1].not_rule.requested_server_name: not supported`},
		{"too deep", withPerm(tooDeep), policy + `permissions[0]` + strings.Repeat(".not_rule", maxRBACDepth) + `: nested deeper than 16 levels`},

		// Principals.
		{"source_ip", withPrin(&rbacv3.Principal{Identifier: &rbacv3.Principal_SourceIp{}}), policy + `principals[0].source_ip: is deprecated and not supported (use direct_remote_ip)`},
		{"principal header", withPrin(&rbacv3.Principal{Identifier: &rbacv3.Principal_Header{Header: &routev3.HeaderMatcher{Name: "x"}}}), policy + `principals[0].header: not supported`},
		{"principal any false", withPrin(&rbacv3.Principal{Identifier: &rbacv3.Principal_Any{}}), policy + `principals[0].any: false is not supported (true)`},
		{"no principal_name", withPrin(&rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{}}}),
			policy + `principals[0].authenticated.principal_name: is missing`},
		{"contains", withPrin(prinName(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Contains{Contains: "x"}})),
			policy + `principals[0].authenticated.principal_name.contains: not supported`},
		{"regex that does not compile", withPrin(prinRegex(`a)|(b`)),
			policy + `principals[0].authenticated.principal_name.safe_regex.regex: "a)|(b" does not compile`},
		{"regex with ignore_case", withPrin(prinName(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "x"}}, IgnoreCase: true})),
			policy + `principals[0].authenticated.principal_name.ignore_case: is not supported with safe_regex`},
		{"empty or_ids", withPrin(prinOr()), policy + `principals[0].or_ids.ids: is empty`},
		{"principal too deep", withPrin(tooDeepID), policy + `principals[0]` + strings.Repeat(".or_ids.ids[0]", maxRBACDepth) + `: nested deeper than 16 levels`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newSidecarMutable(t)
			tc.mutate(t, m)
			requireNACK(t, m, tc.want)
		})
	}
}

// rbacRules decodes one RBAC filter of action with policies.
func rbacRules(tb testing.TB, action rbacv3.RBAC_Action, policies map[string]*rbacv3.Policy) *RBACRules {
	tb.Helper()
	r, got, err := decodeNetworkRBAC(rbacFilter(tb, action, policies))
	require.NoError(tb, err)
	require.Equal(tb, action, got)
	return r
}

func prinMatch(ignoreCase bool, pattern func(*matcherv3.StringMatcher)) *rbacv3.Principal {
	m := &matcherv3.StringMatcher{IgnoreCase: ignoreCase}
	pattern(m)
	return prinName(m)
}

// The evaluator, by Envoy's semantics: DENY first, then ALLOW, a policy
// needing one permission and one principal.
func TestNetworkRBACAllows(t *testing.T) {
	one := func(perm *rbacv3.Permission, prin *rbacv3.Principal) map[string]*rbacv3.Policy {
		return map[string]*rbacv3.Policy{"p": rbacPolicy(perms(perm), prin)}
	}
	allow := func(perm *rbacv3.Permission, prin *rbacv3.Principal) *NetworkRBAC {
		return &NetworkRBAC{Allow: rbacRules(t, rbacv3.RBAC_ALLOW, one(perm, prin))}
	}
	deny := func(perm *rbacv3.Permission, prin *rbacv3.Principal) *NetworkRBAC {
		return &NetworkRBAC{Deny: rbacRules(t, rbacv3.RBAC_DENY, one(perm, prin))}
	}
	prefix := func(ic bool, s string) *rbacv3.Principal {
		return prinMatch(ic, func(m *matcherv3.StringMatcher) { m.MatchPattern = &matcherv3.StringMatcher_Prefix{Prefix: s} })
	}
	suffix := func(ic bool, s string) *rbacv3.Principal {
		return prinMatch(ic, func(m *matcherv3.StringMatcher) { m.MatchPattern = &matcherv3.StringMatcher_Suffix{Suffix: s} })
	}
	exactIC := func(s string) *rbacv3.Principal {
		return prinMatch(true, func(m *matcherv3.StringMatcher) { m.MatchPattern = &matcherv3.StringMatcher_Exact{Exact: s} })
	}
	both := &NetworkRBAC{
		Deny: rbacRules(t, rbacv3.RBAC_DENY, one(permPort(9000), prinAny())),
		Allow: rbacRules(t, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
			"caller": rbacPolicy(perms(permAny()), prinExact(idCaller)),
			"web":    rbacPolicy(perms(permPort(8080), permPort(9000)), prinExact(idWeb)),
		}),
	}
	type call struct {
		id   string
		port uint16
		want bool
	}
	for _, tc := range []struct {
		name  string
		r     *NetworkRBAC
		calls []call
	}{
		{"none", nil, []call{{idCaller, 80, true}, {"", 0, true}}},
		{"ALLOW any any", allow(permAny(), prinAny()), []call{{idCaller, 80, true}, {"", 1, true}}},
		{"DENY any any", deny(permAny(), prinAny()), []call{{idCaller, 80, false}, {"", 1, false}}},
		{"empty ALLOW", &NetworkRBAC{Allow: rbacRules(t, rbacv3.RBAC_ALLOW, nil)}, []call{{idCaller, 80, false}}},
		{"empty DENY", &NetworkRBAC{Deny: rbacRules(t, rbacv3.RBAC_DENY, nil)}, []call{{idCaller, 80, true}}},
		{"ALLOW exact", allow(permAny(), prinExact(idCaller)), []call{
			{idCaller, 80, true}, {idBeta, 80, false}, {idCaller + "/x", 80, false}, {"SPIFFE://alpha/ns/demo/sa/caller", 80, false}, {"", 80, false}}},
		{"ALLOW exact ignore_case", allow(permAny(), exactIC("SPIFFE://ALPHA/ns/demo/sa/caller")), []call{
			{idCaller, 80, true}, {idBeta, 80, false}}},
		{"ALLOW prefix", allow(permAny(), prefix(false, "spiffe://alpha/")), []call{
			{idCaller, 80, true}, {idWeb, 80, true}, {idBeta, 80, false}, {"spiffe://alpha", 80, false}}},
		{"ALLOW prefix ignore_case", allow(permAny(), prefix(true, "SPIFFE://Beta/")), []call{
			{idBeta, 80, true}, {idCaller, 80, false}}},
		{"ALLOW suffix", allow(permAny(), suffix(false, "/sa/caller")), []call{
			{idCaller, 80, true}, {idBeta, 80, true}, {idWeb, 80, false}, {"caller", 80, false}}},
		{"ALLOW suffix ignore_case", allow(permAny(), suffix(true, "/SA/WEB")), []call{
			{idWeb, 80, true}, {idCaller, 80, false}}},
		{"ALLOW regex, whole string", allow(permAny(), prinRegex(`spiffe://(alpha|beta)/ns/demo/sa/[a-z]+`)), []call{
			{idCaller, 80, true}, {idBeta, 80, true}, {idWeb, 80, false}, {idCaller + "/x", 80, false}, {"x" + idCaller, 80, false}}},
		{"ALLOW port", allow(permPort(8080), prinAny()), []call{
			{idCaller, 8080, true}, {idCaller, 8081, false}, {idCaller, 8079, false}}},
		{"ALLOW range, end exclusive", allow(permRange(8000, 8100), prinAny()), []call{
			{idCaller, 7999, false}, {idCaller, 8000, true}, {idCaller, 8099, true}, {idCaller, 8100, false}}},
		{"ALLOW range to 65536", allow(permRange(60000, 65536), prinAny()), []call{
			{idCaller, 65535, true}, {idCaller, 59999, false}}},
		{"ALLOW not port", allow(permNot(permPort(22)), prinAny()), []call{
			{idCaller, 22, false}, {idCaller, 80, true}}},
		{"ALLOW and", allow(permAnd(permRange(8000, 9000), permNot(permPort(8500))), prinAny()), []call{
			{idCaller, 8000, true}, {idCaller, 8500, false}, {idCaller, 9000, false}}},
		{"ALLOW or", allow(permOr(permPort(80), permPort(443)), prinAny()), []call{
			{idCaller, 80, true}, {idCaller, 443, true}, {idCaller, 8080, false}}},
		{"ALLOW not principal", allow(permAny(), prinNot(prinExact(idBeta))), []call{
			{idCaller, 80, true}, {idBeta, 80, false}}},
		{"ALLOW and principals", allow(permAny(), prinAnd(prefix(false, "spiffe://alpha/"), suffix(false, "/sa/web"))), []call{
			{idWeb, 80, true}, {idCaller, 80, false}}},
		{"ALLOW or principals", allow(permAny(), prinOr(prinExact(idWeb), prinExact(idBeta))), []call{
			{idWeb, 80, true}, {idBeta, 80, true}, {idCaller, 80, false}}},
		{"DENY port", deny(permPort(9000), prinAny()), []call{
			{idCaller, 9000, false}, {idCaller, 8080, true}}},
		{"DENY principal", deny(permAny(), prinExact(idBeta)), []call{
			{idBeta, 80, false}, {idCaller, 80, true}}},
		{"DENY and ALLOW", both, []call{
			{idCaller, 8080, true}, {idCaller, 9000, false}, {idWeb, 8080, true}, {idWeb, 9000, false}, {idWeb, 7000, false}, {idBeta, 8080, false}}},
		{"a policy needs a permission and a principal", allow(permPort(80), prinExact(idCaller)), []call{
			{idCaller, 80, true}, {idCaller, 81, false}, {idBeta, 80, false}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, c := range tc.calls {
				require.Equal(t, c.want, tc.r.Allows(&RBACRequest{ID: c.id, Port: c.port}), "%q port %d", c.id, c.port)
			}
		})
	}
}

// BenchmarkNetworkRBACAllows is one connection's decision against what
// Istio sends for a namespace with a DENY and an ALLOW policy: no
// allocation, whatever the matchers.
func BenchmarkNetworkRBACAllows(b *testing.B) {
	r := &NetworkRBAC{
		Deny: rbacRules(b, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{
			"ns[demo]-policy[deny-admin]-rule[0]": rbacPolicy(perms(permOr(permPort(9000), permRange(15000, 15100))), prinOr(prinExact(idBeta), prinRegex(`spiffe://[^/]+/ns/untrusted/.*`))),
		}),
		Allow: rbacRules(b, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
			"ns[demo]-policy[allow-web]-rule[0]":    rbacPolicy(perms(permAnd(permPort(8080), permNot(permPort(9000)))), prinExact(idWeb)),
			"ns[demo]-policy[allow-caller]-rule[0]": rbacPolicy(perms(permAny()), prinName(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: "/SA/CALLER"}, IgnoreCase: true})),
		}),
	}
	require.True(b, r.Allows(&RBACRequest{ID: idCaller, Port: 8080}))
	require.False(b, r.Allows(&RBACRequest{ID: idBeta, Port: 9000}))
	require.False(b, r.Allows(&RBACRequest{ID: "spiffe://alpha/ns/untrusted/sa/caller", Port: 15001}))
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		if r.Allows(&RBACRequest{ID: idCaller, Port: uint16(8000 + i%200)}) == r.Allows(&RBACRequest{ID: idBeta, Port: 9000}) {
			b.Fatal("the two decisions differ")
		}
	}
	if a := testing.AllocsPerRun(100, func() {
		r.Allows(&RBACRequest{ID: idCaller, Port: 8080})
		r.Allows(&RBACRequest{ID: idBeta, Port: 9000})
	}); a != 0 {
		b.Fatalf("%v allocations per decision", a)
	}
}

// A plaintext caller (a raw_buffer chain) has no certificate: its ID is
// "". Envoy's authenticated matcher never matches a connection without
// a peer certificate, whatever its principal_name, and a not_id of one
// does; any matches it. So an ALLOW naming principals, namespaces or
// trust domains refuses it, a DENY naming them lets it through, and
// Istio's notPrincipals (not_id) catches it. Istio's principal patterns:
// an exact ID, a namespace (safe_regex ".*/ns/<ns>/.*"), a trust domain
// (prefix "spiffe://<td>/"), "*" (safe_regex ".+" or prefix "spiffe://");
// and a pattern that matches "" (safe_regex ".*"), which matches no
// plaintext caller either.
func TestNetworkRBACUnauthenticated(t *testing.T) {
	one := func(prin *rbacv3.Principal) map[string]*rbacv3.Policy {
		return map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permAny()), prin)}
	}
	prefix := func(s string) *rbacv3.Principal {
		return prinMatch(false, func(m *matcherv3.StringMatcher) { m.MatchPattern = &matcherv3.StringMatcher_Prefix{Prefix: s} })
	}
	suffix := func(s string) *rbacv3.Principal {
		return prinMatch(false, func(m *matcherv3.StringMatcher) { m.MatchPattern = &matcherv3.StringMatcher_Suffix{Suffix: s} })
	}
	authenticated := map[string]*rbacv3.Principal{
		"exact":                 prinExact(idCaller),
		"namespace regex":       prinRegex(`.*/ns/demo/.*`),
		"trust domain prefix":   prefix("spiffe://alpha/"),
		"any ID, regex .+":      prinRegex(`.+`),
		"regex matching empty":  prinRegex(`.*`),
		"suffix":                suffix("/sa/caller"),
		"or of authenticated":   prinOr(prinExact(idCaller), prinRegex(`.*`)),
		"and with any":          prinAnd(prinAny(), prinRegex(`.*`)),
		"not of not of an ID":   prinNot(prinNot(prinRegex(`.*`))),
		"and of an ID, not one": prinAnd(prinRegex(`.*`), prinNot(prinExact(idBeta))),
	}
	for name, prin := range authenticated {
		t.Run(name, func(t *testing.T) {
			allow := &NetworkRBAC{Allow: rbacRules(t, rbacv3.RBAC_ALLOW, one(prin))}
			deny := &NetworkRBAC{Deny: rbacRules(t, rbacv3.RBAC_DENY, one(prin))}
			require.False(t, allow.Allows(&RBACRequest{ID: "", Port: 8080}), "an ALLOW of authenticated callers refuses a plaintext one")
			require.True(t, deny.Allows(&RBACRequest{ID: "", Port: 8080}), "a DENY of authenticated callers lets a plaintext one through")
			notAllow := &NetworkRBAC{Allow: rbacRules(t, rbacv3.RBAC_ALLOW, one(prinNot(prin)))}
			notDeny := &NetworkRBAC{Deny: rbacRules(t, rbacv3.RBAC_DENY, one(prinNot(prin)))}
			require.True(t, notAllow.Allows(&RBACRequest{ID: "", Port: 8080}), "not_id of an authenticated matcher matches a plaintext caller")
			require.False(t, notDeny.Allows(&RBACRequest{ID: "", Port: 8080}), "Istio's notPrincipals DENY refuses a plaintext caller")
		})
	}
	// What Istio writes for a DENY of requests from unauthenticated
	// callers (notPrincipals: ["*"]) and an ALLOW of anyone.
	denyPlain := &NetworkRBAC{Deny: rbacRules(t, rbacv3.RBAC_DENY, one(prinNot(prinRegex(`.+`))))}
	require.False(t, denyPlain.Allows(&RBACRequest{ID: "", Port: 80}))
	require.True(t, denyPlain.Allows(&RBACRequest{ID: idCaller, Port: 80}))
	anyone := &NetworkRBAC{Allow: rbacRules(t, rbacv3.RBAC_ALLOW, one(prinAny()))}
	require.True(t, anyone.Allows(&RBACRequest{ID: "", Port: 80}))
}
