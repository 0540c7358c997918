package sidecar

import (
	"math"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// A new configuration's RBAC reaches the inbound connections already
// open: revoking access is what an AuthorizationPolicy is for, and a
// caller's sidecar pools its connections for as long as they last.
//
// An inbound connection is matched again, in the configuration current
// now, by what it already knows: its original destination port, its
// transport (TLS, or plaintext on a raw_buffer chain) and the protocol
// its TLS handshake negotiated (MatchIndex(port, transport, [alpn])),
// which in the configuration it was accepted under gives back its own
// chain; its network RBAC reads the caller, the peer address and the
// original destination address and port it was accepted with. A
// plaintext connection's caller is "" (unauthenticated) for the
// network RBAC of every configuration; a port that a new configuration
// makes STRICT has no raw_buffer chain for it, and the connection is
// then one whose chain is gone.
//
//   - HTTP requests: each is decided by the HTTP RBAC of the current
//     chain (rbacNow): one atomic load and a pointer comparison while the
//     configuration is the one the connection was accepted under, the
//     chain's match (about 50 ns, no allocation) after a change.
//   - Connections (network RBAC, decided once per connection and
//     configuration): each adopted configuration wakes revokeLoop, which
//     re-decides every open inbound connection, TCP and HTTP, off the
//     swap's path, and closes those the current chain's network RBAC now
//     denies (refused, reason rbac). A connection registers itself with
//     the configuration it was decided under, then checks the current one
//     once more, so none is missed by a pass that started before it
//     registered.
//   - A chain that is gone, or is of the other kind now: an HTTP
//     connection finishes the request in flight and closes as a drain
//     closes it (HTTP/1.1 "connection: close", or closed while idle;
//     HTTP/2 GOAWAY), its last requests decided by the HTTP RBAC it was
//     accepted under and the current chain's network RBAC, if any, as
//     Envoy drains the connections of a filter chain an update removed;
//     and as Envoy's drain time ends such a drain, one still open
//     Config.DrainTimeout later (a stream, a long poll, an upgraded
//     connection) is closed then (no_chain), so that a port made STRICT
//     or a chain removed stops every caller within that bound. A
//     TCP connection cannot be closed gracefully and has no request to
//     decide: it is closed (no_chain; rbac if the current chain's network
//     RBAC denies it), since the configuration would no longer let its
//     bytes through as they are (a port now HTTP decides every request).

// inboundConn is an inbound connection as a new configuration re-decides
// it. Everything but checked and retiring is set before it is
// registered and then only read.
type inboundConn struct {
	// caller is the SPIFFE ID of the caller's verified SVID; "" over
	// plaintext.
	caller string
	// peer is the socket's remote address and dstIP the original
	// destination address, IPv4 unmapped, for RBAC's address matchers.
	peer, dstIP netip.Addr
	// port is the original destination port, transport the chain's
	// transport_protocol and alpn the protocol the TLS handshake
	// negotiated (nil: none), as MatchIndex takes them.
	port      uint16
	transport xdsclient.Transport
	alpn      []string
	// st is the configuration the connection was accepted under, and
	// http whether its chain there is an HTTP connection manager.
	st   *state
	http bool
	// sock is the connection's socket: closing it cuts the connection,
	// whatever serves it.
	sock net.Conn
	// checked is the configuration its network RBAC was decided against
	// last; never an older one than before (state.gen).
	checked atomic.Pointer[state]
	// retiring: the current configuration has no chain of its kind for
	// it; an HTTP connection closes after the request in flight, or when
	// drain fires (retireConn).
	retiring atomic.Bool
	drain    atomic.Pointer[time.Timer]
	// nh is the connection once net/http's server serves it, for closing
	// it while idle.
	nh atomic.Pointer[httpConn]
}

// rbacRequest is what RBAC reads of the connection: its caller, peer
// address and original destination.
func (in *inboundConn) rbacRequest() xdsclient.RBACRequest {
	return xdsclient.RBACRequest{ID: in.caller, Port: in.port, PeerIP: in.peer, DestinationIP: in.dstIP}
}

// newInboundConn is a connection accepted under st, on chain ch, from
// caller at peer to dst, c its socket and alpn its negotiated protocol.
func newInboundConn(c net.Conn, st *state, ch *xdsclient.InboundChain, caller string, peer netip.Addr, dst netip.AddrPort, alpn string) *inboundConn {
	in := &inboundConn{caller: caller, peer: peer, dstIP: dst.Addr(), port: dst.Port(), transport: ch.Transport(), st: st, http: ch.HTTP != nil, sock: c}
	if alpn != "" {
		in.alpn = []string{alpn}
	}
	in.checked.Store(st)
	return in
}

// register adds in to the connections a new configuration re-decides,
// then decides it against the current configuration if that is not the
// one it was accepted under: a pass that took its list before in was
// added has seen the new configuration. It reports false when in was
// cut (its socket closed, the refusal counted).
func (p *Proxy) register(in *inboundConn) bool {
	p.inMu.Lock()
	p.inConns[in] = struct{}{}
	p.inMu.Unlock()
	if st := p.state.Load(); st != in.st {
		return p.recheck(in, st) != verdictCut
	}
	return true
}

func (p *Proxy) unregister(in *inboundConn) {
	p.inMu.Lock()
	delete(p.inConns, in)
	p.inMu.Unlock()
	if t := in.drain.Load(); t != nil {
		t.Stop()
	}
}

// retireConn marks in retiring, the first time only arming its drain: the
// connection is closed (no_chain) if it is still open
// Config.DrainTimeout from now.
func (p *Proxy) retireConn(in *inboundConn) {
	if !in.retiring.CompareAndSwap(false, true) {
		return
	}
	in.drain.Store(time.AfterFunc(p.cfg.DrainTimeout, func() {
		p.inMu.Lock()
		_, open := p.inConns[in]
		p.inMu.Unlock()
		if open && in.cut() {
			p.refuse(in.sock, listenerInbound, ReasonNoChain, "caller", in.caller, "peer", in.peer, "port", in.port,
				"transport", in.transport.String(), "open", true, "drained", p.cfg.DrainTimeout)
		}
	}))
}

// cut claims in as closed by a decision (checked becomes cutState),
// reporting false when one already did: a connection is refused, and
// counted, once.
func (in *inboundConn) cut() bool {
	for {
		prev := in.checked.Load()
		if prev == cutState {
			return false
		}
		if in.checked.CompareAndSwap(prev, cutState) {
			return true
		}
	}
}

// verdict is what a new configuration makes of an open connection.
type verdict int

const (
	verdictKeep   verdict = iota
	verdictRetire         // an HTTP connection closes after its request in flight
	verdictCut            // closed now
)

// recheck decides in against st, unless it was decided against st or a
// newer configuration already: it closes a connection st's chain's
// network RBAC denies, and one whose chain st no longer has (an HTTP
// one gracefully).
func (p *Proxy) recheck(in *inboundConn, st *state) verdict {
	for {
		prev := in.checked.Load()
		if prev.gen >= st.gen {
			return verdictKeep
		}
		if in.checked.CompareAndSwap(prev, st) {
			break
		}
	}
	l := st.cfg.Sidecar.Inbound
	var ch *xdsclient.InboundChain
	if i := l.MatchIndex(in.port, in.transport, in.alpn); i >= 0 {
		ch = &l.Chains[i]
	}
	reason := ReasonRBAC
	req := in.rbacRequest()
	switch {
	case ch != nil && !ch.RBAC.Allows(&req):
	case ch != nil && (ch.HTTP != nil) == in.http:
		return verdictKeep
	case in.http:
		p.retireConn(in)
		return verdictRetire
	default:
		reason = ReasonNoChain
	}
	// Never decided again: counted once, while it winds down. Unless a
	// newer configuration was decided meanwhile: that decision stands.
	if !in.checked.CompareAndSwap(st, cutState) {
		return verdictKeep
	}
	if t := in.drain.Load(); t != nil {
		t.Stop()
	}
	p.refuse(in.sock, listenerInbound, reason, "caller", in.caller, "peer", in.peer, "port", in.port, "transport", in.transport.String(), "open", true)
	return verdictCut
}

// cutState is the checked configuration of a connection recheck closed:
// later than any.
var cutState = &state{gen: math.MaxUint64}

// rbacNow is what decides a request on ci's connection now: the network
// RBAC of its chain in the current configuration when the connection was
// not decided against that configuration yet (nil otherwise), and the
// connection manager of that chain, whose HTTP RBAC and path
// normalization apply (together: a policy never meets a path normalized
// under another configuration's rules); of the chain it was accepted
// under when the current configuration has no HTTP chain for it (the
// connection is then retiring: its last request). Outbound, the
// connection's own manager (no RBAC, no normalization).
func (p *Proxy) rbacNow(ci *connInfo) (*xdsclient.NetworkRBAC, *xdsclient.HTTPConnectionManager) {
	in := ci.in
	if in == nil {
		return nil, ci.hcm
	}
	st := p.state.Load()
	if st == in.st {
		return nil, ci.hcm
	}
	var nw *xdsclient.NetworkRBAC
	l := st.cfg.Sidecar.Inbound
	if i := l.MatchIndex(in.port, in.transport, in.alpn); i >= 0 {
		ch := &l.Chains[i]
		if ch.RBAC != nil && in.checked.Load() != st {
			nw = ch.RBAC
		}
		if ch.HTTP != nil {
			return nw, ch.HTTP
		}
	}
	p.retireConn(in)
	return nw, ci.hcm
}

// retiring reports whether ci's connection closes after its request in
// flight: the current configuration has no HTTP chain for it.
func (ci *connInfo) retiring() bool {
	return ci.in != nil && ci.in.retiring.Load()
}

// revokeLoop re-decides the open inbound connections each time a
// configuration is adopted (p.revoke, coalesced: a pass decides against
// the configuration current when it runs), until stop is closed; then
// once more if one was adopted meanwhile.
func (p *Proxy) revokeLoop(stop <-chan struct{}) {
	var buf []*inboundConn
	for {
		select {
		case <-p.revoke:
		case <-stop:
			select {
			case <-p.revoke:
				p.recheckAll(buf)
			default:
			}
			return
		}
		buf = p.recheckAll(buf)
	}
}

// recheckAll decides every open inbound connection against the current
// configuration; buf is for the list, given back emptied.
func (p *Proxy) recheckAll(buf []*inboundConn) []*inboundConn {
	st := p.state.Load()
	if st == nil {
		return buf
	}
	p.inMu.Lock()
	for in := range p.inConns {
		buf = append(buf, in)
	}
	p.inMu.Unlock()
	retired := false
	for _, in := range buf {
		if p.recheck(in, st) == verdictRetire {
			retired = true
			if c := in.nh.Load(); c != nil && c.idle.Load() {
				_ = c.Close()
			}
		}
	}
	if retired {
		p.retireIdle()
	}
	clear(buf)
	return buf[:0]
}

// retireIdle closes the retiring connections of the sidecar's own codecs
// as the drain does: an HTTP/1.1 one waiting for a request now (one
// serving a request closes after it), an HTTP/2 one with a GOAWAY once
// its streams are done.
func (p *Proxy) retireIdle() {
	p.h1Mu.Lock()
	for hc := range p.h1Conns {
		if hc.info.retiring() && hc.state.CompareAndSwap(h1Idle, h1Closed) {
			_ = hc.c.SetReadDeadline(time.Now())
		}
	}
	p.h1Mu.Unlock()
	var h2 []*h2Conn
	p.h2Mu.Lock()
	for hc := range p.h2Conns {
		if hc.info.retiring() {
			h2 = append(h2, hc)
		}
	}
	p.h2Mu.Unlock()
	for _, hc := range h2 {
		hc.goAwayNow()
	}
}

// requestRevokes has revokeLoop re-decide the open inbound connections.
func (p *Proxy) requestRevokes() {
	select {
	case p.revoke <- struct{}{}:
	default:
	}
}
