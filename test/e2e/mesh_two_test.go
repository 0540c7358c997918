package e2e

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/isthmus-mesh/isthmus/test/mesh"
)

// TestMeshTwoClusters is the smallest mesh: clusters a and b, each with
// its real kube-apiserver in its own network namespaces, its federator,
// gateway and sidecars; a exports demo/echo, b imports it. The clusters
// start once and every step shares them.
//
// b's client calls echo.demo.svc.clusterset.local by name over HTTP/1.1,
// h2c, gRPC and raw TCP, captured by iptables in its pod, and a's echo
// answers with b's identity; once a unexports echo the name fails in b at
// once with a clear error, and a new export brings it back.
func TestMeshTwoClusters(t *testing.T) {
	m := mesh.StartT(t, mesh.Options{
		BinDir:        binDir,
		Clusters:      []mesh.ClusterSpec{{Name: "a"}, {Name: "b"}},
		FederatorArgs: []string{"--log-level", "debug", "--heartbeat", "1s"},
		SidecarArgs:   []string{"--log-level", "debug"},
	})
	ctx := t.Context()
	a, b := m.Cluster("a"), m.Cluster("b")

	var g errgroup.Group
	g.Go(func() error { return mesh.Link(ctx, a, b) })
	var echoA []*mesh.Pod
	var clientB *mesh.Pod
	g.Go(func() (err error) { echoA, err = a.ServeEcho(ctx, "demo", "echo", 1); return err })
	g.Go(func() (err error) { clientB, err = b.RunPod(ctx, mesh.PodSpec{Name: "client"}); return err })
	require.NoError(t, g.Wait())
	require.NoError(t, a.Export(ctx, "demo", "echo", 1))
	waitImported := func() {
		t.Helper()
		require.NoError(t, mesh.Poll(ctx, meshWait, "b imports demo/echo from a", func(ctx context.Context) (bool, string) {
			s, ok, err := b.Imported(ctx, "a", "demo", "echo")
			if err != nil || !ok {
				return false, fmt.Sprintf("ok=%t err=%v", ok, err)
			}
			return s.ReadyEndpoints() == 1, fmt.Sprintf("%d ready endpoints", s.ReadyEndpoints())
		}))
	}
	waitImported()
	callerB := b.SPIFFEID("demo", "client")
	require.Equal(t, "spiffe://b.mesh/ns/demo/sa/client", callerB)

	t.Run("HTTP/1.1, HTTP/2, gRPC and TCP cross from b to a with b's identity", func(t *testing.T) {
		crossesWithIdentity(t, clientB, a, echoA[0])
	})

	t.Run("an unexport in a makes the name fail in b, at once and clearly", func(t *testing.T) {
		require.NoError(t, a.Unexport(ctx, "demo", "echo"))
		require.NoError(t, mesh.Poll(ctx, meshWait, "b forgets a's demo/echo", func(ctx context.Context) (bool, string) {
			_, ok, err := b.Imported(ctx, "a", "demo", "echo")
			return err == nil && !ok, fmt.Sprintf("imported=%t err=%v", ok, err)
		}))
		// b's sidecar follows with its next push; a call made before it
		// may still be refused by a's gateway instead.
		const timeout = 5 * time.Second
		call := func(proto, port string) (time.Duration, error) {
			start := time.Now()
			_, err := clientB.Call(ctx, mesh.Call{Proto: proto, Target: net.JoinHostPort(echoHost, port), Timeout: timeout})
			return time.Since(start), err
		}
		require.NoError(t, mesh.Poll(ctx, meshWait, "b's client no longer resolves "+echoHost, func(context.Context) (bool, string) {
			took, err := call("http1", "80")
			if err == nil {
				return false, "still answered"
			}
			assert.Less(t, took, timeout, "a call hung until its timeout: %v", err)
			return isUnknownName(err), fmt.Sprintf("failed in %s: %v", took.Round(time.Millisecond), err)
		}))
		for _, tc := range []struct{ proto, port string }{{"http1", "80"}, {"h2c", "80"}, {"grpc", "9090"}, {"tcp", "9000"}} {
			took, err := call(tc.proto, tc.port)
			require.Error(t, err, "%s: answered after the unexport", tc.proto)
			t.Logf("%s after the unexport, in %s: %v", tc.proto, took.Round(time.Millisecond), err)
			assert.True(t, isUnknownName(err), "%s: %v", tc.proto, err)
			assert.Less(t, took, timeout, "%s: the call hung until its timeout", tc.proto)
		}
	})

	t.Run("a re-export brings the name back in b", func(t *testing.T) {
		require.NoError(t, a.Export(ctx, "demo", "echo", 1))
		waitImported()
		answeredBy(t, clientB, "a", echoA[0], callerB)
		for _, tc := range []struct{ proto, port string }{{"grpc", "9090"}, {"tcp", "9000"}} {
			r := callOK(t, clientB, mesh.Call{Proto: tc.proto, Target: net.JoinHostPort(echoHost, tc.port)})
			assert.Equal(t, "a", r.Cluster, tc.proto)
			assert.Equal(t, echoA[0].Name(), r.Pod, tc.proto)
		}
	})
}

// isUnknownName reports whether a call failed because its name did not
// resolve: the sidecar's DNS proxy answers a clusterset name nobody
// exports with NXDOMAIN, the resolver's "no such host".
func isUnknownName(err error) bool {
	return err != nil && strings.Contains(err.Error(), "no such host")
}
