package xdsclient

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"strings"
	"testing"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/internal/pemutil"
	"github.com/isthmus-mesh/isthmus/pkg/ca"
)

// withSecret is r's snapshot at version plus the Secret at its own
// version, as the federator serves them.
func withSecret(tb testing.TB, r gatewayResources, version string, secret *tlsv3.Secret, secretVersion string) *cache.Snapshot {
	tb.Helper()
	snap := r.snapshot(tb, version)
	snap.Resources[types.Secret] = cache.NewResources(secretVersion, []types.Resource{secret})
	return snap
}

// testCA is a cluster CA of trust domain td; two of one trust domain have
// different roots, as before and after a root rotation.
func testCA(t *testing.T, td spiffeid.TrustDomain) *ca.CA {
	t.Helper()
	c, err := ca.New(t.Context(), fake.NewClientset(), ca.Options{TrustDomain: td, Namespace: "isthmus-system"})
	require.NoError(t, err)
	return c
}

func svidFrom(t *testing.T, c *ca.CA, id spiffeid.ID) x509svid.Source {
	t.Helper()
	s, err := ca.NewSelfSource(c.Authority, id, nil)
	require.NoError(t, err)
	return s
}

// serveTLS accepts TLS connections presenting svid and writes "ok" on
// each, until the test ends.
func serveTLS(t *testing.T, svid x509svid.Source) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.TLSServerConfig(svid))
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = conn.Write([]byte("ok"))
			_ = conn.Close()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		<-done
	})
	return ln.Addr().String()
}

// dialPeer connects to addr over TLS, validating the server with bundles
// as a sidecar validates a peer: against the bundle of the trust domain in
// its SPIFFE ID, which must be in td. It returns that ID.
func dialPeer(addr string, bundles x509bundle.Source, td spiffeid.TrustDomain) (spiffeid.ID, error) {
	conn, err := tls.Dial("tcp", addr, tlsconfig.TLSClientConfig(bundles, tlsconfig.AuthorizeMemberOf(td)))
	if err != nil {
		return spiffeid.ID{}, err
	}
	defer conn.Close()
	if _, err := io.ReadAll(conn); err != nil {
		return spiffeid.ID{}, err
	}
	return x509svid.IDFromCert(conn.ConnectionState().PeerCertificates[0])
}

func rootsOf(c *ca.CA) []*x509.Certificate { return c.Bundle().X509Authorities() }

// The federator publishes the trust bundles; the client's source hands
// them to go-spiffe's tlsconfig, which then validates a peer of another
// trust domain against that domain's bundle; a rotation replaces it at
// the next handshake, and a bad Secret is NACKed while the last good
// bundles stay.
func TestTrustBundlesOverSDS(t *testing.T) {
	f := newTLSFixture(t)
	beta := spiffeid.RequireTrustDomainFromString("beta.mesh")
	betaCA, betaCA2, rogue := testCA(t, beta), testCA(t, beta), testCA(t, beta)
	betaID := spiffeid.RequireFromPath(beta, "/ns/shop/sa/cart")
	betaPod := serveTLS(t, svidFrom(t, betaCA, betaID))
	betaPodRotated := serveTLS(t, svidFrom(t, betaCA2, betaID))
	impostor := serveTLS(t, svidFrom(t, rogue, betaID))

	srv := f.server(t)
	res := buildGateway(t, "10.0.0.5", echo)
	alphaRoots := rootsOf(f.ca)
	srv.set(t, withSecret(t, res, "v1", rootCA(t, map[string][]*x509.Certificate{
		"alpha.mesh": alphaRoots, "beta.mesh": rootsOf(betaCA),
	}), "s1"))
	c := startClient(t, f.clientConfig(t, srv.addr, f.federatorID))
	waitReady(t, c)
	eventually(t, "the bundles published", func() bool { return c.Current().Bundles != nil })
	require.Equal(t, "s1", c.Current().Versions[TypeSecret])
	srv.waitRequest(t, 0, "ACK of ROOTCA s1", ack(TypeSecret, "s1"))
	sds := srv.waitRequest(t, 0, "the SDS subscription", func(r *discoveryv3.DiscoveryRequest) bool { return r.GetTypeUrl() == TypeSecret })
	require.Equal(t, []string{RootCASecretName}, sds.GetResourceNames())

	b, err := c.Bundles().GetX509BundleForTrustDomain(f.td)
	require.NoError(t, err)
	require.Equal(t, alphaRoots, b.X509Authorities())

	id, err := dialPeer(betaPod, c.Bundles(), beta)
	require.NoError(t, err, "a beta workload verifies against beta's bundle")
	require.Equal(t, betaID, id)
	_, err = dialPeer(impostor, c.Bundles(), beta)
	require.ErrorContains(t, err, "x509svid: could not verify leaf certificate", "a certificate for beta from another root")
	_, err = dialPeer(betaPodRotated, c.Bundles(), beta)
	require.ErrorContains(t, err, "x509svid: could not verify leaf certificate", "beta's next root is not published yet")
	_, err = dialPeer(betaPod, c.Bundles(), spiffeid.RequireTrustDomainFromString("gamma.mesh"))
	require.ErrorContains(t, err, "unexpected trust domain")

	// Beta rotates its root: the federator publishes the new one (here
	// alone, the old one retired). The routing versions stay, so only the
	// Secret is pushed; the next handshake uses the new bundle.
	mark := srv.mark()
	srv.set(t, withSecret(t, res, "v1", rootCA(t, map[string][]*x509.Certificate{
		"alpha.mesh": alphaRoots, "beta.mesh": rootsOf(betaCA2),
	}), "s2"))
	waitUpdated(t, c)
	eventually(t, "s2 published", func() bool { return c.Current().Versions[TypeSecret] == "s2" })
	srv.waitRequest(t, mark, "ACK of ROOTCA s2", ack(TypeSecret, "s2"))
	id, err = dialPeer(betaPodRotated, c.Bundles(), beta)
	require.NoError(t, err)
	require.Equal(t, betaID, id)
	_, err = dialPeer(betaPod, c.Bundles(), beta)
	require.ErrorContains(t, err, "x509svid: could not verify leaf certificate", "the retired root is no longer trusted")
	s2 := c.Current()

	// A Secret that would hand the proxy a key: NACKed with the reason,
	// the rotated bundles stay.
	mark = srv.mark()
	srv.set(t, withSecret(t, res, "v1", &tlsv3.Secret{Name: RootCASecretName, Type: &tlsv3.Secret_TlsCertificate{
		TlsCertificate: &tlsv3.TlsCertificate{},
	}}, "s3"))
	n := srv.waitRequest(t, mark, "NACK of ROOTCA s3", nack(TypeSecret))
	require.Equal(t, `secret "ROOTCA": tls_certificate: not supported: private keys never leave the pod (the proxy makes its own key and gets its SVID from the CA)`,
		n.GetErrorDetail().GetMessage())
	require.Equal(t, "s2", n.GetVersionInfo(), "a NACK carries the version accepted last")
	require.Same(t, s2, c.Current())
	require.Contains(t, c.Stats().LastNACK, "private keys never leave the pod")
	id, err = dialPeer(betaPodRotated, c.Bundles(), beta)
	require.NoError(t, err)
	require.Equal(t, betaID, id)

	// So is one whose PEM is cut short.
	mark = srv.mark()
	cut := pemutil.EncodeCertificates(alphaRoots...)
	srv.set(t, withSecret(t, res, "v1", spiffeSecret(t, trustDomainEntry("alpha.mesh", cut[:len(cut)-30])), "s4"))
	n = srv.waitRequest(t, mark, "NACK of ROOTCA s4", func(r *discoveryv3.DiscoveryRequest) bool {
		return nack(TypeSecret)(r) && strings.Contains(r.GetErrorDetail().GetMessage(), "malformed PEM")
	})
	require.Contains(t, n.GetErrorDetail().GetMessage(),
		`secret "ROOTCA": validation_context.custom_validator_config.typed_config.trust_domains[0].trust_bundle.inline_bytes: malformed PEM: byte 0: PEM block is not complete`)
	require.Same(t, s2, c.Current())
}

// With FollowSDS the client validates the federator with the bundle the
// federator itself published, so after a root rotation it reconnects to a
// federator presenting a certificate from the new root, which its
// configured bundle does not know; a client without it cannot.
func TestFollowSDSReconnectsAfterRootRotation(t *testing.T) {
	f := newTLSFixture(t)
	next := testCA(t, f.td) // the rotated root of the same trust domain
	both := x509bundle.FromX509Authorities(f.td, append(rootsOf(f.ca), rootsOf(next)...))
	// Restarted on its port: an address of its own keeps it free meanwhile.
	srv := startXDSServer(t, "127.0.21.2:0", tlsconfig.MTLSServerConfig(f.federator, both, tlsconfig.AuthorizeMemberOf(f.td)))
	published := rootCA(t, map[string][]*x509.Certificate{f.td.Name(): both.X509Authorities()})
	srv.set(t, withSecret(t, buildGateway(t, "10.0.0.5", echo), "v1", published, "s1"))

	followCfg := f.clientConfig(t, srv.addr, f.federatorID)
	followCfg.TLS.FollowSDS = true
	follow := startClient(t, followCfg)
	static := startClient(t, f.clientConfig(t, srv.addr, f.federatorID))
	for _, c := range []*Client{follow, static} {
		waitReady(t, c)
		eventually(t, "the bundles published", func() bool { return c.Current().Bundles != nil })
	}

	// The federator restarts with an SVID from the new root.
	srv.stop()
	srv2 := startXDSServer(t, srv.addr, tlsconfig.MTLSServerConfig(svidFrom(t, next, f.federatorID), both, tlsconfig.AuthorizeMemberOf(f.td)))
	srv2.set(t, withSecret(t, buildGateway(t, "10.0.0.5", echo, cart), "v2", published, "s1"))

	eventually(t, "the following client reconnected and took v2", func() bool {
		_, ok := follow.Current().Clusters[cart.cluster()]
		return ok
	})
	eventually(t, "the static client refused the new root twice", func() bool {
		st := static.Stats()
		return st.Reconnects >= 2 && strings.Contains(st.LastError, "x509svid: could not verify leaf certificate")
	})
	require.NotContains(t, static.Current().Clusters, cart.cluster(), "it keeps its last config meanwhile")
	require.Equal(t, []spiffeid.ID{f.gwID}, srv2.peerIDs(), "only the following client reached the new federator")
}
