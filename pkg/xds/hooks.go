package xds

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/log"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/isthmus-mesh/isthmus/internal/clip"
	"github.com/isthmus-mesh/isthmus/internal/nodeid"
)

// streamState is what the Server knows about one open xDS stream.
type streamState struct {
	node, identity, peer, transport string
	since                           time.Time
	// attrs label the connected-proxies gauge; the same on open and close.
	attrs metric.MeasurementOption
	// sent is, by type URL, the last response sent: its nonce and
	// version, so that a NACK can name the version it rejects.
	sent map[string]sentResponse
	// acked is, by type URL, the last version the proxy accepted.
	acked    map[string]string
	nacks    int
	lastNACK string
}

type sentResponse struct{ nonce, version string }

// hooks are the go-control-plane server callbacks: they track streams,
// ACKs and NACKs for Status, metrics and logs. go-control-plane calls
// them synchronously from each stream's goroutine.
type hooks struct{ s *Server }

var _ serverv3.Callbacks = (*hooks)(nil)

func (h *hooks) open(ctx context.Context, id int64, transport string) {
	s := h.s
	identity := identityOf(ctx)
	mode := "tls"
	if identity == "" {
		mode = "plaintext"
	}
	st := &streamState{
		identity: identity, peer: peerAddr(ctx), transport: transport, since: time.Now(),
		attrs: metric.WithAttributes(attribute.String("transport", mode)),
		sent:  map[string]sentResponse{}, acked: map[string]string{},
	}
	s.mu.Lock()
	s.streams[id] = st
	s.mu.Unlock()
	s.metrics.connected.Add(ctx, 1, st.attrs)
	s.log.Info("xDS stream opened", "stream", id, "peer", st.peer, "identity", identity, "transport", transport, "port", mode)
}

func (h *hooks) closed(id int64, node *corev3.Node) {
	s := h.s
	s.mu.Lock()
	st, ok := s.streams[id]
	delete(s.streams, id)
	s.mu.Unlock()
	if !ok {
		return
	}
	s.metrics.connected.Add(context.Background(), -1, st.attrs)
	s.log.Info("xDS stream closed", "stream", id, "node", node.GetId(), "peer", st.peer, "after", time.Since(st.since).Round(time.Millisecond))
}

// request records the node, ACKs and NACKs. A NACK is logged with the
// proxy's reason; and so that go-control-plane's cache does not answer it
// at once with the very version just rejected (it compares the request's
// version_info, the last version the proxy accepted, to the snapshot's),
// the request is marked as being at the rejected version: the proxy gets
// the next version, when there is one.
//
// A request for a type the server does not serve ends the stream: the
// cache would keep an entry for every type URL asked (a proxy chooses
// them, up to MaxRequestBytes each), and go-control-plane's ADS stream
// buffers one response per type it has open, room for the types it
// knows; past that, an answer waits on a channel only the stream's own
// goroutine drains, with the cache locked for every proxy.
func (h *hooks) request(id int64, node *corev3.Node, typeURL, version, nonce, nackReason string, fixVersion func(string)) error {
	if !servedTypes[typeURL] {
		return status.Errorf(codes.InvalidArgument, "type URL %s is not served: this server serves listeners, routes, clusters, endpoints and secrets (%s)",
			clip.String(typeURL, maxTypeURLShown), strings.Join(slices.Sorted(maps.Keys(servedTypes)), ", "))
	}
	nackReason = clip.String(nackReason, maxNACKReason)
	s := h.s
	s.mu.Lock()
	st, ok := s.streams[id]
	if !ok {
		s.mu.Unlock()
		return nil
	}
	first := false
	switch {
	case st.node == "" && node.GetId() != "":
		if err := h.bind(node, st.identity); err != nil {
			s.mu.Unlock()
			s.metrics.refused.Add(context.Background(), 1)
			s.log.Warn("xDS node refused", "stream", id, "node", clip.String(node.GetId(), maxTypeURLShown), "identity", st.identity, "error", err)
			return err
		}
		st.node, first = node.GetId(), true
	case node.GetId() != "" && node.GetId() != st.node:
		s.mu.Unlock()
		return status.Errorf(codes.InvalidArgument, "the node ID changed on the stream, from %q to %q", st.node, clip.String(node.GetId(), maxTypeURLShown))
	}
	nodeID := st.node
	sent := st.sent[typeURL]
	isNACK := nackReason != ""
	switch {
	case isNACK:
		st.nacks++
		st.lastNACK = fmt.Sprintf("%s: %s", typeURL, nackReason)
		if sent.nonce != "" && sent.nonce == nonce && fixVersion != nil {
			fixVersion(sent.version)
		}
	case nonce != "" && nonce == sent.nonce:
		// Delta ACKs carry no version: the version is the one sent.
		st.acked[typeURL] = sent.version
	}
	s.mu.Unlock()

	if first && (nodeGroups{}).ID(node) == unservedGroup {
		s.log.Info("xDS node of a role not served yet: it gets no configuration", "stream", id, "node", nodeID)
	}
	if isNACK {
		s.metrics.nacks.Add(context.Background(), 1, metric.WithAttributes(attribute.String("type_url", typeURL)))
		s.log.Warn("proxy rejected configuration (NACK)", "stream", id, "node", nodeID, "type", typeURL,
			"rejectedVersion", sent.version, "acceptedVersion", version, "nonce", nonce, "reason", nackReason)
		return nil
	}
	if nonce != "" && nonce == sent.nonce {
		s.log.Debug("proxy accepted configuration (ACK)", "stream", id, "node", nodeID, "type", typeURL, "version", sent.version)
	}
	return nil
}

// bind checks that a node a TLS stream's SVID claims is one it may be, as
// istiod checks a proxy's namespace against its identity: a sidecar or
// gateway node names its namespace (its ID's last field,
// "<namespace>.svc.cluster.local"), which must be the SVID's, and a
// gateway's must be where gateways run (GatewayOptions.Namespace). A
// plaintext stream (the test port) has no identity to check.
func (h *hooks) bind(node *corev3.Node, identity string) error {
	if identity == "" {
		return nil
	}
	group := (nodeGroups{}).ID(node)
	if group == unservedGroup {
		return nil // served nothing
	}
	id, err := spiffeid.FromString(identity)
	if err != nil {
		return status.Errorf(codes.PermissionDenied, "identity %s: %v", identity, err)
	}
	svidNS, _, ok := workloadOf(id)
	if !ok {
		return status.Errorf(codes.PermissionDenied, "identity %s is not of a Kubernetes ServiceAccount (/ns/<namespace>/sa/<name>): it may not be a proxy", identity)
	}
	nid, err := nodeid.Parse(node.GetId())
	nodeNS := nid.Namespace
	switch {
	case err != nil:
		return status.Errorf(codes.InvalidArgument, "node ID %q: %v", clip.String(node.GetId(), maxTypeURLShown), err)
	case nodeNS != svidNS:
		return status.Errorf(codes.PermissionDenied, "node %q is in namespace %q, but its certificate's identity %s is in %q", clip.String(node.GetId(), maxTypeURLShown), nodeNS, identity, svidNS)
	case group == gatewayGroup && h.s.opts.Gateway.Namespace != "" && svidNS != h.s.opts.Gateway.Namespace:
		return status.Errorf(codes.PermissionDenied, "identity %s may not be an east-west gateway: gateways run in namespace %q", identity, h.s.opts.Gateway.Namespace)
	}
	return nil
}

// workloadOf is the namespace and ServiceAccount of a Kubernetes
// workload's SPIFFE ID, /ns/<namespace>/sa/<name>.
func workloadOf(id spiffeid.ID) (ns, sa string, ok bool) {
	parts := strings.Split(id.Path(), "/")
	if len(parts) != 5 || parts[0] != "" || parts[1] != "ns" || parts[3] != "sa" || parts[2] == "" || parts[4] == "" {
		return "", "", false
	}
	return parts[2], parts[4], true
}

// servedTypes are the type URLs the server answers: those a snapshot
// carries.
var servedTypes = func() map[string]bool {
	out := map[string]bool{}
	for typ := range (Resources{}).versionsByType() {
		out[typ] = true
	}
	return out
}()

// How much of a proxy's type URL an error quotes, and of its NACK's
// reason the logs and Status keep: both are the proxy's to choose, up to
// MaxRequestBytes.
const (
	maxTypeURLShown = 100
	maxNACKReason   = 4 << 10
)

func (h *hooks) response(id int64, typeURL, version, nonce string, n int) {
	s := h.s
	s.mu.Lock()
	st, ok := s.streams[id]
	if ok {
		st.sent[typeURL] = sentResponse{nonce: nonce, version: version}
	}
	s.mu.Unlock()
	s.log.Debug("pushed configuration", "stream", id, "type", typeURL, "version", version, "nonce", nonce, "resources", n)
}

// OnStreamOpen implements sotw.Callbacks.
func (h *hooks) OnStreamOpen(ctx context.Context, id int64, _ string) error {
	h.open(ctx, id, "sotw")
	return nil
}

// OnStreamClosed implements sotw.Callbacks.
func (h *hooks) OnStreamClosed(id int64, node *corev3.Node) { h.closed(id, node) }

// OnStreamRequest implements sotw.Callbacks.
func (h *hooks) OnStreamRequest(id int64, req *discoveryv3.DiscoveryRequest) error {
	return h.request(id, req.GetNode(), req.GetTypeUrl(), req.GetVersionInfo(), req.GetResponseNonce(), req.GetErrorDetail().GetMessage(),
		func(v string) { req.VersionInfo = v })
}

// OnStreamResponse implements sotw.Callbacks.
func (h *hooks) OnStreamResponse(_ context.Context, id int64, req *discoveryv3.DiscoveryRequest, resp *discoveryv3.DiscoveryResponse) {
	h.response(id, req.GetTypeUrl(), resp.GetVersionInfo(), resp.GetNonce(), len(resp.GetResources()))
}

// OnDeltaStreamOpen implements delta.Callbacks.
func (h *hooks) OnDeltaStreamOpen(ctx context.Context, id int64, _ string) error {
	h.open(ctx, id, "delta")
	return nil
}

// OnDeltaStreamClosed implements delta.Callbacks.
func (h *hooks) OnDeltaStreamClosed(id int64, node *corev3.Node) { h.closed(id, node) }

// OnStreamDeltaRequest implements delta.Callbacks. Delta responses carry
// only what changed, so a NACK is not answered with the same resources
// again and needs no fix.
func (h *hooks) OnStreamDeltaRequest(id int64, req *discoveryv3.DeltaDiscoveryRequest) error {
	return h.request(id, req.GetNode(), req.GetTypeUrl(), "", req.GetResponseNonce(), req.GetErrorDetail().GetMessage(), nil)
}

// OnStreamDeltaResponse implements delta.Callbacks.
func (h *hooks) OnStreamDeltaResponse(id int64, req *discoveryv3.DeltaDiscoveryRequest, resp *discoveryv3.DeltaDiscoveryResponse) {
	h.response(id, req.GetTypeUrl(), resp.GetSystemVersionInfo(), resp.GetNonce(), len(resp.GetResources()))
}

// OnFetchRequest implements rest.Callbacks; REST is not served.
func (h *hooks) OnFetchRequest(context.Context, *discoveryv3.DiscoveryRequest) error { return nil }

// OnFetchResponse implements rest.Callbacks.
func (h *hooks) OnFetchResponse(*discoveryv3.DiscoveryRequest, *discoveryv3.DiscoveryResponse) {}

// goControlPlaneLogger routes go-control-plane's printf-style logging to
// slog. Its Info and Warn lines are normal protocol steps (a stale nonce;
// an ADS EDS request that does not name a just-added cluster yet), so
// they go to Debug; its Errorf lines, failures to answer a watch, mostly
// while a stream closes, to Warn.
type goControlPlaneLogger struct{ log *slog.Logger }

var _ log.Logger = goControlPlaneLogger{}

func (l goControlPlaneLogger) Debugf(format string, args ...any) { l.at(slog.LevelDebug, format, args) }
func (l goControlPlaneLogger) Infof(format string, args ...any)  { l.at(slog.LevelDebug, format, args) }
func (l goControlPlaneLogger) Warnf(format string, args ...any)  { l.at(slog.LevelDebug, format, args) }
func (l goControlPlaneLogger) Errorf(format string, args ...any) { l.at(slog.LevelWarn, format, args) }

func (l goControlPlaneLogger) at(level slog.Level, format string, args []any) {
	ctx := context.Background()
	if !l.log.Enabled(ctx, level) {
		return
	}
	l.log.Log(ctx, level, fmt.Sprintf(format, args...), "source", "go-control-plane")
}
