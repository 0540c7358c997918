package xdsclient

import (
	"crypto/sha256"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// Some resources hold a part per service: the gateway's listener a
// filter chain per exported service port, the sidecar's outbound
// listener a chain per TCP port and VIP, a route configuration a virtual
// host per service. A change to one service changes the resource, and
// state of the world resends it whole. These are decoded by parts: the
// resource's bytes are split at the top level into its parts and the
// rest; a part whose bytes a valid earlier version of the resource had
// is taken as decoded then, the others are unmarshaled and decoded one
// by one, and the checks that span parts (an SNI in two chains, two
// chains for one VIP and port, a domain in two virtual hosts) run over
// all of them as before.
//
// Splitting is exact: a message's bytes unmarshal to the same message as
// its parts and the rest unmarshaled separately, and protoc-gen-validate
// has no rule on these repeated fields themselves, so the whole is valid
// exactly when the rest and every part are. Whenever anything is wrong,
// the parts path gives up and the resource is decoded whole, so a NACK
// says what it always said.

// parts maps the digest of each part of a resource's bytes to the
// part's index in the decoded value.
type parts map[digest]int32

// partLimit is the recursion limit for unmarshaling one part: a part is
// one level below its resource, so unmarshaling it whole stops at the
// same depth.
const partLimit = protowire.DefaultRecursionLimit - 1

// splitRepeated splits a message's bytes into the occurrences of the
// message field num (a repeated field's elements, in order, aliasing b)
// and the rest of the message; ok is false when b is malformed.
func splitRepeated(b []byte, num protowire.Number) (rest []byte, elems [][]byte, ok bool) {
	for len(b) > 0 {
		n, typ, tagLen := protowire.ConsumeTag(b)
		if tagLen < 0 {
			return nil, nil, false
		}
		if n == num && typ == protowire.BytesType {
			v, vLen := protowire.ConsumeBytes(b[tagLen:])
			if vLen < 0 {
				return nil, nil, false
			}
			elems = append(elems, v)
			b = b[tagLen+vLen:]
			continue
		}
		vLen := protowire.ConsumeFieldValue(n, typ, b[tagLen:])
		if vLen < 0 {
			return nil, nil, false
		}
		rest = append(rest, b[:tagLen+vLen]...)
		b = b[tagLen+vLen:]
	}
	return rest, elems, true
}

// partSource gives a resource's decoder its parts: a part the previous
// version had (prev: the digests of its parts; prevAt: its decoded part
// at an index) is reused, any other is decoded and validated (decode:
// unmarshal, decode, protoc-gen-validate).
type partSource[P any] struct {
	elems  [][]byte
	sums   []digest
	prev   parts
	prevAt func(j int32) P
	decode func(b []byte) (P, error)
}

func newPartSource[P any](elems [][]byte, prev parts, prevAt func(int32) P, decode func([]byte) (P, error)) *partSource[P] {
	ps := &partSource[P]{elems: elems, sums: make([]digest, len(elems)), prev: prev, prevAt: prevAt, decode: decode}
	for i, e := range elems {
		ps.sums[i] = sha256.Sum256(e)
	}
	return ps
}

// part is part i: the previous version's when its bytes are the same,
// else decoded now.
func (ps *partSource[P]) part(i int) (P, error) {
	if j, ok := ps.prev[ps.sums[i]]; ok {
		return ps.prevAt(j), nil
	}
	return ps.decode(ps.elems[i])
}

// parts are the digests of the new version's parts.
func (ps *partSource[P]) parts() parts {
	p := make(parts, len(ps.sums))
	for i, s := range ps.sums {
		p[s] = int32(i)
	}
	return p
}

// changedParts calls gone with the index in the old version of every
// part the new one does not have, and came with the index in the new
// version of every part the old one does not have: what changed between
// two versions of a resource decoded by parts, of nOld and nNew parts.
// It reports false, calling neither, when it cannot tell (a version not
// decoded by parts, or holding one part twice).
func changedParts(old, new parts, nOld, nNew int, gone, came func(i int32)) bool {
	if old == nil || new == nil || len(old) != nOld || len(new) != nNew {
		return false
	}
	for d, i := range old {
		if _, ok := new[d]; !ok {
			gone(i)
		}
	}
	for d, i := range new {
		if _, ok := old[d]; !ok {
			came(i)
		}
	}
	return true
}

// unmarshalPart unmarshals one part's bytes as unmarshaling its whole
// resource would.
func unmarshalPart(b []byte, m proto.Message) error {
	return proto.UnmarshalOptions{RecursionLimit: partLimit}.Unmarshal(b, m)
}

// gatewayListenerParts decodes a gateway listener by parts, its filter
// chains, reusing those of prev (nil: none); ok false: decode it whole.
func gatewayListenerParts(r *anypb.Any, prev *entry[Listener]) (name string, l Listener, p parts, ok bool) {
	if r.GetTypeUrl() != TypeListener {
		return "", Listener{}, nil, false
	}
	const filterChains = 3
	rest, elems, ok := splitRepeated(r.GetValue(), filterChains)
	if !ok {
		return "", Listener{}, nil, false
	}
	m := new(listenerv3.Listener)
	if err := proto.Unmarshal(rest, m); err != nil {
		return "", Listener{}, nil, false
	}
	var prevParts parts
	var prevChains []Chain
	if prev != nil {
		prevParts, prevChains = prev.parts, prev.v.Chains
	}
	ps := newPartSource(elems, prevParts, func(j int32) Chain { return prevChains[j] }, func(b []byte) (Chain, error) {
		fc := new(listenerv3.FilterChain)
		if err := unmarshalPart(b, fc); err != nil {
			return Chain{}, err
		}
		ch, err := decodeFilterChain(fc)
		if err != nil {
			return Chain{}, err
		}
		return ch, pgv(fc)
	})
	l, err := decodeListenerWith(m, len(elems), ps.part)
	if err != nil {
		return "", Listener{}, nil, false
	}
	return m.GetName(), l, ps.parts(), true
}

// outboundParts decodes the sidecar's outbound listener by parts, as
// gatewayListenerParts; ok false for any other listener.
func outboundParts(r *anypb.Any, prev *entry[*OutboundListener]) (*OutboundListener, parts, bool) {
	if r.GetTypeUrl() != TypeListener || string(peekName(r.GetValue())) != OutboundListenerName {
		return nil, nil, false
	}
	const filterChains = 3
	rest, elems, ok := splitRepeated(r.GetValue(), filterChains)
	if !ok {
		return nil, nil, false
	}
	m := new(listenerv3.Listener)
	if err := proto.Unmarshal(rest, m); err != nil || m.GetName() != OutboundListenerName {
		return nil, nil, false
	}
	var prevParts parts
	var prevChains []OutboundChain
	if prev != nil {
		prevParts, prevChains = prev.parts, prev.v.Chains
	}
	ps := newPartSource(elems, prevParts, func(j int32) OutboundChain { return prevChains[j] }, func(b []byte) (OutboundChain, error) {
		fc := new(listenerv3.FilterChain)
		if err := unmarshalPart(b, fc); err != nil {
			return OutboundChain{}, err
		}
		ch, err := decodeOutboundChain(fc)
		if err != nil {
			return OutboundChain{}, err
		}
		return ch, pgv(fc)
	})
	l, err := decodeOutboundWith(m, len(elems), ps.part)
	if err != nil {
		return nil, nil, false
	}
	return l, ps.parts(), true
}

// routeConfigParts decodes a route configuration by parts, its virtual
// hosts, as gatewayListenerParts.
func routeConfigParts(r *anypb.Any, prev *entry[*RouteConfig]) (name string, rc *RouteConfig, p parts, ok bool) {
	if r.GetTypeUrl() != TypeRouteConfiguration {
		return "", nil, nil, false
	}
	const virtualHosts = 2
	rest, elems, ok := splitRepeated(r.GetValue(), virtualHosts)
	if !ok {
		return "", nil, nil, false
	}
	m := new(routev3.RouteConfiguration)
	if err := proto.Unmarshal(rest, m); err != nil {
		return "", nil, nil, false
	}
	var prevParts parts
	var prevHosts []VirtualHost
	if prev != nil {
		prevParts, prevHosts = prev.parts, prev.v.VirtualHosts
	}
	ps := newPartSource(elems, prevParts, func(j int32) VirtualHost { return prevHosts[j] }, func(b []byte) (VirtualHost, error) {
		vh := new(routev3.VirtualHost)
		if err := unmarshalPart(b, vh); err != nil {
			return VirtualHost{}, err
		}
		v, err := decodeVirtualHost(vh)
		if err != nil {
			return VirtualHost{}, err
		}
		return v, pgv(vh)
	})
	rc, err := decodeRouteConfigWith(m, len(elems), ps.part)
	if err != nil {
		return "", nil, nil, false
	}
	return m.GetName(), rc, ps.parts(), true
}
