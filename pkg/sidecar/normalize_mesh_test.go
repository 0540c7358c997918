package sidecar

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// withNormalizePath sets normalize_path on fc's connection manager.
func withNormalizePath(tb testing.TB, fc *listenerv3.FilterChain) *listenerv3.FilterChain {
	f := fc.Filters[len(fc.Filters)-1]
	h := new(hcmv3.HttpConnectionManager)
	require.NoError(tb, f.GetTypedConfig().UnmarshalTo(h))
	h.NormalizePath = wrapperspb.Bool(true)
	f.ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(tb, h)}
	return fc
}

// noAdmin denies everyone /admin (url_path) and /secret (a ":path"
// header matcher), and allows the rest.
func noAdmin(tb testing.TB, _ *mesh) []*hcmv3.HttpFilter {
	return []*hcmv3.HttpFilter{httpRBACFilter(tb, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{
		"ns[demo]-policy[no-admin]-rule[0]": {
			Permissions: []*rbacv3.Permission{rbacPath(prefixed("/admin")), rbacHeader(":path", prefixed("/secret"))},
			Principals:  []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}},
		},
	})}
}

// startNormalizeMesh is startHTTPRBACMesh with noAdmin, and with
// normalize_path on b's HTTP chains when normalize is set.
func startNormalizeMesh(t testing.TB, edit func(*Config), normalize bool) *rbacMesh {
	t.Helper()
	m := &rbacMesh{mesh: startMeshWith(t, edit)}
	f := noAdmin(t, m.mesh)
	chain := func(port uint16, alpn ...string) *listenerv3.FilterChain {
		fc := withHTTPRBAC(t, inboundChain(t, port, true, alpn...), f)
		if normalize {
			fc = withNormalizePath(t, fc)
		}
		return fc
	}
	snap := snapshot(t, "v1", []*testCA{m.alpha, m.beta}, m.onB(echoSvc, ipHTTP), m.onB(dbSvc, ipTCP))
	m.xds.set(t, withInbound(t, snap,
		chain(m.b.http.addr.Port()),
		inboundChain(t, m.b.tcp.addr.Port(), false),
		chain(0, alpnHTTP1, alpnHTTP2),
		inboundChain(t, 0, false),
	))
	m.a.waitReady(t, "v1")
	m.b.waitReady(t, "v1")
	require.Equal(t, normalize, m.b.proxy.state.Load().cfg.Sidecar.Inbound.Chains[0].HTTP.NormalizePath)
	m.httpAddr = m.b.endpoint(ipHTTP).String()
	return m
}

// With normalize_path, the path HTTP RBAC matches is the normalized one,
// on every HTTP path: the usual ways around a DENY on /admin are denied
// too, an allowed request reaches the app with its path normalized and
// its query as sent, and a path that cannot be normalized is answered
// 400 without reaching the app. Without it, the app gets the path as
// sent (and the DENY is bypassed: the reason for normalize_path).
func TestInboundNormalizePath(t *testing.T) {
	bypasses := []string{"/public/../admin", "/./admin", "/%61dmin", "/%2e%2e/admin", "/public/%2E%2E/admin/x", "/x/../secret?a=1"}
	for _, tc := range inboundHTTPPaths {
		t.Run(tc.name, func(t *testing.T) {
			m := startNormalizeMesh(t, tc.edit, true)
			cert, _ := m.caller(t, "caller")
			c := newInboundClient(t, m.httpAddr, cert, tc.h2)

			resp, body := c.do("GET", "/admin", nil, nil)
			requireDenied(t, resp, body)
			for _, p := range bypasses {
				resp, body = c.do("GET", p, nil, nil)
				require.Equal(t, http.StatusForbidden, resp.StatusCode, "%s: %s", p, body)
			}
			resp, body = c.do("GET", "/public/./x?q=/../y", nil, nil)
			requireServed(t, resp, body, "/public/x")
			require.Equal(t, "/public/x?q=/../y", *m.b.http.lastTarget.Load())
			resp, body = c.do("GET", "/%7Eme/a%2Fb/%2fc", nil, nil)
			require.Equal(t, http.StatusOK, resp.StatusCode, body)
			require.Equal(t, "/~me/a%2Fb/%2fc", *m.b.http.lastTarget.Load(), "%2F is never decoded")

			resp, body = c.do("GET", "/public/%00", nil, nil)
			require.Equal(t, http.StatusBadRequest, resp.StatusCode, body)
			resp, body = c.do("GET", "/next", nil, nil)
			requireServed(t, resp, body, "/next")

			require.EqualValues(t, 3, m.b.http.requests.Load(), "only the allowed requests reached the app")
			m.requireRBACRefusals(t, 1+len(bypasses))
			require.EqualValues(t, 1, c.dials.Load(), "one connection served every request")
		})
	}
	t.Run("without normalize_path", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			h2   bool
			edit func(*Config)
		}{
			{"HTTP/1.1", false, nil},
			{"HTTP/2", true, nil},
		} {
			t.Run(tc.name, func(t *testing.T) {
				m := startNormalizeMesh(t, tc.edit, false)
				cert, _ := m.caller(t, "caller")
				c := newInboundClient(t, m.httpAddr, cert, tc.h2)
				resp, body := c.do("GET", "/admin", nil, nil)
				requireDenied(t, resp, body)
				// The app's ServeMux redirects a path it would clean: it
				// got the path as sent.
				c.do("GET", "/public/./x?q=/../y", nil, nil)
				require.Equal(t, "/public/./x?q=/../y", *m.b.http.lastTarget.Load())
				resp, body = c.do("GET", "/%61dmin", nil, nil)
				require.Equal(t, http.StatusOK, resp.StatusCode, "the bypass normalize_path exists for: %s", body)
				require.Equal(t, "/%61dmin", *m.b.http.lastTarget.Load())
			})
		}
	})
}

// The own HTTP/1.1 codec, written as bytes: an absolute-form target is
// normalized too, and a bad percent-encoding is answered 400.
func TestInboundNormalizePathH1Raw(t *testing.T) {
	m := startNormalizeMesh(t, nil, true)
	cert, _ := m.caller(t, "caller")
	h := dialH1Raw(t, m.httpAddr, cert)
	resp, body := h.roundTrip("GET http://echo.demo.svc.cluster.local/a/%2e%2e/admin HTTP/1.1\r\n" + echoHostLine + "\r\n")
	requireDenied(t, resp, body)
	resp, body = h.roundTrip("GET http://echo.demo.svc.cluster.local/a/./b?x HTTP/1.1\r\n" + echoHostLine + "\r\n")
	requireServed(t, resp, body, "/a/b")
	require.Equal(t, "/a/b?x", *m.b.http.lastTarget.Load())
	resp, body = h.roundTrip("GET /a%zz HTTP/1.1\r\n" + echoHostLine + "\r\n")
	require.Equal(t, http.StatusBadRequest, resp.StatusCode, body)
	require.EqualValues(t, 1, m.b.http.requests.Load())
}

// An absolute-form target with a query and no path is "/" with that
// query (RFC 9112 3.2.2) on every HTTP/1.x path: the sidecar's own
// codec, its HTTP/1.0 fallback to net/http, and net/http's server.
func TestInboundNormalizeAbsoluteFormWithOnlyAQuery(t *testing.T) {
	for _, tc := range []struct {
		name    string
		version string
		edit    func(*Config)
	}{
		{"own codec", "HTTP/1.1", nil},
		{"HTTP/1.0 through net/http", "HTTP/1.0", nil},
		{"net/http", "HTTP/1.1", func(c *Config) { c.NetHTTP1 = true }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := startNormalizeMesh(t, tc.edit, true)
			cert, _ := m.caller(t, "caller")
			h := dialH1Raw(t, m.httpAddr, cert)
			resp, body := h.roundTrip("GET http://echo.demo.svc.cluster.local?x=1 " + tc.version + "\r\n" + echoHostLine + "\r\n")
			requireServed(t, resp, body, "/")
			require.Equal(t, "/?x=1", *m.b.http.lastTarget.Load())
		})
	}
}

// BenchmarkInboundNormalizePath is a caller's requests straight to b's
// inbound listener (mTLS, HTTP RBAC's DENY on /admin) with normalize_path
// off and on, for a path with nothing to normalize and (on) one with dot
// segments, on the sidecar's own HTTP/1.1 and HTTP/2 paths. allocs/op
// counts the whole process (client, sidecar, app): compare off and on.
func BenchmarkInboundNormalizePath(b *testing.B) {
	for _, normalize := range []bool{false, true} {
		m := startNormalizeMesh(b, nil, normalize)
		cert := tlsCert(m.alpha.svid(b, m.alpha.id("demo", "caller")))
		for _, h2 := range []bool{false, true} {
			var protos http.Protocols
			if h2 {
				protos.SetUnencryptedHTTP2(true)
			} else {
				protos.SetHTTP1(true)
			}
			tr := &http.Transport{Protocols: &protos, MaxConnsPerHost: 1,
				DialContext: func(context.Context, string, string) (net.Conn, error) { return dialInbound(b, m.httpAddr, cert) }}
			b.Cleanup(tr.CloseIdleConnections)
			for _, path := range []struct{ name, target string }{{"clean", "/public/x?q=1"}, {"dots", "/public/./a/../x?q=1"}} {
				if path.name == "dots" && !normalize {
					continue // the app's ServeMux would redirect it
				}
				name := map[bool]string{false: "http1", true: "h2"}[h2] + "/" + map[bool]string{false: "off", true: "on"}[normalize] + "/" + path.name
				b.Run(name, func(b *testing.B) {
					req, err := http.NewRequest(http.MethodGet, "http://echo.demo.svc.cluster.local"+path.target, nil)
					require.NoError(b, err)
					b.ReportAllocs()
					for b.Loop() {
						resp, err := tr.RoundTrip(req)
						if err != nil {
							b.Fatal(err)
						}
						_, _ = io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
						if resp.StatusCode != http.StatusOK {
							b.Fatalf("status %d", resp.StatusCode)
						}
					}
				})
			}
		}
	}
}
