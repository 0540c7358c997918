package e2e

import (
	"context"
	"crypto/tls"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/test/fedproc"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// TestGatewayRoutesFromFederator runs the real eastwest-gw binary beside
// the real federator, configured only over xDS: a connection with the SNI
// of an exported service reaches its pods (the echo pods speak plain HTTP,
// so a TLS handshake through the gateway ends with the pod's HTTP answer
// — proof the gateway passed the bytes through without terminating
// them); an unknown SNI is refused with a TLS alert; unexporting stops
// new connections.
func TestGatewayRoutesFromFederator(t *testing.T) {
	env := localcluster.StartT(t, "a")
	if !env.Isolated() {
		t.Skip("needs root: without network namespaces pods have loopback IPs, which EndpointSlices refuse")
	}
	installIsthmus(t, env)
	a := newMember(t, env.Cluster("a"))
	a.serve("demo", "echo", 2)

	gw, err := fedproc.StartGateway(t.Context(), a.f, binDir, "--log-level", "debug")
	require.NoError(t, err)
	t.Cleanup(func() { _ = gw.Stop(10 * time.Second) })
	addr := gw.Addr

	handshake := func(sni string) error {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		d := tls.Dialer{Config: &tls.Config{ServerName: sni, InsecureSkipVerify: true}} //nolint:gosec // the answer is HTTP, never verified
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			_ = c.Close()
		}
		return err
	}
	var last error
	var exited bool
	require.Eventually(t, func() bool {
		if exited, _ = gw.Proc.Exited(); exited {
			return true
		}
		last = handshake(echoSNI)
		// The pod's HTTP server answers the ClientHello with an HTTP
		// error, whose first bytes crypto/tls reports.
		var rhe tls.RecordHeaderError
		return errors.As(last, &rhe) && string(rhe.RecordHeader[:]) == "HTTP/"
	}, 60*time.Second, 500*time.Millisecond, "the echo pods never answered through the gateway")
	require.False(t, exited, "eastwest-gw exited:\n%s", gw.Proc.Tail(30))

	err = handshake("outbound_.80_._.private.demo.svc.cluster.local")
	require.ErrorContains(t, err, "unrecognized name")

	// The control plane going away never takes routes away: with the
	// federator stopped, and after it restarts, new connections still
	// reach the pods.
	reachesEcho := func() bool {
		var rhe tls.RecordHeaderError
		return errors.As(handshake(echoSNI), &rhe) && string(rhe.RecordHeader[:]) == "HTTP/"
	}
	require.NoError(t, a.f.Stop(10*time.Second))
	for range 5 {
		require.True(t, reachesEcho(), "a new connection failed while the federator was down")
	}
	a.start()
	require.True(t, reachesEcho(), "a new connection failed after the federator restarted")

	require.NoError(t, a.mcs.MulticlusterV1alpha1().ServiceExports("demo").Delete(t.Context(), "echo", metav1.DeleteOptions{}))
	require.Eventually(t, func() bool {
		last = handshake(echoSNI)
		return last != nil && strings.Contains(last.Error(), "unrecognized name")
	}, 30*time.Second, 100*time.Millisecond, "unexport did not stop new connections; last: %v", last)
}
