package xds

import (
	"context"
	"crypto/tls"
	"io"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/internal/testlog"
	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/trust"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// trustStore is the fixture's trust store, which NewServer was given.
func (f *fixture) trustStore() *trust.Store {
	f.t.Helper()
	s, ok := f.srv.bundles.(*trust.Store)
	require.True(f.t, ok, "the fixture's server has a %T", f.srv.bundles)
	return s
}

// setPeer publishes peer trust domain td's roots, as the federation
// stream does.
func (f *fixture) setPeer(c *ca.CA, sequence uint64) {
	f.t.Helper()
	b := spiffebundle.FromX509Authorities(c.Authority.TrustDomain(), c.Bundle().X509Authorities())
	b.SetSequenceNumber(sequence)
	require.NoError(f.t, f.trustStore().SetPeer(b))
}

// gatewayClient runs the proxies' own xDS client against the fixture's
// TLS port, as the east-west gateway does.
func (f *fixture) gatewayClient() *xdsclient.Client {
	f.t.Helper()
	c, err := xdsclient.New(xdsclient.ClientConfig{
		Server: f.tlsAddr,
		TLS: &xdsclient.TLSConfig{
			SVID: svidOf(f.t, f.ca, gatewayID), Bundle: f.ca.Bundle(), Authorizer: tlsconfig.AuthorizeID(federatorID), FollowSDS: true,
		},
		Node:       xdsclient.GatewayNode("a", "10.0.0.5", "eastwest-gw-0", "isthmus-system"),
		BackoffMin: 10 * time.Millisecond, BackoffMax: 100 * time.Millisecond,
		Logger: testlog.New(f.t),
	})
	require.NoError(f.t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	f.t.Cleanup(func() {
		cancel()
		require.NoError(f.t, <-done)
	})
	return c
}

// bundleOn polls c's bundle source for td until ok says it is the one.
func bundleOn(t *testing.T, c *xdsclient.Client, td spiffeid.TrustDomain, what string, ok func(*x509bundle.Bundle, error) bool) {
	t.Helper()
	require.Eventually(t, func() bool { return ok(c.Bundles().GetX509BundleForTrustDomain(td)) }, wait, 5*time.Millisecond, what)
}

// peerWorkload serves TLS with an SVID of c's trust domain until the test
// ends.
func peerWorkload(t *testing.T, c *ca.CA, id spiffeid.ID) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.TLSServerConfig(svidOf(t, c, id)))
	require.NoError(t, err)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = conn.Write([]byte("ok"))
			_ = conn.Close()
		}
	}()
	t.Cleanup(func() { _ = ln.Close() })
	return ln.Addr().String()
}

// dialWith connects to addr validating it with bundles, as a sidecar
// validates a peer, and returns the peer's SPIFFE ID.
func dialWith(addr string, bundles x509bundle.Source, td spiffeid.TrustDomain) (spiffeid.ID, error) {
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

// The federator serves every bundle of its trust store as ROOTCA; the
// gateway's xDS client hands it to go-spiffe, which then validates a
// peer's workload against the peer's own bundle. A peer joining, rotating
// and leaving reaches the proxy with no other change pushed, and a
// catalog change does not push the bundles again.
func TestTrustBundlesReachTheProxies(t *testing.T) {
	f := newFixture(t, Options{})
	f.setCatalog(echoService())
	gw := f.gatewayClient()

	// The local bundle, from the start.
	bundleOn(t, gw, tdA, "a.mesh's bundle", func(b *x509bundle.Bundle, err error) bool {
		return err == nil && b.Equal(f.ca.Bundle())
	})
	require.Eventually(t, func() bool {
		st := f.srv.Status()
		return st.Gateway.SecretsVersion != "" && len(st.Proxies) == 1 &&
			st.Proxies[0].Acked[resource.SecretType] == st.Gateway.SecretsVersion &&
			st.Proxies[0].Acked[resource.ListenerType] == st.Gateway.Versions[resource.ListenerType]
	}, wait, 5*time.Millisecond, "the gateway ACKs ROOTCA")
	st := f.srv.Status().Gateway
	require.NotEqual(t, st.Version, st.SecretsVersion, "the Secret has its own version")
	require.Equal(t, []string{RootCASecretName}, st.Resources[resource.SecretType])
	_, err := gw.Bundles().GetX509BundleForTrustDomain(tdB)
	require.ErrorContains(t, err, `no trust bundle for trust domain "b.mesh" (the federator's ROOTCA has a.mesh)`)

	// A peer joins: its bundle is published, on its own, and validates
	// its workloads.
	peerCA := newCA(t, tdB)
	cart := spiffeid.RequireFromPath(tdB, "/ns/shop/sa/cart")
	cartPod := peerWorkload(t, peerCA, cart)
	accepted := gw.Stats().Accepted
	routing := gw.Stats().Versions[xdsclient.TypeListener]
	f.setPeer(peerCA, 1)
	bundleOn(t, gw, tdB, "b.mesh's bundle", func(b *x509bundle.Bundle, err error) bool {
		return err == nil && b.Equal(peerCA.Bundle())
	})
	id, err := dialWith(cartPod, gw.Bundles(), tdB)
	require.NoError(t, err)
	require.Equal(t, cart, id)
	a, err := gw.Bundles().GetX509BundleForTrustDomain(tdA)
	require.NoError(t, err)
	require.True(t, a.Equal(f.ca.Bundle()), "bundles are never merged")
	time.Sleep(quiet) // anything else pushed would be accepted by now
	require.Equal(t, accepted+1, gw.Stats().Accepted, "only the Secret was pushed")
	require.Equal(t, routing, gw.Stats().Versions[xdsclient.TypeListener])

	// The peer rotates its root: the next handshake uses the new bundle.
	rotated := newCA(t, tdB)
	rotatedPod := peerWorkload(t, rotated, cart)
	_, err = dialWith(rotatedPod, gw.Bundles(), tdB)
	require.ErrorContains(t, err, "x509svid: could not verify leaf certificate")
	f.setPeer(rotated, 2)
	bundleOn(t, gw, tdB, "b.mesh's rotated bundle", func(b *x509bundle.Bundle, err error) bool {
		return err == nil && b.Equal(rotated.Bundle())
	})
	id, err = dialWith(rotatedPod, gw.Bundles(), tdB)
	require.NoError(t, err)
	require.Equal(t, cart, id)
	_, err = dialWith(cartPod, gw.Bundles(), tdB)
	require.ErrorContains(t, err, "x509svid: could not verify leaf certificate", "the retired root")

	// A catalog change pushes routes, not the bundles again.
	secrets := gw.Stats().Versions[xdsclient.TypeSecret]
	f.setCatalog(echoService(), webService())
	require.Eventually(t, func() bool {
		_, ok := gw.Current().Clusters["outbound|8080||web.demo.svc.cluster.local"]
		return ok
	}, wait, 5*time.Millisecond)
	require.Equal(t, secrets, gw.Stats().Versions[xdsclient.TypeSecret])

	// The peer leaves: its bundle is gone from the proxies too.
	f.trustStore().DeletePeer(tdB)
	bundleOn(t, gw, tdB, "b.mesh's bundle gone", func(_ *x509bundle.Bundle, err error) bool { return err != nil })
	_, err = dialWith(rotatedPod, gw.Bundles(), tdB)
	require.ErrorContains(t, err, `no trust bundle for trust domain "b.mesh"`)
	require.NotEmpty(t, f.srv.Status().Gateway.SecretsVersion)
}

// Nothing is served before the local catalog is published, trust bundles
// included; once it is, ROOTCA comes with the rest.
func TestSecretsWaitForTheCatalog(t *testing.T) {
	f := newFixture(t, Options{})
	f.setPeer(newCA(t, tdB), 1)
	c := openADS(t, f.dialTLS(svidOf(t, f.ca, gatewayID)), gatewayNode)
	c.send(resource.SecretType, []string{RootCASecretName}, "")
	c.nothing("trust bundles served before the local catalog was published")

	f.setCatalog()
	r := c.next()
	require.Equal(t, resource.SecretType, r.GetTypeUrl())
	_, want, err := TranslateSecrets(currentBundles(f.trustStore()))
	require.NoError(t, err)
	require.Equal(t, want, r.GetVersionInfo())
	require.Len(t, r.GetResources(), 1)
	s := unpack[*tlsv3.Secret](t, r.GetResources()[0])
	require.Equal(t, RootCASecretName, s.GetName())
	cfg, err := xdsclient.Decode(r.GetResources()...)
	require.NoError(t, err)
	require.Equal(t, 2, cfg.Bundles.Len())
}
