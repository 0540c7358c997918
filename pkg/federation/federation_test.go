package federation

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/testlog"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/uuid"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/trust"
)

func TestMain(m *testing.M) {
	// Fake clientsets never end a streaming list; real API servers do.
	if err := os.Setenv("KUBE_FEATURE_WatchListClient", "false"); err != nil {
		panic(err)
	}
	os.Exit(m.Run())
}

const testNS = "isthmus-system"

func testLogger(t testing.TB) *slog.Logger { return testlog.New(t) }

// cluster is one in-process federator's federation side: a fake API
// server, a real CA, a real gRPC listener on loopback.
type cluster struct {
	name    string
	kube    *fake.Clientset
	dyn     *dynamicfake.FakeDynamicClient
	store   *catalog.Store
	trust   *trust.Store
	ca      *ca.CA
	self    *ca.SelfSource
	addr    string
	cfg     Config
	lis     net.Listener
	manager *Manager
	stop    context.CancelFunc
	done    chan struct{}
	// react, when set, sees every call to the fake API server (kube)
	// first, as a reactor would, with the fake's lock held: it may use
	// the tracker, not the client. (A reactor added while the manager
	// uses the client races with it.)
	react atomic.Pointer[k8stesting.ReactionFunc]
}

func newCluster(t *testing.T, name string, tune func(*Config)) *cluster {
	t.Helper()
	return newClusterIn(t, name, name+".mesh", tune)
}

// newClusterIn is newCluster with trust domain trustDomain.
func newClusterIn(t *testing.T, name, trustDomain string, tune func(*Config)) *cluster {
	t.Helper()
	ctx := t.Context()
	c := &cluster{name: name, kube: fake.NewClientset(), store: catalog.NewStore()}
	// An empty scheme: the fake then keeps FederationPeers unstructured,
	// as a real API server's dynamic client sees them.
	c.kube.PrependReactor("*", "*", func(action k8stesting.Action) (bool, runtime.Object, error) {
		if f := c.react.Load(); f != nil {
			return (*f)(action)
		}
		return false, nil, nil
	})
	c.dyn = dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{v1alpha1.Resource: "FederationPeerList"})
	// As an API server, every object made gets a new uid: a
	// FederationPeer deleted and made again is another object.
	c.dyn.PrependReactor("create", "*", func(action k8stesting.Action) (bool, runtime.Object, error) {
		if o, ok := action.(k8stesting.CreateAction).GetObject().(metav1.Object); ok && o.GetUID() == "" {
			o.SetUID(uuid.NewUUID())
		}
		return false, nil, nil
	})
	td := spiffeid.RequireTrustDomainFromString(trustDomain)
	var err error
	c.ca, err = ca.New(ctx, c.kube, ca.Options{TrustDomain: td, Namespace: testNS})
	require.NoError(t, err)
	c.trust = trust.NewStore(td)
	c.trust.SetLocal(c.ca.Bundle().X509Authorities(), c.ca.BundleSequence(), 0)
	id := spiffeid.RequireFromSegments(td, "ns", testNS, "sa", "isthmus-federator")
	c.self, err = ca.NewSelfSource(c.ca.Authority, id, nil)
	require.NoError(t, err)
	require.NoError(t, PublishClusterInfo(ctx, c.kube, testNS, ClusterInfo{ClusterName: name, TrustDomain: td, FederatorID: id}))
	c.lis, err = net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	c.addr = c.lis.Addr().String()
	c.cfg = Config{
		ClusterName: name, Namespace: testNS, FederatorID: id,
		Gateways:           []string{"gw." + name + ".example:15443"},
		AdvertiseAddresses: []string{c.addr},
		Heartbeat:          100 * time.Millisecond, HeartbeatTimeout: 500 * time.Millisecond,
		DialTimeout: 2 * time.Second, BackoffMin: 50 * time.Millisecond, BackoffMax: 200 * time.Millisecond,
		KeepFor: time.Hour, DrainFor: time.Hour, StatusInterval: 100 * time.Millisecond,
		Logger: testLogger(t).With("cluster", name),
	}
	if tune != nil {
		tune(&c.cfg)
	}
	c.start(t)
	return c
}

// start runs the manager and its listener until stop (or the test) ends.
func (c *cluster) start(t *testing.T) {
	t.Helper()
	if c.lis == nil {
		var err error
		c.lis, err = net.Listen("tcp", c.addr)
		require.NoError(t, err)
	}
	var err error
	c.manager, err = NewManager(c.kube, c.dyn, c.store, c.trust, c.self, c.cfg)
	require.NoError(t, err)
	m := c.manager
	t.Cleanup(func() { requirePeerIndex(t, m) }) // after c.kill below: last registered, first run
	srv := grpc.NewServer(c.manager.ServerOptions()...)
	c.manager.Register(srv)
	ctx, cancel := context.WithCancel(context.Background())
	c.stop, c.done = cancel, make(chan struct{})
	lis := c.lis
	c.lis = nil
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(lis)
	}()
	go func() {
		defer close(c.done)
		_ = c.manager.Run(ctx)
		// As the federator stops: the streams Run served are over, so
		// the graceful stop does not wait for them.
		srv.GracefulStop()
		<-served
	}()
	t.Cleanup(c.kill)
}

// requirePeerIndex requires m's index by trust domain to hold exactly
// its peers, each under its peer object's trust domain.
func requirePeerIndex(t *testing.T, m *Manager) {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	indexed := 0
	for td, held := range m.byTrustDomain {
		require.NotEmpty(t, held, "an empty set is left under %s", td)
		for name, e := range held {
			require.Same(t, m.peers[name], e, "%s under %s", name, td)
			require.Equal(t, td, e.p.td, name)
			indexed++
		}
	}
	require.Len(t, m.peers, indexed, "a peer is missing from the index")
}

// kill stops the federator as a crash would: no Terminate is sent.
func (c *cluster) kill() {
	if c.stop == nil {
		return
	}
	c.stop()
	<-c.done
	c.stop = nil
}

// link runs `token create` on acceptor and `join` on joiner.
func link(t *testing.T, acceptor, joiner *cluster) {
	t.Helper()
	tok, err := CreateToken(t.Context(), acceptor.kube, TokenOptions{Namespace: testNS, Peer: joiner.name, Addresses: []string{acceptor.addr}})
	require.NoError(t, err)
	text, err := tok.Encode()
	require.NoError(t, err)
	_, err = Join(t.Context(), joiner.kube, joiner.dyn, JoinOptions{Namespace: testNS, Name: acceptor.name, Token: text})
	require.NoError(t, err)
}

func (c *cluster) status(peer string) PeerStatus {
	for _, s := range c.manager.Statuses() {
		if s.Name == peer {
			return s
		}
	}
	return PeerStatus{}
}

func (c *cluster) export(t *testing.T, services ...catalog.Service) {
	t.Helper()
	for i := range services {
		services[i].Cluster = c.name
	}
	snap, err := catalog.NewSnapshot(catalog.LocalSource, services)
	require.NoError(t, err)
	c.store.Set(snap)
}

func (c *cluster) imported(peer string) []catalog.Service {
	return c.store.Get(peer).Services()
}

func echoService(ready int) catalog.Service {
	return catalog.Service{
		Namespace: "demo", Name: "echo",
		Ports: []catalog.Port{{Name: "http", Port: 8080, Protocol: catalog.ProtocolTCP, AppProtocol: "http"}},
		Endpoints: []catalog.LocalityEndpoints{
			{Locality: catalog.Locality{Region: "eu", Zone: "eu-1"}, Ready: ready, NotReady: 1},
			{Locality: catalog.Locality{Region: "eu", Zone: "eu-2"}, Ready: 2},
		},
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	require.Eventually(t, cond, 20*time.Second, 20*time.Millisecond, what)
}

func TestThreeFederators(t *testing.T) {
	a := newCluster(t, "a", nil)
	b := newCluster(t, "b", nil)
	c := newCluster(t, "c", nil)
	a.export(t, catalog.Service{Namespace: "demo", Name: "echo",
		Ports:      []catalog.Port{{Name: "http", Port: 8080, AppProtocol: "http"}},
		Endpoints:  []catalog.LocalityEndpoints{{Locality: catalog.Locality{Region: "eu", Zone: "eu-1"}, Ready: 3, NotReady: 1}},
		Identities: []string{"spiffe://a.mesh/ns/demo/sa/echo"},
	})
	link(t, a, b)
	link(t, a, c)

	t.Run("linking creates the accepting side's FederationPeer and spends the token", func(t *testing.T) {
		for _, joiner := range []*cluster{b, c} {
			eventually(t, "a has a connected FederationPeer for "+joiner.name, func() bool {
				return a.status(joiner.name).State == v1alpha1.StateConnected
			})
			fp, err := a.dyn.Resource(v1alpha1.Resource).Get(t.Context(), joiner.name, metav1.GetOptions{})
			require.NoError(t, err)
			spec, _, _ := unstructuredString(fp.Object, "spec", "federatorID")
			require.Equal(t, "spiffe://"+joiner.name+".mesh/ns/isthmus-system/sa/isthmus-federator", spec)
			eventually(t, joiner.name+" is connected to a", func() bool { return joiner.status("a").State == v1alpha1.StateConnected })
		}
		secrets, err := a.kube.CoreV1().Secrets(testNS).List(t.Context(), metav1.ListOptions{})
		require.NoError(t, err)
		for _, s := range secrets.Items {
			require.NotEqual(t, SecretTypeTokenRecord, s.Type, "token record %s left after the join", s.Name)
			require.NotEqual(t, SecretTypeTokenClaim, s.Type, "token claim %s left after the join", s.Name)
		}
	})

	t.Run("an export in a reaches b and c with a's gateway and identities", func(t *testing.T) {
		for _, imp := range []*cluster{b, c} {
			eventually(t, imp.name+" imports echo", func() bool { return len(imp.imported("a")) == 1 })
			got := imp.imported("a")[0]
			require.Equal(t, "a", got.Cluster)
			require.Equal(t, []string{"gw.a.example:15443"}, got.Gateways)
			require.Equal(t, []string{"spiffe://a.mesh/ns/demo/sa/echo"}, got.Identities)
			require.Equal(t, 3, got.ReadyEndpoints())
			require.Equal(t, []catalog.Port{{Name: "http", Port: 8080, Protocol: catalog.ProtocolTCP, AppProtocol: "http"}}, got.Ports)
			// and the bundle: b trusts a.mesh with a's roots
			bundle, err := imp.trust.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("a.mesh"))
			require.NoError(t, err)
			require.Equal(t, a.ca.Bundle().X509Authorities(), bundle.X509Authorities())
		}
		require.Equal(t, 1, b.status("a").Imported)
		// a counts the export once b's acknowledgement arrived.
		eventually(t, "a counts one export to b", func() bool { return a.status("b").Exported == 1 })
	})

	t.Run("a readiness change in a changes the counts in b", func(t *testing.T) {
		a.export(t, echoService(7))
		eventually(t, "b sees 9 ready", func() bool {
			s := b.imported("a")
			return len(s) == 1 && s[0].ReadyEndpoints() == 9
		})
	})

	t.Run("an export narrowed to c is not sent to b", func(t *testing.T) {
		only := echoService(1)
		only.Name, only.Peers = "only-c", []string{"c"}
		a.export(t, echoService(7), only)
		eventually(t, "c imports only-c", func() bool { return len(c.imported("a")) == 2 })
		require.Never(t, func() bool { return len(b.imported("a")) != 1 }, 300*time.Millisecond, 20*time.Millisecond)
	})

	t.Run("unexport removes the import", func(t *testing.T) {
		a.export(t)
		eventually(t, "b and c import nothing", func() bool { return len(b.imported("a")) == 0 && len(c.imported("a")) == 0 })
	})

	t.Run("a reconnect resends nothing the peer holds", func(t *testing.T) {
		a.export(t, echoService(4))
		eventually(t, "b imports echo", func() bool { return len(b.imported("a")) == 1 })
		eventually(t, "a's update acknowledged", func() bool {
			s := a.status("b")
			return s.Acknowledged[TypeService] == s.Sent[TypeService] && s.Exported == 1
		})
		before := a.status("b").UpdatesSent
		// Cut b's stream: b's federator restarts its stream from a fresh
		// goroutine, keeping what it received.
		b.manager.mu.Lock()
		e := b.manager.peers["a"]
		b.manager.mu.Unlock()
		e.p.sessMu.Lock()
		e.p.sessCancel()
		e.p.sessMu.Unlock()
		eventually(t, "b reconnects", func() bool {
			return b.status("a").State == v1alpha1.StateConnected && a.status("b").State == v1alpha1.StateConnected
		})
		require.Equal(t, before, a.status("b").UpdatesSent, "a resent updates b already held")
		require.Len(t, b.imported("a"), 1)
	})

	t.Run("a root rotation in a reaches b's trust store and its stored copy", func(t *testing.T) {
		next, err := ca.New(t.Context(), fake.NewClientset(), ca.Options{TrustDomain: a.trust.LocalTrustDomain(), Namespace: testNS})
		require.NoError(t, err)
		roots := append(a.ca.Bundle().X509Authorities(), next.Bundle().X509Authorities()...)
		a.trust.SetLocal(roots, a.ca.BundleSequence()+1, 0)
		td := spiffeid.RequireTrustDomainFromString("a.mesh")
		eventually(t, "b holds both roots", func() bool {
			bundle, err := b.trust.GetX509BundleForTrustDomain(td)
			return err == nil && len(bundle.X509Authorities()) == 2
		})
		eventually(t, "b stored them", func() bool {
			m := b.manager
			stored, found, err := m.loadPeerBundle(t.Context(), "a", td)
			return err == nil && found && len(stored.X509Authorities()) == 2
		})
		// b reports the sequence only once the bundle is stored, after the
		// trust store took it: wait for it rather than racing it.
		eventually(t, "b reports the new sequence", func() bool {
			return b.status("a").BundleSequence == a.ca.BundleSequence()+1
		})
	})

	t.Run("a spent token", func(t *testing.T) {
		tok, err := CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "d", Addresses: []string{a.addr}})
		require.NoError(t, err)
		d := newCluster(t, "d", nil)
		_, err = d.manager.establish(t.Context(), tok)
		require.NoError(t, err)
		// The same joiner asking again (its answer was lost) is answered
		// again.
		_, err = d.manager.establish(t.Context(), tok)
		require.NoError(t, err)
		// Anyone else with the token is refused: a cluster of the same
		// name and trust domain, with a CA of its own.
		impostor := newCluster(t, "d", nil)
		_, err = impostor.manager.establish(t.Context(), tok)
		require.ErrorContains(t, err, "unknown or already used peering token")
		require.True(t, isPermanent(err))
	})
}

// failOnce makes the first call of verb on resource named name fail.
func failOnce(c *cluster, verb, resource, name string) *atomic.Bool {
	var failed atomic.Bool
	react := k8stesting.ReactionFunc(func(a k8stesting.Action) (bool, runtime.Object, error) {
		if !a.Matches(verb, resource) {
			return false, nil, nil
		}
		var got string
		switch a := a.(type) {
		case k8stesting.CreateAction: // and UpdateAction, the same methods
			got = a.GetObject().(metav1.Object).GetName()
		case k8stesting.DeleteAction:
			got = a.GetName()
		}
		if got != name || !failed.CompareAndSwap(false, true) {
			return false, nil, nil
		}
		return true, nil, apierrors.NewServiceUnavailable("injected")
	})
	c.react.Store(&react)
	return &failed
}

// Establish fails half way on either side and the joiner's retry
// completes the link: the token is claimed for the joiner, not spent,
// until the link is recorded, and a joiner whose link is recorded is
// answered again. Before, the token was deleted first, and the retry got
// "unknown or already used peering token" for good.
func TestEstablishCompletesAfterAFailure(t *testing.T) {
	for _, tc := range []struct{ name, side, verb, resource, object string }{
		{"the acceptor cannot store the joiner's bundle", "acceptor", "create", "configmaps", peerConfigMapName("b")},
		{"the joiner cannot store the acceptor's bundle", "joiner", "create", "configmaps", peerConfigMapName("a")},
		{"the acceptor cannot delete the spent record", "acceptor", "delete", "secrets", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newCluster(t, "a", nil)
			b := newCluster(t, "b", nil)
			tok, err := CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "b", Addresses: []string{a.addr}})
			require.NoError(t, err)
			object := tc.object
			if object == "" {
				object = "isthmus-token-" + tok.ID
			}
			target := a
			if tc.side == "joiner" {
				target = b
			}
			failed := failOnce(target, tc.verb, tc.resource, object)
			text, err := tok.Encode()
			require.NoError(t, err)
			_, err = Join(t.Context(), b.kube, b.dyn, JoinOptions{Namespace: testNS, Name: "a", Token: text})
			require.NoError(t, err)
			eventually(t, "linked", func() bool {
				return a.status("b").State == v1alpha1.StateConnected && b.status("a").State == v1alpha1.StateConnected
			})
			require.True(t, failed.Load(), "the failure was injected")
			_, err = b.kube.CoreV1().Secrets(testNS).Get(t.Context(), "isthmus-join-a", metav1.GetOptions{})
			require.True(t, apierrors.IsNotFound(err), "the joiner's spent token is deleted: %v", err)
			if tc.verb != "delete" {
				_, err = a.kube.CoreV1().Secrets(testNS).Get(t.Context(), "isthmus-token-"+tok.ID, metav1.GetOptions{})
				require.True(t, apierrors.IsNotFound(err), "the acceptor's record is deleted: %v", err)
			}
		})
	}
}

func unstructuredString(obj map[string]any, path ...string) (string, bool, error) {
	cur := obj
	for i, p := range path {
		v, ok := cur[p]
		if !ok {
			return "", false, nil
		}
		if i == len(path)-1 {
			s, ok := v.(string)
			return s, ok, nil
		}
		cur, ok = v.(map[string]any)
		if !ok {
			return "", false, fmt.Errorf("%s is not an object", p)
		}
	}
	return "", false, nil
}

func TestPeerLossAndReturn(t *testing.T) {
	shortKeep := func(c *Config) { c.KeepFor = 300 * time.Millisecond }
	a := newCluster(t, "a", shortKeep)
	b := newCluster(t, "b", nil)
	link(t, a, b)
	b.export(t, echoService(5))
	eventually(t, "a imports b's echo", func() bool { return len(a.imported("b")) == 1 })

	b.kill()
	eventually(t, "a sees b disconnected", func() bool {
		s := a.status("b")
		return s.State == v1alpha1.StateDisconnected && !s.DisconnectedSince.IsZero() && s.Reason != ""
	})
	eventually(t, "b's imports are drained after keepFor", func() bool {
		s := a.imported("b")
		return len(s) == 1 && s[0].ReadyEndpoints() == 0 && s[0].Endpoints[0].NotReady > 0
	})
	eventually(t, "the FederationPeer shows it", func() bool {
		fp, err := a.dyn.Resource(v1alpha1.Resource).Get(t.Context(), "b", metav1.GetOptions{})
		if err != nil {
			return false
		}
		state, _, _ := unstructuredString(fp.Object, "status", "state")
		since, _, _ := unstructuredString(fp.Object, "status", "disconnectedSince")
		return state == v1alpha1.StateDisconnected && since != ""
	})

	b.start(t)
	eventually(t, "b reconnects and a's import is live again", func() bool {
		s := a.imported("b")
		return a.status("b").State == v1alpha1.StateConnected && len(s) == 1 && s[0].ReadyEndpoints() == 7
	})
	require.Equal(t, []string{"b"}, withoutLocal(a.store.Sources()))
}

func TestDeletingAFederationPeerTerminatesTheLink(t *testing.T) {
	a := newCluster(t, "a", nil)
	c := newCluster(t, "c", nil)
	link(t, a, c)
	a.export(t, echoService(1))
	c.export(t, echoService(2))
	eventually(t, "both import", func() bool { return len(a.imported("c")) == 1 && len(c.imported("a")) == 1 })

	require.NoError(t, a.dyn.Resource(v1alpha1.Resource).Delete(t.Context(), "c", metav1.DeleteOptions{}))
	eventually(t, "a dropped c's imports and bundle", func() bool {
		_, err := a.trust.GetBundleForTrustDomain(spiffeid.RequireTrustDomainFromString("c.mesh"))
		return len(a.imported("c")) == 0 && err != nil
	})
	eventually(t, "c was told, and dropped a's imports", func() bool {
		s := c.status("a")
		return s.State == v1alpha1.StateFailed && len(c.imported("a")) == 0
	})
	require.Contains(t, c.status("a").Reason, "the FederationPeer was deleted on a")
	_, err := a.kube.CoreV1().ConfigMaps(testNS).Get(t.Context(), peerConfigMapName("c"), metav1.GetOptions{})
	require.Error(t, err, "a kept c's bundle ConfigMap")
	// The other side stops trusting too: unlinking revokes trust both
	// ways, as the operator deleting the link meant.
	eventually(t, "c dropped a's bundle", func() bool {
		_, err := c.trust.GetBundleForTrustDomain(spiffeid.RequireTrustDomainFromString("a.mesh"))
		return err != nil
	})
	_, err = c.kube.CoreV1().ConfigMaps(testNS).Get(t.Context(), peerConfigMapName("a"), metav1.GetOptions{})
	require.True(t, apierrors.IsNotFound(err), "c kept a's bundle ConfigMap: %v", err)
}

func TestDeletingTheJoinersFederationPeerTerminatesTheLink(t *testing.T) {
	a := newCluster(t, "a", nil)
	b := newCluster(t, "b", nil)
	link(t, a, b)
	a.export(t, echoService(1))
	b.export(t, echoService(2))
	eventually(t, "both import", func() bool { return len(a.imported("b")) == 1 && len(b.imported("a")) == 1 })

	require.NoError(t, b.dyn.Resource(v1alpha1.Resource).Delete(t.Context(), "a", metav1.DeleteOptions{}))
	eventually(t, "b dropped a's imports", func() bool { return len(b.imported("a")) == 0 })
	eventually(t, "a was told, and dropped b's imports and bundle", func() bool {
		s := a.status("b")
		_, err := a.trust.GetBundleForTrustDomain(spiffeid.RequireTrustDomainFromString("b.mesh"))
		return s.State == v1alpha1.StateFailed && len(a.imported("b")) == 0 && err != nil
	})
	require.Contains(t, a.status("b").Reason, "the FederationPeer was deleted on b")
	_, err := a.kube.CoreV1().ConfigMaps(testNS).Get(t.Context(), peerConfigMapName("b"), metav1.GetOptions{})
	require.True(t, apierrors.IsNotFound(err), "a kept b's bundle ConfigMap: %v", err)
}

// A link that was refused is deleted and joined again with a new token:
// deleting the FederationPeer deletes the join token's Secret, and `join`
// replaces one an older version left behind. Before, the second join
// failed with "secrets \"isthmus-join-a\" already exists" and nothing said
// to delete it.
func TestJoinAgainAfterARefusedLink(t *testing.T) {
	a := newCluster(t, "a", nil)
	b := newCluster(t, "b", nil)
	tok, err := CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "b", Addresses: []string{a.addr}})
	require.NoError(t, err)
	// Refused: a's record of the token is gone.
	require.NoError(t, a.kube.CoreV1().Secrets(testNS).Delete(t.Context(), "isthmus-token-"+tok.ID, metav1.DeleteOptions{}))
	text, err := tok.Encode()
	require.NoError(t, err)
	_, err = Join(t.Context(), b.kube, b.dyn, JoinOptions{Namespace: testNS, Name: "a", Token: text})
	require.NoError(t, err)
	eventually(t, "b's link is refused", func() bool { return b.status("a").State == v1alpha1.StateFailed })
	require.Contains(t, b.status("a").Reason, "unknown or already used peering token")

	require.NoError(t, b.dyn.Resource(v1alpha1.Resource).Delete(t.Context(), "a", metav1.DeleteOptions{}))
	eventually(t, "the join Secret is deleted with the link", func() bool {
		_, err := b.kube.CoreV1().Secrets(testNS).Get(t.Context(), "isthmus-join-a", metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	})
	// A Secret left behind (by a federator of an earlier version, or one
	// that was down when the link was deleted) is replaced.
	_, err = b.kube.CoreV1().Secrets(testNS).Create(t.Context(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: testNS, Name: "isthmus-join-a", Labels: map[string]string{LabelJoinToken: "a"}},
		Data:       map[string][]byte{keyToken: []byte("stale")},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	tok, err = CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "b", Addresses: []string{a.addr}})
	require.NoError(t, err)
	text, err = tok.Encode()
	require.NoError(t, err)
	_, err = Join(t.Context(), b.kube, b.dyn, JoinOptions{Namespace: testNS, Name: "a", Token: text})
	require.NoError(t, err)
	eventually(t, "linked", func() bool {
		return a.status("b").State == v1alpha1.StateConnected && b.status("a").State == v1alpha1.StateConnected
	})

	// A Secret of that name that is not a join token is never replaced.
	require.NoError(t, b.dyn.Resource(v1alpha1.Resource).Delete(t.Context(), "a", metav1.DeleteOptions{}))
	eventually(t, "unlinked", func() bool { return len(b.manager.Statuses()) == 0 })
	_, err = b.kube.CoreV1().Secrets(testNS).Create(t.Context(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: testNS, Name: "isthmus-join-a"},
		Data:       map[string][]byte{"password": []byte("someone else's")},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = Join(t.Context(), b.kube, b.dyn, JoinOptions{Namespace: testNS, Name: "a", Token: text})
	require.ErrorContains(t, err, "does not hold a join token")
	sec, err := b.kube.CoreV1().Secrets(testNS).Get(t.Context(), "isthmus-join-a", metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, "someone else's", string(sec.Data["password"]))
}

// A joining FederationPeer without addresses (an edit, or a CRD installed
// before it checked) is reported, not a crash of the federator.
func TestJoinedPeerWithoutAddresses(t *testing.T) {
	b := newCluster(t, "b", nil)
	fp := &v1alpha1.FederationPeer{
		TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.GroupVersion.String(), Kind: "FederationPeer"},
		ObjectMeta: metav1.ObjectMeta{Name: "a"},
		Spec:       v1alpha1.FederationPeerSpec{TrustDomain: "a.mesh", FederatorID: "spiffe://a.mesh/fed", TokenSecretName: "isthmus-join-a"},
	}
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(fp)
	require.NoError(t, err)
	_, err = b.dyn.Resource(v1alpha1.Resource).Create(t.Context(), &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{})
	require.NoError(t, err)
	eventually(t, "refused with the reason", func() bool {
		s := b.status("a")
		return s.State == v1alpha1.StateFailed && strings.Contains(s.Reason, "spec.addresses is empty")
	})
}

// Run returns only once the streams peers opened to it are over: a
// federator shutting down does not wait out its server's grace period
// while sessions keep writing.
func TestRunEndsServedSessions(t *testing.T) {
	a := newCluster(t, "a", nil)
	b := newCluster(t, "b", nil)
	link(t, a, b)
	eventually(t, "linked", func() bool { return a.status("b").State == v1alpha1.StateConnected })
	a.stop()
	select {
	case <-a.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the graceful stop after Run waits for a stream Run served")
	}
	a.stop = nil
	require.NotEqual(t, v1alpha1.StateConnected, a.status("b").State, "a's side of the stream outlived Run")
}

func withoutLocal(sources []string) []string {
	var out []string
	for _, s := range sources {
		if s != catalog.LocalSource {
			out = append(out, s)
		}
	}
	return out
}

func TestStatusPatchClearsWhatIsGone(t *testing.T) {
	body, err := statusPatch(v1alpha1.FederationPeerStatus{State: v1alpha1.StateConnected})
	require.NoError(t, err)
	require.JSONEq(t, `{"status":{"state":"Connected","lastHeartbeat":null,"disconnectedSince":null,"bundle":null,
		"importedServices":0,"exportedServices":0}}`, string(body))
}

func TestSyncedOnceEveryPeerSpoke(t *testing.T) {
	a := newCluster(t, "a", nil)
	b := newCluster(t, "b", nil)
	c := newCluster(t, "c", nil)
	link(t, a, b)
	link(t, a, c)
	c.export(t, echoService(1))
	// b exports nothing: its empty set still counts as having spoken.
	eventually(t, "a linked with b and c, and synced", func() bool {
		return a.status("b").State == v1alpha1.StateConnected && a.status("c").State == v1alpha1.StateConnected && a.manager.Synced()
	})

	a.kill()
	b.kill()
	a.start(t)
	eventually(t, "c resynced", func() bool { return len(a.imported("c")) == 1 })
	require.Never(t, a.manager.Synced, 300*time.Millisecond, 20*time.Millisecond, "synced while b, down, never spoke")
	b.start(t)
	eventually(t, "synced once b is back", a.manager.Synced)
}

// A new token for a peer replaces that peer's unused ones, as Consul's
// generate-token does, and expired records of any peer go: a token record
// is not a standing credential. One a joiner has claimed (a link being
// made) stays.
func TestCreateTokenReplacesUnusedTokens(t *testing.T) {
	a := newCluster(t, "a", nil)
	create := func(peer string, at time.Time, ttl time.Duration) Token {
		tok, err := CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: peer, Addresses: []string{a.addr}, Now: at, TTL: ttl})
		require.NoError(t, err)
		return tok
	}
	// Made in the past, in an order where none sweeps another before
	// the token under test.
	now := time.Now()
	claimed := create("b", now.Add(-3*time.Hour), 24*time.Hour)
	claim := func(record string) {
		_, err := a.kube.CoreV1().Secrets(testNS).Create(t.Context(), &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Namespace: testNS, Name: claimName(record), Labels: map[string]string{LabelTokenFor: "b"}},
			Type:       SecretTypeTokenClaim, Data: map[string][]byte{keyClaimedBy: []byte("spiffe://b.mesh/fed 00")},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	claim("isthmus-token-" + claimed.ID)
	d1 := create("d", now.Add(-2*time.Hour), time.Hour)
	b1 := create("b", now.Add(-2*time.Hour), 24*time.Hour)
	c1 := create("c", now.Add(-2*time.Hour), 24*time.Hour)
	claim("isthmus-token-0000000000000000") // its record is gone

	var notices []string
	b2, err := CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "b", Addresses: []string{a.addr}, Now: now,
		Notice: func(msg string) { notices = append(notices, msg) }})
	require.NoError(t, err)
	require.ElementsMatch(t, []string{
		"deleted token " + b1.ID + ": the new token for b replaces it",
		"deleted token " + d1.ID + ": it expired",
		"deleted the claim of token 0000000000000000: its token is gone",
	}, notices)
	for _, tok := range []Token{c1, claimed, b2} {
		_, err := a.kube.CoreV1().Secrets(testNS).Get(t.Context(), "isthmus-token-"+tok.ID, metav1.GetOptions{})
		require.NoError(t, err, "token for %s", tok.Peer)
	}
}
