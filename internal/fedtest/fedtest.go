// Package fedtest stands in for the federator where tests and benchmarks
// run the real sidecar without a cluster: its CA (pkg/ca and
// pkg/caserver, with a token table where the federator asks TokenReview)
// and its sidecar xDS (the federator's own translation, pkg/xds, of a
// catalog, served by go-control-plane to every sidecar as one node
// group, as the federator serves them). Nothing here is a mock of the
// data path: the sidecar gets real SVIDs over the real CA protocol and
// real xDS.
package fedtest

import (
	"context"
	"errors"
	"fmt"
	"net"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/internal/pemutil"
	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/caserver"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/xds"
)

// The federator's identity as internal/bootstrap expects it by default.
const (
	FederatorNamespace      = "isthmus-system"
	FederatorServiceAccount = "isthmus-federator"
)

// SidecarGroup is the node group every sidecar's snapshot is set for.
const SidecarGroup = "sidecar"

// Tokens authenticates a ServiceAccount token by looking it up: what the
// federator learns from TokenReview, for a harness with no API server.
type Tokens map[string]caserver.Caller

var _ caserver.Authenticator = Tokens(nil)

// Authenticate implements caserver.Authenticator.
func (t Tokens) Authenticate(_ context.Context, token string) (caserver.Caller, error) {
	c, ok := t[token]
	if !ok {
		return caserver.Caller{}, caserver.ErrUnauthenticated
	}
	return c, nil
}

// CA is a federator's certificate service: a self-signed pkg/ca CA
// (its Secret in a fake clientset) behind pkg/caserver over TLS.
type CA struct {
	*ca.CA
	// Addr is where the certificate service listens.
	Addr string
	srv  *grpc.Server
	done chan struct{}
}

// StartCA makes a CA for td and serves its certificate service on ln,
// presenting the federator's SVID (FederatorNamespace,
// FederatorServiceAccount), until Close. Callers are authenticated by
// tokens.
func StartCA(ctx context.Context, ln net.Listener, td spiffeid.TrustDomain, tokens Tokens) (*CA, error) {
	authority, err := ca.New(ctx, fake.NewClientset(), ca.Options{TrustDomain: td, Namespace: FederatorNamespace})
	if err != nil {
		return nil, fmt.Errorf("CA for %s: %w", td, err)
	}
	id, err := spiffeid.FromSegments(td, "ns", FederatorNamespace, "sa", FederatorServiceAccount)
	if err != nil {
		return nil, err
	}
	self, err := ca.NewSelfSource(authority.Authority, id, nil)
	if err != nil {
		return nil, err
	}
	srv := grpc.NewServer(caserver.ServerOptions(self)...)
	caserver.New(authority, tokens, caserver.Options{}).Register(srv)
	c := &CA{CA: authority, Addr: ln.Addr().String(), srv: srv, done: make(chan struct{})}
	go func() { defer close(c.done); _ = srv.Serve(ln) }()
	return c, nil
}

// RootsPEM is the CA's roots in PEM: a sidecar's --ca-roots-file.
func (c *CA) RootsPEM() []byte {
	return pemutil.EncodeCertificates(c.Bundle().X509Authorities()...)
}

// Close stops the service at once and waits for it.
func (c *CA) Close() {
	c.srv.Stop()
	<-c.done
}

// oneGroup serves every node the same snapshot, as the federator serves
// every sidecar of a cluster (docs/sidecar-xds.md, Node).
type oneGroup struct{}

func (oneGroup) ID(*corev3.Node) string { return SidecarGroup }

// XDS is the federator's ADS for sidecars: state of the world, one
// snapshot for every node.
type XDS struct {
	// Addr is where ADS listens (plaintext: the sidecar's --xds-plaintext).
	Addr   string
	cache  cache.SnapshotCache
	srv    *grpc.Server
	cancel context.CancelFunc
	done   chan struct{}
}

// StartXDS serves ADS on ln until Close.
func StartXDS(ln net.Listener) *XDS {
	ctx, cancel := context.WithCancel(context.Background())
	x := &XDS{Addr: ln.Addr().String(), cache: cache.NewSnapshotCache(true, oneGroup{}, nil),
		srv: grpc.NewServer(), cancel: cancel, done: make(chan struct{})}
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(x.srv, serverv3.NewServer(ctx, x.cache, nil))
	go func() { defer close(x.done); _ = x.srv.Serve(ln) }()
	return x
}

// Set serves snap to every sidecar, those connected and those to come.
func (x *XDS) Set(ctx context.Context, snap *cache.Snapshot) error {
	return x.cache.SetSnapshot(ctx, SidecarGroup, snap)
}

// Close stops ADS at once and waits for it.
func (x *XDS) Close() {
	x.cancel()
	x.srv.Stop()
	<-x.done
}

// SidecarSnapshot is what the federator serves sidecars for these
// catalogs: its own translation (xds.TranslateSidecar) and the ROOTCA
// Secret of bundles (xds.TranslateSecrets), one consistent snapshot.
func SidecarSnapshot(local *catalog.Snapshot, peers []*catalog.Snapshot, opts xds.SidecarOptions, bundles ...*x509bundle.Bundle) (*cache.Snapshot, error) {
	if len(bundles) == 0 {
		return nil, errors.New("sidecar snapshot: no trust bundle: sidecars could not verify anyone")
	}
	r, _, err := xds.TranslateSidecar(xds.SidecarInput{Local: local, Peers: peers}, opts)
	if err != nil {
		return nil, fmt.Errorf("translate sidecar: %w", err)
	}
	secrets, secretsVersion, err := xds.TranslateSecrets(bundles)
	if err != nil {
		return nil, fmt.Errorf("translate secrets: %w", err)
	}
	// The federator's own snapshot: a version per type.
	r.Secrets, r.SecretsVersion = secrets, secretsVersion
	snap, err := r.Snapshot()
	if err != nil {
		return nil, fmt.Errorf("sidecar snapshot: %w", err)
	}
	if err := snap.Consistent(); err != nil {
		return nil, fmt.Errorf("sidecar snapshot: %w", err)
	}
	return snap, nil
}
