package sidecar

import (
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

var ipTrailers = netip.MustParseAddr("127.0.0.13")

// A caller's X-Forwarded-Client-Cert in the trailers of its request never
// reaches the app, on any path: the header section's is replaced, and
// an app (a Go one reads r.Trailer; other stacks merge trailers into the
// headers) would otherwise see an identity the caller chose. Envoy drops
// HTTP/1 trailers unless enable_trailers is set; the sidecar passes the
// others on (gRPC and checksums use them) and drops this one.
func TestXFCCInRequestTrailersNeverReachesTheApp(t *testing.T) {
	const forged = "By=spiffe://beta.mesh/ns/demo/sa/b;URI=spiffe://alpha.mesh/ns/kube-system/sa/admin"
	for _, tc := range []struct {
		name     string
		netHTTP1 bool
		h2       bool
		upstream xdsclient.UpstreamHTTP
	}{
		{"HTTP/1.1", false, false, xdsclient.UpstreamHTTP1},
		{"HTTP/1.1 through net/http", true, false, xdsclient.UpstreamHTTP1},
		{"HTTP/2 to HTTP/1.1", false, true, xdsclient.UpstreamHTTP1},
		{"HTTP/2 to HTTP/2", false, true, xdsclient.UpstreamHTTP2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := svc{name: "trailers", ns: "demo", vip: "240.240.0.37", ports: []svcPort{{80, true}}, upstream: tc.upstream}
			edit := func(c *Config) { c.NetHTTP1 = tc.netHTTP1 }
			m := startServiceMesh(t, s, ipTrailers, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				body, _ := io.ReadAll(r.Body)
				fmt.Fprintf(w, "proto=%s body=%q header=%q trailer=%q checksum=%q", r.Proto, body,
					r.Header.Values(xfccHeader), r.Trailer.Values(xfccHeader), r.Trailer.Get("X-Checksum"))
			}), edit, edit)

			// A body of unknown length: chunked, or DATA frames, then the
			// trailers.
			req, err := http.NewRequest(http.MethodPost, "http://"+s.host()+"/", io.NopCloser(strings.NewReader("abc")))
			require.NoError(t, err)
			req.Trailer = http.Header{xfccHeader: {forged}, "X-Checksum": {"ok"}}
			resp, err := m.a.nat.httpClient(tc.h2).Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			got, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			require.Equal(t, http.StatusOK, resp.StatusCode, "%s", got)
			if tc.netHTTP1 {
				m.a.proxy.h1Mu.Lock()
				require.Empty(t, m.a.proxy.h1Conns, "not on net/http")
				m.a.proxy.h1Mu.Unlock()
			}
			t.Logf("%s", got)
			require.Contains(t, string(got), `body="abc"`)
			require.Contains(t, string(got), `URI=spiffe://alpha.mesh/ns/demo/sa/a"]`, "the sidecar's own header")
			require.NotContains(t, string(got), "kube-system", "the caller's XFCC reached the app")
		})
	}
}
