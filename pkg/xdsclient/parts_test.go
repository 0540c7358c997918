package xdsclient

import (
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// appendField appends m as field num of a message's bytes.
func appendField(tb testing.TB, b []byte, num protowire.Number, m proto.Message) []byte {
	v, err := proto.Marshal(m)
	require.NoError(tb, err)
	return protowire.AppendBytes(protowire.AppendTag(b, num, protowire.BytesType), v)
}

func TestPartsDecodeAsTheWhole(t *testing.T) {
	svcs := gatewayServices(3)
	l := buildGateway(t, "10.0.0.5", svcs...).listeners[0].(*listenerv3.Listener)
	whole := func(b []byte) (Listener, error) {
		_, v, err := gatewayListenerCodec.decode(&anypb.Any{TypeUrl: TypeListener, Value: b})
		return v, err
	}

	t.Run("chains interleaved with other fields, a field twice, unknown fields", func(t *testing.T) {
		head := proto.Clone(l).(*listenerv3.Listener)
		head.FilterChains = nil
		b, err := proto.Marshal(head)
		require.NoError(t, err)
		b = appendField(t, b, 3, l.FilterChains[0])
		b = appendField(t, b, 2, socketAddress("0.0.0.0", 15444)) // address again: merged, the last port wins
		b = protowire.AppendVarint(protowire.AppendTag(b, 4999, protowire.VarintType), 1)
		for _, fc := range l.FilterChains[1:] {
			b = appendField(t, b, 3, fc)
		}
		b = protowire.AppendVarint(protowire.AppendTag(b, 3, protowire.VarintType), 7) // wrong wire type: unknown
		want, err := whole(b)
		require.NoError(t, err)
		require.EqualValues(t, 15444, want.Port)
		name, got, p, ok := gatewayListenerParts(&anypb.Any{TypeUrl: TypeListener, Value: b}, nil)
		require.True(t, ok)
		require.Equal(t, gwListener, name)
		require.Equal(t, want, got)
		require.Len(t, p, len(l.FilterChains))
	})

	t.Run("unchanged chains are reused, a changed one decoded", func(t *testing.T) {
		a := deterministicAny(t, l)
		_, v1, p1, ok := gatewayListenerParts(a, nil)
		require.True(t, ok)
		prev := &entry[Listener]{name: gwListener, v: v1, parts: p1}
		changed := proto.Clone(l).(*listenerv3.Listener)
		changed.FilterChains[2] = tcpChain(t, "new.example", svcs[0].cluster())
		sortChains(changed.FilterChains)
		b := deterministicAny(t, changed)
		want, err := whole(b.GetValue())
		require.NoError(t, err)
		_, got, _, ok := gatewayListenerParts(b, prev)
		require.True(t, ok)
		require.Equal(t, want, got)
		reused := 0
		for _, ch := range got.Chains {
			for _, old := range v1.Chains {
				if &ch.SNIs[0] == &old.SNIs[0] {
					reused++
				}
			}
		}
		require.Equal(t, len(l.FilterChains)-1, reused, "every chain but the new one is the previous version's")
	})

	t.Run("what spans chains is checked over all of them", func(t *testing.T) {
		a := deterministicAny(t, l)
		_, v1, p1, ok := gatewayListenerParts(a, nil)
		require.True(t, ok)
		prev := &entry[Listener]{name: gwListener, v: v1, parts: p1}
		dup := proto.Clone(l).(*listenerv3.Listener)
		dup.FilterChains = append(dup.FilterChains, tcpChain(t, svcs[1].sni(), svcs[2].cluster()))
		b := deterministicAny(t, dup)
		_, _, _, ok = gatewayListenerParts(b, prev)
		require.False(t, ok, "an SNI of a reused chain in a new one")
		s := &state{listeners: map[string]*entry[Listener]{gwListener: prev}}
		_, err := s.apply(TypeListener, []*anypb.Any{b})
		_, wantErr := (&state{}).apply(TypeListener, []*anypb.Any{b})
		require.ErrorContains(t, err, `is also matched by filter_chains[`)
		require.Equal(t, nackMessage(wantErr), nackMessage(err), "decoded whole for the NACK")
	})

	t.Run("an invalid part is refused as by the whole decode", func(t *testing.T) {
		bad := proto.Clone(l).(*listenerv3.Listener)
		bad.FilterChains[1].FilterChainMatch.ServerNames = []string{"*.example.com"}
		b := deterministicAny(t, bad)
		_, _, _, ok := gatewayListenerParts(b, nil)
		require.False(t, ok)
		_, err := whole(b.GetValue())
		require.ErrorContains(t, err, "filter_chains[1].filter_chain_match.server_names[0]")
	})

	t.Run("route configuration", func(t *testing.T) {
		rc := buildSidecar(t, scEcho, scGreeter, scDB).routes[0].(*routev3.RouteConfiguration)
		head := proto.Clone(rc).(*routev3.RouteConfiguration)
		head.VirtualHosts = nil
		b, err := proto.Marshal(head)
		require.NoError(t, err)
		for _, vh := range rc.VirtualHosts {
			b = appendField(t, b, 2, vh)
			b = protowire.AppendVarint(protowire.AppendTag(b, 4998, protowire.VarintType), 1)
		}
		a := &anypb.Any{TypeUrl: TypeRouteConfiguration, Value: b}
		_, want, err := routeCodec.decode(a)
		require.NoError(t, err)
		name, got, _, ok := routeConfigParts(a, nil)
		require.True(t, ok)
		require.Equal(t, rc.Name, name)
		require.Equal(t, want, got)
		require.Same(t, &got.VirtualHosts[1], got.VirtualHost(scGreeter.host()))
	})

	t.Run("outbound listener", func(t *testing.T) {
		out := buildSidecar(t, scEcho, scGreeter, scDB).listeners[0].(*listenerv3.Listener)
		a := deterministicAny(t, out)
		want, err := decodeOutbound(out)
		require.NoError(t, err)
		got, p, ok := outboundParts(a, nil)
		require.True(t, ok)
		require.Equal(t, want, got)
		// Two chains for one VIP and port, one of them reused: refused.
		twice := proto.Clone(out).(*listenerv3.Listener)
		twice.FilterChains = append(twice.FilterChains, proto.Clone(out.FilterChains[1]).(*listenerv3.FilterChain))
		twice.FilterChains[len(twice.FilterChains)-1].FilterChainMatch.PrefixRanges = []*corev3.CidrRange{twice.FilterChains[1].FilterChainMatch.PrefixRanges[0]}
		_, _, ok = outboundParts(deterministicAny(t, twice), &entry[*OutboundListener]{name: OutboundListenerName, v: got, parts: p})
		require.False(t, ok)
		_, err = decodeOutbound(twice)
		require.ErrorContains(t, err, "is also matched by filter_chains[1]")
	})
}
