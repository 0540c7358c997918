package xdsclient

import (
	"regexp"
	"strings"
	"testing"

	xdscorev3 "github.com/cncf/xds/go/xds/core/v3"
	xdsmatcherv3 "github.com/cncf/xds/go/xds/type/matcher/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	httprbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/stretchr/testify/require"
	exprv1alpha1 "google.golang.org/genproto/googleapis/api/expr/v1alpha1"
)

// Builders for envoy.filters.http.rbac filters, as Istio writes them for
// an HTTP port's AuthorizationPolicy.

func httpRBACFilter(tb testing.TB, action rbacv3.RBAC_Action, policies map[string]*rbacv3.Policy) *hcmv3.HttpFilter {
	return &hcmv3.HttpFilter{Name: httpRBACName, ConfigType: &hcmv3.HttpFilter_TypedConfig{
		TypedConfig: mustAny(tb, &httprbacv3.RBAC{Rules: &rbacv3.RBAC{Action: action, Policies: policies}})}}
}

func smExact(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: s}}
}

func smPrefix(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: s}}
}

func smSuffix(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: s}}
}

func smContains(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Contains{Contains: s}}
}

func smRegex(re string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: re}}}
}

// ic is m with ignore_case.
func ic(m *matcherv3.StringMatcher) *matcherv3.StringMatcher {
	m.IgnoreCase = true
	return m
}

func permHeaderMatcher(h *routev3.HeaderMatcher) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: h}}
}

func permHeader(name string, m *matcherv3.StringMatcher) *rbacv3.Permission {
	return permHeaderMatcher(&routev3.HeaderMatcher{Name: name, HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: m}})
}

// permNotHeader is header name with invert_match.
func permNotHeader(name string, m *matcherv3.StringMatcher) *rbacv3.Permission {
	p := permHeader(name, m)
	p.GetHeader().InvertMatch = true
	return p
}

func permPresent(name string, invert bool) *rbacv3.Permission {
	return permHeaderMatcher(&routev3.HeaderMatcher{Name: name, InvertMatch: invert,
		HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: true}})
}

func permPath(m *matcherv3.StringMatcher) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{Rule: &matcherv3.PathMatcher_Path{Path: m}}}}
}

// withHTTPRBAC puts filters in front of the router of the connection
// manager that ends the inbound chain i.
func withHTTPRBAC(tb testing.TB, m *scMutable, i int, filters ...*hcmv3.HttpFilter) {
	fs := m.in.FilterChains[i].Filters
	editFilter(tb, fs[len(fs)-1], func(h *hcmv3.HttpConnectionManager) { h.HttpFilters = append(filters, h.HttpFilters...) })
}

// Istio's shape for an HTTP port decodes to the model: DENY then ALLOW
// before the router, header names lower-cased (host as :authority), the
// pseudo-headers told apart, regexes compiled and anchored, policies
// sorted by name; the chain's network RBAC, if any, stays its own.
func TestSidecarDecodeInboundHTTPRBAC(t *testing.T) {
	m := newSidecarMutable(t)
	deep := permPath(smPrefix("/x"))
	for range maxRBACDepth - 1 {
		deep = permNot(deep)
	}
	withHTTPRBAC(t, m, 0,
		httpRBACFilter(t, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{
			"ns[demo]-policy[deny-admin]-rule[0]": rbacPolicy(perms(permAnd(permHeader(":method", smExact("DELETE")), permPath(smPrefix("/admin/")))), prinAny()),
		}),
		httpRBACFilter(t, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
			"b": rbacPolicy(perms(permHeader("X-Tenant", ic(smContains("Blue"))), permPresent("Authorization", true),
				permHeader("Host", smSuffix(".demo.svc.cluster.local")), permHeader(":Authority", smExact("echo")), permHeader(":path", smRegex(`/v[0-9]/.*`))),
				prinExact(idCaller)),
			"a":    rbacPolicy(perms(permAnd(permPort(8080), permPath(ic(smExact("/Health"))))), prinAny()),
			"deep": rbacPolicy(perms(deep), prinAny()),
		}))
	withRBAC(m, 0, rbacFilter(t, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"net": rbacPolicy(perms(permAny()), prinAny())}))
	cfg, err := m.decode(t)
	require.NoError(t, err)
	ch := cfg.Sidecar.Inbound.Chains[0]

	str := func(k StringMatchKind, v string, ic bool) StringMatch {
		return StringMatch{Kind: k, Value: v, IgnoreCase: ic}
	}
	header := func(name string, f HeaderField, v StringMatch) Permission {
		return Permission{Kind: PermissionHeader, Header: &HeaderMatch{Name: name, Field: f, Value: v}}
	}
	path := func(v StringMatch) Permission { return Permission{Kind: PermissionURLPath, URLPath: &v} }
	wantDeep := path(str(MatchPrefix, "/x", false))
	for range maxRBACDepth - 1 {
		wantDeep = Permission{Kind: PermissionNot, Rules: []Permission{wantDeep}}
	}
	require.Equal(t, &HTTPRBAC{
		Deny: &RBACRules{Policies: []RBACPolicy{{Name: "ns[demo]-policy[deny-admin]-rule[0]",
			Permissions: []Permission{{Kind: PermissionAnd, Rules: []Permission{
				header(":method", HeaderMethod, str(MatchExact, "DELETE", false)), path(str(MatchPrefix, "/admin/", false))}}},
			Principals: []Principal{{Kind: PrincipalAny}}}}},
		Allow: &RBACRules{Policies: []RBACPolicy{
			{Name: "a", Permissions: []Permission{{Kind: PermissionAnd, Rules: []Permission{
				{Kind: PermissionPorts, Lo: 8080, Hi: 8081}, path(str(MatchExact, "/Health", true))}}},
				Principals: []Principal{{Kind: PrincipalAny}}},
			{Name: "b", Permissions: []Permission{
				header("x-tenant", HeaderOther, str(MatchContains, "Blue", true)),
				{Kind: PermissionHeader, Header: &HeaderMatch{Name: "authorization", Present: true, Invert: true}},
				header("host", HeaderAuthority, str(MatchSuffix, ".demo.svc.cluster.local", false)),
				header(":authority", HeaderAuthority, str(MatchExact, "echo", false)),
				header(":path", HeaderPath, StringMatch{Kind: MatchRegex, Value: `/v[0-9]/.*`, re: regexp.MustCompile(`^(?:/v[0-9]/.*)$`)}),
			}, Principals: []Principal{{Kind: PrincipalName, Name: str(MatchExact, idCaller, false)}}},
			{Name: "deep", Permissions: []Permission{wantDeep}, Principals: []Principal{{Kind: PrincipalAny}}},
		}},
	}, ch.HTTP.RBAC)
	require.Equal(t, &NetworkRBAC{Allow: &RBACRules{StatPrefix: "tcp.", Policies: []RBACPolicy{
		{Name: "net", Permissions: []Permission{{Kind: PermissionAny}}, Principals: []Principal{{Kind: PrincipalAny}}}}}}, ch.RBAC,
		"the chain's network RBAC decodes apart")
	require.NotNil(t, ch.HTTP.Routes, "the connection manager decodes as before")

	// One ALLOW without policies, and one DENY alone.
	m = newSidecarMutable(t)
	withHTTPRBAC(t, m, 0, httpRBACFilter(t, rbacv3.RBAC_ALLOW, nil))
	cfg, err = m.decode(t)
	require.NoError(t, err)
	require.Equal(t, &HTTPRBAC{Allow: &RBACRules{}}, cfg.Sidecar.Inbound.Chains[0].HTTP.RBAC)
	require.False(t, cfg.Sidecar.Inbound.Chains[0].HTTP.RBAC.Allows(&RBACRequest{ID: idCaller, Port: 80, Method: "GET", Path: "/"}))

	m = newSidecarMutable(t)
	withHTTPRBAC(t, m, 0, httpRBACFilter(t, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permAny()), prinExact(idBeta))}))
	cfg, err = m.decode(t)
	require.NoError(t, err)
	r := cfg.Sidecar.Inbound.Chains[0].HTTP.RBAC
	require.NotNil(t, r.Deny)
	require.Nil(t, r.Allow)

	// None: nil, which allows everything; the outbound side has none.
	m = newSidecarMutable(t)
	cfg, err = m.decode(t)
	require.NoError(t, err)
	require.Nil(t, cfg.Sidecar.Inbound.Chains[0].HTTP.RBAC)
	require.True(t, cfg.Sidecar.Inbound.Chains[0].HTTP.RBAC.Allows(&RBACRequest{}))
	require.Nil(t, cfg.Sidecar.Outbound.Chains[0].HTTP.RBAC)
}

func TestSidecarDecodeRefusesHTTPRBAC(t *testing.T) {
	const (
		hcm    = `listener "inbound": filter_chains[0].filters[0].typed_config.`
		rbac0  = hcm + `http_filters[0].typed_config.`
		policy = rbac0 + `rules.policies["p"].`
		perm   = policy + `permissions[0].`
	)
	allowAll := func(t *testing.T) *hcmv3.HttpFilter {
		return httpRBACFilter(t, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permAny()), prinAny())})
	}
	denyAll := func(t *testing.T) *hcmv3.HttpFilter {
		return httpRBACFilter(t, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permAny()), prinAny())})
	}
	// withFilters sets the inbound HTTP connection manager's http_filters.
	withFilters := func(fs func(t *testing.T) []*hcmv3.HttpFilter) func(t *testing.T, m *scMutable) {
		return func(t *testing.T, m *scMutable) {
			editFilter(t, m.in.FilterChains[0].Filters[0], func(h *hcmv3.HttpConnectionManager) { h.HttpFilters = fs(t) })
		}
	}
	router := func(t *testing.T) *hcmv3.HttpFilter { return routerFilter(t)[0] }
	// edit puts one ALLOW filter before the router and lets fn change it.
	edit := func(fn func(*httprbacv3.RBAC)) func(t *testing.T, m *scMutable) {
		return func(t *testing.T, m *scMutable) {
			f := allowAll(t)
			f.ConfigType = &hcmv3.HttpFilter_TypedConfig{TypedConfig: editTyped(t, f.GetTypedConfig(), fn)}
			withHTTPRBAC(t, m, 0, f)
		}
	}
	editPolicy := func(fn func(*rbacv3.Policy)) func(t *testing.T, m *scMutable) {
		return edit(func(r *httprbacv3.RBAC) { fn(r.Rules.Policies["p"]) })
	}
	withPerm := func(p *rbacv3.Permission) func(t *testing.T, m *scMutable) {
		return editPolicy(func(pol *rbacv3.Policy) { pol.Permissions = perms(p) })
	}
	withHeader := func(h *routev3.HeaderMatcher) func(t *testing.T, m *scMutable) { return withPerm(permHeaderMatcher(h)) }
	withPrin := func(p *rbacv3.Principal) func(t *testing.T, m *scMutable) {
		return editPolicy(func(pol *rbacv3.Policy) { pol.Principals = []*rbacv3.Principal{p} })
	}
	tooDeep := permHeader("x", smExact("y"))
	for range maxRBACDepth {
		tooDeep = permAnd(tooDeep)
	}
	for _, tc := range []struct {
		name   string
		mutate func(t *testing.T, m *scMutable)
		want   string
	}{
		// Where the filters sit.
		{"after the router", withFilters(func(t *testing.T) []*hcmv3.HttpFilter { return []*hcmv3.HttpFilter{router(t), allowAll(t)} }),
			hcm + `http_filters[1].name: envoy.filters.http.rbac after the router: RBAC filters come before it`},
		{"two DENY", withFilters(func(t *testing.T) []*hcmv3.HttpFilter { return []*hcmv3.HttpFilter{denyAll(t), denyAll(t), router(t)} }),
			hcm + `http_filters[1].typed_config.rules.action: DENY after a DENY filter: want at most one DENY filter, then at most one ALLOW filter (Istio's order)`},
		{"two ALLOW", withFilters(func(t *testing.T) []*hcmv3.HttpFilter {
			return []*hcmv3.HttpFilter{allowAll(t), allowAll(t), router(t)}
		}),
			hcm + `http_filters[1].typed_config.rules.action: ALLOW after an ALLOW filter`},
		{"ALLOW then DENY", withFilters(func(t *testing.T) []*hcmv3.HttpFilter { return []*hcmv3.HttpFilter{allowAll(t), denyAll(t), router(t)} }),
			hcm + `http_filters[1].typed_config.rules.action: DENY after an ALLOW filter`},
		{"three", withFilters(func(t *testing.T) []*hcmv3.HttpFilter {
			return []*hcmv3.HttpFilter{denyAll(t), allowAll(t), allowAll(t), router(t)}
		}), hcm + `http_filters: want at most two envoy.filters.http.rbac (DENY, then ALLOW), got 3`},
		{"no router", withFilters(func(t *testing.T) []*hcmv3.HttpFilter { return []*hcmv3.HttpFilter{allowAll(t)} }),
			hcm + `http_filters: want exactly one envoy.filters.http.router, got 0 filters`},
		{"another HTTP filter", withFilters(func(t *testing.T) []*hcmv3.HttpFilter {
			return []*hcmv3.HttpFilter{denyAll(t), {Name: "envoy.filters.http.fault", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, &faultv3.HTTPFault{})}}, router(t)}
		}), `filter_chains[0].filters[0].typed_config.http_filters[1].name: unsupported HTTP filter "envoy.filters.http.fault" (only envoy.filters.http.router, after at most two envoy.filters.http.rbac)`},
		{"on the outbound listener", func(t *testing.T, m *scMutable) {
			editFilter(t, m.out.FilterChains[0].Filters[0], func(h *hcmv3.HttpConnectionManager) {
				h.HttpFilters = append([]*hcmv3.HttpFilter{allowAll(t)}, h.HttpFilters...)
			})
		}, `listener "outbound": filter_chains[0].filters[0].typed_config.http_filters[0].name: envoy.filters.http.rbac is not supported on the outbound listener (inbound chains only)`},
		{"network RBAC's typed_config", withFilters(func(t *testing.T) []*hcmv3.HttpFilter {
			return []*hcmv3.HttpFilter{{Name: httpRBACName, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, &netrbacv3.RBAC{StatPrefix: "tcp."})}}, router(t)}
		}), hcm + `http_filters[0].typed_config: unsupported type "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC" (want ` + httpRBACType + `)`},
		{"no typed_config", withFilters(func(t *testing.T) []*hcmv3.HttpFilter {
			return []*hcmv3.HttpFilter{{Name: httpRBACName}, router(t)}
		}), hcm + `http_filters[0].typed_config: is missing`},
		{"is_optional", withFilters(func(t *testing.T) []*hcmv3.HttpFilter {
			f := allowAll(t)
			f.IsOptional = true
			return []*hcmv3.HttpFilter{f, router(t)}
		}), hcm + `http_filters[0].is_optional: not supported`},

		// The filter's own fields: rules, and nothing else.
		{"rules missing", edit(func(r *httprbacv3.RBAC) { r.Rules = nil }), rbac0 + `rules: is missing`},
		{"LOG", edit(func(r *httprbacv3.RBAC) { r.Rules.Action = rbacv3.RBAC_LOG }), rbac0 + `rules.action: LOG is not supported (ALLOW or DENY)`},
		{"shadow_rules", edit(func(r *httprbacv3.RBAC) { r.ShadowRules = &rbacv3.RBAC{} }), rbac0 + `shadow_rules: not supported`},
		{"shadow_rules_stat_prefix", edit(func(r *httprbacv3.RBAC) { r.ShadowRulesStatPrefix = "s" }), rbac0 + `shadow_rules_stat_prefix: not supported`},
		{"matcher", edit(func(r *httprbacv3.RBAC) { r.Matcher = &xdsmatcherv3.Matcher{} }), rbac0 + `matcher: not supported`},
		{"shadow_matcher", edit(func(r *httprbacv3.RBAC) { r.ShadowMatcher = &xdsmatcherv3.Matcher{} }), rbac0 + `shadow_matcher: not supported`},
		{"track_per_rule_stats", edit(func(r *httprbacv3.RBAC) { r.TrackPerRuleStats = true }), rbac0 + `track_per_rule_stats: not supported`},
		{"rules_stat_prefix", edit(func(r *httprbacv3.RBAC) { r.RulesStatPrefix = "r" }), rbac0 + `rules_stat_prefix: not supported`},
		{"audit_logging_options", edit(func(r *httprbacv3.RBAC) { r.Rules.AuditLoggingOptions = &rbacv3.RBAC_AuditLoggingOptions{} }),
			rbac0 + `rules.audit_logging_options: not supported`},

		// Policies.
		{"no permissions", editPolicy(func(p *rbacv3.Policy) { p.Permissions = nil }), policy + `permissions: is empty`},
		{"no principals", editPolicy(func(p *rbacv3.Policy) { p.Principals = nil }), policy + `principals: is empty`},
		{"condition", editPolicy(func(p *rbacv3.Policy) { p.Condition = &exprv1alpha1.Expr{} }), policy + `condition: not supported`},

		// Permissions: the network ones, header and url_path.
		{"no rule", withPerm(&rbacv3.Permission{}),
			perm[:len(perm)-1] + `: sets no rule (want any, destination_port, destination_port_range, destination_ip, header, url_path, and_rules, or_rules or not_rule)`},
		{"destination_ip without address", withPerm(&rbacv3.Permission{Rule: &rbacv3.Permission_DestinationIp{DestinationIp: &corev3.CidrRange{}}}),
			perm + `destination_ip.address_prefix: "" is not an IP address`},
		{"requested_server_name", withPerm(&rbacv3.Permission{Rule: &rbacv3.Permission_RequestedServerName{RequestedServerName: smExact("x")}}),
			perm + `requested_server_name: not supported`},
		{"port 0", withPerm(permPort(0)), perm + `destination_port: 0 is not a port`},
		{"too deep", withPerm(tooDeep), perm[:len(perm)-1] + strings.Repeat(".and_rules.rules[0]", maxRBACDepth) + `: nested deeper than 16 levels`},

		// Header matchers.
		{"header without name", withHeader(&routev3.HeaderMatcher{HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: true}}),
			perm + `header.name: is empty`},
		{":scheme", withPerm(permHeader(":scheme", smExact("https"))),
			perm + `header.name: pseudo-header ":scheme" is not supported (:method, :authority or :path)`},
		{"no match", withHeader(&routev3.HeaderMatcher{Name: "x"}), perm + `header: sets no match (want string_match or present_match)`},
		{"present_match false", withHeader(&routev3.HeaderMatcher{Name: "x", HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{}}),
			perm + `header.present_match: false is not supported (true; with invert_match for an absent header)`},
		//lint:ignore SA1019 the deprecated matcher is what must be refused
		{"exact_match", withHeader(&routev3.HeaderMatcher{Name: "x", HeaderMatchSpecifier: &routev3.HeaderMatcher_ExactMatch{ExactMatch: "y"}}),
			perm + `header.exact_match: not supported`},
		//lint:ignore SA1019 the deprecated matcher is what must be refused
		{"prefix_match", withHeader(&routev3.HeaderMatcher{Name: "x", HeaderMatchSpecifier: &routev3.HeaderMatcher_PrefixMatch{PrefixMatch: "y"}}),
			perm + `header.prefix_match: not supported`},
		//lint:ignore SA1019 the deprecated matcher is what must be refused
		{"safe_regex_match", withHeader(&routev3.HeaderMatcher{Name: "x", HeaderMatchSpecifier: &routev3.HeaderMatcher_SafeRegexMatch{SafeRegexMatch: &matcherv3.RegexMatcher{Regex: "y"}}}),
			perm + `header.safe_regex_match: not supported`},
		{"range_match", withHeader(&routev3.HeaderMatcher{Name: "x", HeaderMatchSpecifier: &routev3.HeaderMatcher_RangeMatch{RangeMatch: &typev3.Int64Range{Start: 1, End: 2}}}),
			perm + `header.range_match: not supported`},
		{"treat_missing_header_as_empty", withHeader(&routev3.HeaderMatcher{Name: "x", TreatMissingHeaderAsEmpty: true,
			HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: smExact("")}}),
			perm + `header.treat_missing_header_as_empty: not supported`},
		{"string_match without pattern", withPerm(permHeader("x", &matcherv3.StringMatcher{})),
			perm + `header.string_match: sets no pattern (want exact, prefix, suffix, contains or safe_regex)`},
		{"string_match custom", withPerm(permHeader("x", &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Custom{Custom: &xdscorev3.TypedExtensionConfig{}}})),
			perm + `header.string_match.custom: not supported`},
		{"header regex that does not compile", withPerm(permHeader("x", smRegex(`a)|(b`))),
			perm + `header.string_match.safe_regex.regex: "a)|(b" does not compile`},
		{"header regex with ignore_case", withPerm(permHeader("x", ic(smRegex(`a`)))),
			perm + `header.string_match.ignore_case: is not supported with safe_regex`},
		{"empty prefix (Envoy's validation)", withPerm(permHeader("x", smPrefix(""))), rbac0[:len(rbac0)-1] + `: invalid: `},

		// url_path.
		{"url_path without path", withPerm(&rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{}}}),
			perm + `url_path.path: is missing`},
		{"url_path regex that does not compile", withPerm(permPath(smRegex(`[`))), perm + `url_path.path.safe_regex.regex: "[" does not compile`},
		{"url_path regex with ignore_case", withPerm(permPath(ic(smRegex(`/a`)))), perm + `url_path.path.ignore_case: is not supported with safe_regex`},

		// Principals: the network filter's.
		{"principal header", withPrin(&rbacv3.Principal{Identifier: &rbacv3.Principal_Header{Header: &routev3.HeaderMatcher{Name: "x"}}}),
			policy + `principals[0].header: not supported`},
		{"principal url_path", withPrin(&rbacv3.Principal{Identifier: &rbacv3.Principal_UrlPath{UrlPath: &matcherv3.PathMatcher{}}}),
			policy + `principals[0].url_path: not supported`},
		{"principal_name contains", withPrin(prinName(smContains("x"))), policy + `principals[0].authenticated.principal_name.contains: not supported`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newSidecarMutable(t)
			tc.mutate(t, m)
			requireNACK(t, m, tc.want)
		})
	}
}

// headerList is a request's header fields, as an HTTP path would give
// them to RBAC: a name's values joined with ",".
type headerList [][2]string

func (h headerList) Lookup(name string) (string, bool) {
	var vs []string
	for _, f := range h {
		if strings.EqualFold(f[0], name) {
			vs = append(vs, f[1])
		}
	}
	if len(vs) == 1 {
		return vs[0], true // no allocation for the common case
	}
	return strings.Join(vs, ","), vs != nil
}

// httpRules decodes one HTTP RBAC filter of action with policies.
func httpRules(tb testing.TB, action rbacv3.RBAC_Action, policies map[string]*rbacv3.Policy) *RBACRules {
	tb.Helper()
	r, got, err := decodeHTTPRBAC(httpRBACFilter(tb, action, policies))
	require.NoError(tb, err)
	require.Equal(tb, action, got)
	return r
}

// The evaluator on requests, by Envoy's semantics: the pseudo-headers,
// host as :authority, url_path without the query and fragment where
// :path keeps them, a header's values joined with ",", an absent header
// matching nothing unless present_match is inverted.
func TestHTTPRBACAllows(t *testing.T) {
	allow := func(perm *rbacv3.Permission) *HTTPRBAC {
		return &HTTPRBAC{Allow: httpRules(t, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(perm), prinAny())})}
	}
	req := func(method, authority, path string, headers ...string) *RBACRequest {
		var h headerList
		for i := 0; i+1 < len(headers); i += 2 {
			h = append(h, [2]string{headers[i], headers[i+1]})
		}
		return &RBACRequest{ID: idCaller, Port: 8080, Method: method, Authority: authority, Path: path, Headers: h}
	}
	get := func(path string, headers ...string) *RBACRequest {
		return req("GET", "echo.demo:8080", path, headers...)
	}
	type call struct {
		req  *RBACRequest
		want bool
	}
	both := &HTTPRBAC{
		// No DELETE under /admin/, whoever asks.
		Deny: httpRules(t, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{
			"deny": rbacPolicy(perms(permAnd(permHeader(":method", smExact("DELETE")), permPath(smPrefix("/admin/")))), prinAny()),
		}),
		// The caller anything on 8080; web only GET, and only with a tenant.
		Allow: httpRules(t, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
			"caller": rbacPolicy(perms(permPort(8080)), prinExact(idCaller)),
			"web":    rbacPolicy(perms(permAnd(permHeader(":method", smExact("GET")), permPresent("x-tenant", false))), prinExact(idWeb)),
		}),
	}
	as := func(id string, r *RBACRequest) *RBACRequest { r.ID = id; return r }
	for _, tc := range []struct {
		name  string
		r     *HTTPRBAC
		calls []call
	}{
		{"none", nil, []call{{get("/"), true}}},
		{"method", allow(permHeader(":method", smExact("GET"))), []call{
			{get("/"), true}, {req("POST", "echo", "/"), false}, {req("get", "echo", "/"), false}}},
		{"method ignore_case", allow(permHeader(":method", ic(smExact("get")))), []call{{get("/"), true}, {req("PUT", "echo", "/"), false}}},
		{":authority", allow(permHeader(":authority", smExact("echo.demo:8080"))), []call{
			{get("/"), true}, {req("GET", "echo.demo", "/"), false}, {req("GET", "", "/"), false}}},
		{"host is :authority", allow(permHeader("Host", smPrefix("echo."))), []call{
			{get("/"), true}, {req("GET", "db.demo", "/"), false},
			{req("GET", "db.demo", "/", "host", "echo.demo"), false}}}, // never a header of its own
		{":path keeps the query", allow(permHeader(":path", smExact("/api/v1"))), []call{
			{get("/api/v1"), true}, {get("/api/v1?x=1"), false}}},
		{"url_path drops the query and fragment", allow(permPath(smExact("/api/v1"))), []call{
			{get("/api/v1"), true}, {get("/api/v1?x=/admin"), true}, {get("/api/v1#top"), true}, {get("/api/v1/"), false}, {get("/API/v1"), false}}},
		{"url_path ignore_case", allow(permPath(ic(smExact("/api/v1")))), []call{{get("/API/V1?Q"), true}, {get("/api/v2"), false}}},
		{"url_path prefix", allow(permPath(smPrefix("/admin/"))), []call{{get("/admin/x"), true}, {get("/admin"), false}, {get("/x?/admin/"), false}}},
		{"url_path suffix", allow(permPath(smSuffix(".json"))), []call{{get("/a/b.json?x=y.html"), true}, {get("/a.json.html"), false}}},
		{"url_path contains", allow(permPath(smContains("/internal/"))), []call{{get("/v1/internal/x"), true}, {get("/v1/x?/internal/"), false}}},
		{"url_path regex, whole path", allow(permPath(smRegex(`/users/[0-9]+`))), []call{
			{get("/users/12"), true}, {get("/users/12?x"), true}, {get("/users/12/x"), false}, {get("/x/users/12"), false}}},
		{"url_path without a path (CONNECT)", allow(permPath(smPrefix("/"))), []call{{req("CONNECT", "echo:443", ""), false}}},
		{"not url_path without a path", allow(permNot(permPath(smPrefix("/")))), []call{{req("CONNECT", "echo:443", ""), true}, {get("/"), false}}},
		{"header exact", allow(permHeader("X-Tenant", smExact("blue"))), []call{
			{get("/", "x-tenant", "blue"), true}, {get("/", "X-TENANT", "blue"), true}, {get("/", "x-tenant", "Blue"), false},
			{get("/", "x-tenant", "blue2"), false}, {get("/"), false}}},
		{"header ignore_case", allow(permHeader("x-tenant", ic(smExact("BLUE")))), []call{{get("/", "x-tenant", "blue"), true}}},
		{"header values joined with a comma", allow(permHeader("x-a", smExact("1,2"))), []call{
			{get("/", "x-a", "1", "x-b", "x", "x-a", "2"), true}, {get("/", "x-a", "1"), false}, {get("/", "x-a", "1,2"), true}}},
		{"header prefix of joined values", allow(permHeader("x-a", smPrefix("1,"))), []call{{get("/", "x-a", "1", "x-a", "2"), true}, {get("/", "x-a", "12"), false}}},
		{"header regex, whole value", allow(permHeader("x-a", smRegex(`[0-9]+`))), []call{{get("/", "x-a", "12"), true}, {get("/", "x-a", "12a"), false}}},
		{"header contains ignore_case", allow(permHeader("authorization", ic(smContains("bearer ")))), []call{
			{get("/", "Authorization", "Bearer abc"), true}, {get("/", "Authorization", "Basic abc"), false}, {get("/", "Authorization", "Bear"), false}}},
		{"header contains", allow(permHeader("authorization", smContains("bearer "))), []call{{get("/", "Authorization", "Bearer abc"), false}}},
		{"header empty value", allow(permHeader("x-a", smExact(""))), []call{{get("/", "x-a", ""), true}, {get("/"), false}}},
		{"present", allow(permPresent("x-a", false)), []call{{get("/", "x-a", ""), true}, {get("/", "x-a", "1"), true}, {get("/"), false}}},
		{"present inverted: absent", allow(permPresent("x-a", true)), []call{{get("/", "x-a", "1"), false}, {get("/"), true}}},
		{"present :authority inverted", allow(permPresent(":authority", true)), []call{{get("/"), false}, {req("GET", "", "/"), true}}},
		{"inverted string: present and other", allow(permNotHeader("x-a", smExact("1"))), []call{
			{get("/", "x-a", "2"), true}, {get("/", "x-a", "1"), false},
			{get("/"), false}}}, // Envoy: an absent header matches nothing, inverted or not
		{"not_rule of a header: absent too", allow(permNot(permHeader("x-a", smExact("1")))), []call{{get("/"), true}, {get("/", "x-a", "1"), false}}},
		{"port and header", allow(permAnd(permPort(8080), permHeader(":method", smExact("GET")))), []call{
			{get("/"), true}, {&RBACRequest{Port: 9090, Method: "GET", Path: "/"}, false}}},
		{"DENY then ALLOW", both, []call{
			{get("/admin/x"), true},
			{req("DELETE", "echo", "/admin/x"), false},
			{req("DELETE", "echo", "/x"), true},
			{as(idWeb, get("/", "x-tenant", "t")), true},
			{as(idWeb, get("/")), false},
			{as(idWeb, req("POST", "echo", "/", "x-tenant", "t")), false},
			{as(idWeb, req("DELETE", "echo", "/admin/x", "x-tenant", "t")), false},
			{as(idBeta, get("/", "x-tenant", "t")), false},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, c := range tc.calls {
				require.Equal(t, c.want, tc.r.Allows(c.req), "%s %s %q %v", c.req.Method, c.req.Authority, c.req.Path, c.req.Headers)
			}
		})
	}
}

// BenchmarkHTTPRBACAllows is one request's decision against what Istio
// sends for an HTTP port with a DENY and an ALLOW policy: no allocation,
// whatever the matchers.
func BenchmarkHTTPRBACAllows(b *testing.B) {
	r := &HTTPRBAC{
		Deny: httpRules(b, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{
			"ns[demo]-policy[deny-admin]-rule[0]": rbacPolicy(perms(permAnd(
				permOr(permHeader(":method", smExact("DELETE")), permHeader(":method", smExact("PUT"))),
				permOr(permPath(smPrefix("/admin/")), permPath(smRegex(`/internal/.*`))))),
				prinNot(prinRegex(`spiffe://[^/]+/ns/ops/.*`))),
		}),
		Allow: httpRules(b, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
			"ns[demo]-policy[allow-web]-rule[0]": rbacPolicy(perms(permAnd(
				permHeader(":method", smExact("GET")), permHeader(":authority", ic(smPrefix("echo."))),
				permPresent("x-tenant", false), permNot(permHeader("user-agent", ic(smContains("curl")))))),
				prinExact(idWeb)),
			"ns[demo]-policy[allow-caller]-rule[0]": rbacPolicy(perms(permAnd(permPort(8080), permPath(smPrefix("/api/")))),
				prinName(ic(smSuffix("/SA/CALLER")))),
		}),
	}
	headers := headerList{{"accept", "*/*"}, {"user-agent", "Go-http-client/1.1"}, {"x-request-id", "5b9e0d0e"},
		{"x-b3-traceid", "80f198ee56343ba8"}, {"accept-encoding", "gzip"}, {"x-tenant", "blue"}}
	caller := &RBACRequest{ID: idCaller, Port: 8080, Method: "POST", Authority: "echo.demo.svc.cluster.local", Path: "/api/v1/orders?limit=10", Headers: headers}
	web := &RBACRequest{ID: idWeb, Port: 8080, Method: "GET", Authority: "echo.demo.svc.cluster.local:8080", Path: "/index.html", Headers: headers}
	denied := &RBACRequest{ID: idCaller, Port: 8080, Method: "DELETE", Authority: "echo", Path: "/admin/users/1", Headers: headers}
	require.True(b, r.Allows(caller))
	require.True(b, r.Allows(web))
	require.False(b, r.Allows(denied))
	b.ReportAllocs()
	for b.Loop() {
		if !r.Allows(caller) || !r.Allows(web) || r.Allows(denied) {
			b.Fatal("a decision changed")
		}
	}
	if a := testing.AllocsPerRun(100, func() { r.Allows(caller); r.Allows(web); r.Allows(denied) }); a != 0 {
		b.Fatalf("%v allocations per decision", a)
	}
}

// HTTP RBAC decides a plaintext caller's requests (ID "") as network
// RBAC decides its connection: no authenticated principal matches it,
// not_id of one does, and the request's own attributes still count.
func TestHTTPRBACUnauthenticated(t *testing.T) {
	policy := func(perm *rbacv3.Permission, prin *rbacv3.Principal) map[string]*rbacv3.Policy {
		return map[string]*rbacv3.Policy{"p": rbacPolicy(perms(perm), prin)}
	}
	plain := &RBACRequest{Port: 8080, Method: "GET", Authority: "echo.demo:8080", Path: "/admin/x"}
	mtls := *plain
	mtls.ID = idCaller

	allowNS := &HTTPRBAC{Allow: httpRules(t, rbacv3.RBAC_ALLOW, policy(permAny(), prinRegex(`.*/ns/demo/.*`)))}
	require.False(t, allowNS.Allows(plain))
	require.True(t, allowNS.Allows(&mtls))

	allowAnyString := &HTTPRBAC{Allow: httpRules(t, rbacv3.RBAC_ALLOW, policy(permAny(), prinName(smRegex(`.*`))))}
	require.False(t, allowAnyString.Allows(plain), "authenticated with a pattern matching \"\" still needs a certificate")

	denyNotPrincipals := &HTTPRBAC{Deny: httpRules(t, rbacv3.RBAC_DENY, policy(permPath(smPrefix("/admin/")), prinNot(prinRegex(`.+`))))}
	require.False(t, denyNotPrincipals.Allows(plain), "notPrincipals [*] on /admin/ refuses the plaintext caller")
	require.True(t, denyNotPrincipals.Allows(&mtls))
	other := *plain
	other.Path = "/public"
	require.True(t, denyNotPrincipals.Allows(&other), "the rule's path still decides")

	allowNotID := &HTTPRBAC{Allow: httpRules(t, rbacv3.RBAC_ALLOW, policy(permHeader(":method", smExact("GET")), prinNot(prinExact(idCaller))))}
	require.True(t, allowNotID.Allows(plain))
	require.False(t, allowNotID.Allows(&mtls))
}
