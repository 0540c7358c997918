package sidecar

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/isthmus-mesh/isthmus/internal/relay"
	"github.com/isthmus-mesh/isthmus/pkg/sidecar/capture"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

var errNoChain = errors.New("no inbound TLS filter chain matches the ClientHello")

// destination is where c was going: its original destination when
// iptables redirected it, else (redirected false) its own local address.
func (p *Proxy) destination(c *net.TCPConn) (dst netip.AddrPort, redirected bool, err error) {
	local := localAddr(c)
	dst, err = p.originalDst(c)
	switch {
	case errors.Is(err, capture.ErrNoOriginalDst):
		return local, false, nil
	case err != nil:
		return netip.AddrPort{}, false, err
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	return dst, dst != local, nil
}

// fromThisPod reports whether c comes from a process of this pod (this
// network namespace).
func (p *Proxy) fromThisPod(c *net.TCPConn) bool {
	return isLocalSource(remoteIP(c), localAddr(c).Addr(), p.ifAddrs.has)
}

// isLocalSource reports whether a connection from remote to local came
// from this network namespace: from loopback, or from the address it was
// made to (a process calling the pod's own address gets that address as
// its source), or else from any address of an interface here, which
// isLocal looks up (the rare case, and the only one that costs).
func isLocalSource(remote, local netip.Addr, isLocal func(netip.Addr) bool) bool {
	return remote.IsLoopback() || remote == local || isLocal(remote)
}

// ifAddrsTTL is how long the interface addresses are taken as known.
// A pod's addresses are set before its app starts.
const ifAddrsTTL = time.Second

// ifAddrs are the addresses of this network namespace's interfaces, read
// at most once per ifAddrsTTL: a connection to the outbound port from
// anywhere else (refused, not_local) would otherwise cost the sidecar a
// netlink dump of every address, as many as anyone who can reach the
// port cares to open.
type ifAddrs struct {
	mu    sync.Mutex
	at    time.Time
	addrs []netip.Addr
	// read is interfaceAddrs but in tests.
	read func() ([]netip.Addr, error)
}

func (l *ifAddrs) has(a netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now := time.Now(); l.at.IsZero() || now.Sub(l.at) >= ifAddrsTTL {
		read := l.read
		if read == nil {
			read = interfaceAddrs
		}
		// A failed read keeps what was known; it is tried again after
		// the TTL, not on every connection.
		if addrs, err := read(); err == nil {
			l.addrs = addrs
		}
		l.at = now
	}
	return slices.Contains(l.addrs, a)
}

// interfaceAddrs are the addresses of the interfaces in this network
// namespace, IPv4 unmapped.
func interfaceAddrs() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, ia := range addrs {
		if n, ok := ia.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok {
				out = append(out, ip.Unmap())
			}
		}
	}
	return out, nil
}

// localAddr is c's local address, IPv4 unmapped.
func localAddr(c *net.TCPConn) netip.AddrPort {
	a := c.LocalAddr().(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}

// remoteIP is c's peer address, IPv4 unmapped.
func remoteIP(c *net.TCPConn) netip.Addr {
	return c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
}

// serveOutbound is one outbound connection's goroutine: original
// destination, filter chain, then an HTTP connection manager or a TCP
// proxy.
func (p *Proxy) serveOutbound(c *net.TCPConn) {
	defer p.connGoroutines.Done()
	st := p.state.Load()
	if st == nil {
		p.refuse(c, listenerOutbound, ReasonNoConfig)
		p.release(listenerOutbound)
		return
	}
	dst, redirected, err := p.destination(c)
	if err != nil {
		// Conntrack could not say (no netfilter in this kernel, say): as
		// without iptables, the app sent it to the sidecar itself.
		p.log.Debug("no original destination; explicit mode", "remote", c.RemoteAddr().String(), "error", err)
		dst, redirected = localAddr(c), false
	}
	if !redirected && !p.fromThisPod(c) {
		p.refuse(c, listenerOutbound, ReasonNotLocal)
		p.release(listenerOutbound)
		return
	}
	l := st.cfg.Sidecar.Outbound
	match := dst
	if !redirected {
		// Sent to the sidecar itself: the listener's own address as xDS
		// names it (port 15001), whatever port it is bound to here.
		match = netip.AddrPortFrom(dst.Addr(), l.Port)
	}
	ch := l.Match(match)
	if ch.HTTP != nil {
		p.serveHTTPConn(p.outQueue, newTryConn(c), &connInfo{listener: listenerOutbound, hcm: ch.HTTP, dst: dst, redirected: redirected})
		return
	}
	p.proxyTCP(c, st, ch.TCP, listenerOutbound, dst, redirected)
}

// serveHTTPConn serves an HTTP connection manager's connection: on the
// HTTP/1.1 path (h1.go), which hands what it does not serve to q's
// net/http server, or on that server alone when Config.NetHTTP1 says so.
func (p *Proxy) serveHTTPConn(q *connQueue, c net.Conn, info *connInfo) {
	if p.cfg.NetHTTP1 {
		p.pushHTTPConn(q, c, info)
		return
	}
	p.serveH1(q, c, info)
}

// pushHTTPConn hands c to an HTTP server; it is released when the server
// closes it.
func (p *Proxy) pushHTTPConn(q *connQueue, c net.Conn, info *connInfo) {
	hc := &httpConn{Conn: c, info: info, release: func() { p.releaseHTTP(info) }}
	if info.in != nil {
		info.in.nh.Store(hc)
	}
	if !q.push(hc) {
		_ = hc.Close()
	}
}

// releaseHTTP is the end of an HTTP connection: it no longer counts
// against MaxConnections, nor is it re-decided (inbound).
func (p *Proxy) releaseHTTP(info *connInfo) {
	if info.in != nil {
		p.unregister(info.in)
	}
	p.release(info.listener)
}

// proxyTCP is Envoy's tcp_proxy: connect to the cluster, then copy both
// ways with half-close until both sides are done or the idle timeout.
func (p *Proxy) proxyTCP(down relay.Conn, st *state, tp *xdsclient.TCPProxy, listener string, dst netip.AddrPort, redirected bool) {
	defer p.release(listener)
	p.track(down)
	defer p.untrackAndClose(down)
	u := st.clusters[tp.Cluster]
	if u == nil {
		p.refuse(down, listener, ReasonNoCluster, "cluster", tp.Cluster)
		return
	}
	target := dst
	if u.picker == nil {
		switch {
		case listener == listenerInbound:
			target = netip.AddrPortFrom(p.cfg.AppAddr, dst.Port())
		case !redirected:
			p.refuse(down, listener, ReasonLoop, "cluster", u.name, "destination", dst.String())
			return
		}
	}
	upc, err := p.dialTCP(context.Background(), u, target)
	if err != nil {
		p.refuse(down, listener, ReasonNoEndpoint, "cluster", u.name, "error", err)
		return
	}
	up := upc.(relay.Conn)
	p.track(up)
	defer p.untrackAndClose(up)
	bc := p.metrics.bytes(listener, u.name)
	relay.Pipe(down, up, tp.IdleTimeout, bc.received.add, bc.sent.add)
}

// inConn carries the original destination's port to GetConfigForClient,
// and the filter chain it selected back to the connection's goroutine.
type inConn struct {
	tryConn
	port  uint16
	chain int
}

// tlsHandshakeRecord is the first byte of a TLS connection: the content
// type of the record carrying its ClientHello.
const tlsHandshakeRecord = 0x16

// sniff is Envoy's tls_inspector deciding transport_protocol: "tls" when
// the connection opens with a TLS handshake record, "raw_buffer" for
// anything else. It waits, under the connection's deadline, for the
// caller's first byte, and leaves it unread (MSG_PEEK): crypto/tls, the
// HTTP codecs or the tcp_proxy's splice read it as if nothing had looked.
// A caller that sends nothing first (a server-first protocol) is not
// told apart: it waits until the handshake timeout, as a TLS caller
// that stalls does.
func (c *inConn) sniff() (xdsclient.Transport, error) {
	b, err := c.peekByte()
	if err != nil {
		return 0, err
	}
	if b == tlsHandshakeRecord {
		return xdsclient.TransportTLS, nil
	}
	return xdsclient.TransportRaw, nil
}

// serveInbound is one inbound connection's goroutine: original
// destination; when the configuration has plaintext chains, the
// transport (sniff); for TLS, the handshake with the filter chain the
// destination port and then the ClientHello's ALPN select (the caller's
// SVID required and verified against its own trust domain's bundle);
// for plaintext, the destination port's raw_buffer chain; then an HTTP
// connection manager or a TCP proxy to the app.
func (p *Proxy) serveInbound(c *net.TCPConn) {
	defer p.connGoroutines.Done()
	st := p.state.Load()
	if st == nil {
		p.refuse(c, listenerInbound, ReasonNoConfig)
		p.release(listenerInbound)
		return
	}
	dst, redirected, err := p.destination(c)
	if err != nil || !redirected {
		// Not redirected: the destination is this listener, and the app
		// is not behind it.
		p.refuse(c, listenerInbound, ReasonNoOriginalDst, "error", err)
		p.release(listenerInbound)
		return
	}
	if dst.Port() == p.outLn.Addr().(*net.TCPAddr).AddrPort().Port() {
		// A peer that dialled the pod's outbound port: passed on, it
		// would reach the outbound listener from loopback, as the pod's
		// own process, and go into the mesh with this workload's
		// identity. Istio's inbound listener blackholes 15001 too.
		p.refuse(c, listenerInbound, ReasonLoop, "destination", dst.String())
		p.release(listenerInbound)
		return
	}
	ic := &inConn{port: dst.Port(), chain: -1}
	ic.init(c)
	_ = c.SetDeadline(time.Now().Add(p.cfg.HandshakeTimeout))
	l := st.cfg.Sidecar.Inbound
	// Only a configuration with plaintext chains looks before the
	// handshake: STRICT everywhere, every connection is TLS.
	if l.Plaintext() {
		t, err := ic.sniff()
		if err != nil {
			p.refuse(c, listenerInbound, ReasonHandshake, "destination", dst.String(), "error", err)
			p.release(listenerInbound)
			return
		}
		if t == xdsclient.TransportRaw {
			p.servePlaintextInbound(c, ic, st, dst)
			return
		}
	}
	tc := tls.Server(ic, st.inboundDispatch())
	if err := tc.Handshake(); err != nil {
		reason := ReasonHandshake
		if errors.Is(err, errNoChain) {
			reason = ReasonNoChain
		}
		p.refuse(c, listenerInbound, reason, "destination", dst.String(), "error", err)
		p.release(listenerInbound)
		return
	}
	_ = c.SetDeadline(time.Time{})
	ch := &l.Chains[ic.chain]
	// The caller's SPIFFE ID, read once for the RBAC filters of this
	// chain and of the chains later configurations match for the
	// connection, whose principals match it.
	cs := tc.ConnectionState()
	var xfcc string
	if ch.HTTP != nil && ch.HTTP.ForwardClientCert == xdsclient.SanitizeSet {
		xfcc = p.xfcc(cs, ch.HTTP.SetClientCertURI)
	}
	p.serveInboundChain(c, tc, st, ch, dst, peerID(cs), cs.NegotiatedProtocol, xfcc)
}

// servePlaintextInbound serves a connection that did not open with TLS:
// on the raw_buffer chain of its destination port's chains (of any
// port's when its port has none), or, when those have none (the port is
// STRICT), nowhere: closed, no_chain. Its caller has no identity.
func (p *Proxy) servePlaintextInbound(c *net.TCPConn, ic *inConn, st *state, dst netip.AddrPort) {
	l := st.cfg.Sidecar.Inbound
	i := l.MatchIndex(dst.Port(), xdsclient.TransportRaw, nil)
	if i < 0 {
		p.refuse(c, listenerInbound, ReasonNoChain, "destination", dst.String(), "transport", xdsclient.TransportRaw.String())
		p.release(listenerInbound)
		return
	}
	_ = c.SetDeadline(time.Time{})
	ch := &l.Chains[i]
	// The tcp_proxy gets the socket itself, which splices; the HTTP
	// codecs its inConn, for the raw I/O and the HTTP/2 path's
	// non-blocking writes.
	var down net.Conn = ic
	if ch.TCP != nil {
		down = c
	}
	p.serveInboundChain(c, down, st, ch, dst, "", "", "")
}

// serveInboundChain serves an inbound connection on its chain ch of st:
// its network RBAC decided, then its tcp_proxy or HTTP connection
// manager on down (what the caller's bytes are read from: the TLS
// connection, or a plaintext one's socket or inConn). c is the socket,
// caller the caller's SPIFFE ID ("" over plaintext), alpn the protocol
// the handshake negotiated and xfcc the X-Forwarded-Client-Cert value a
// SANITIZE_SET manager sets ("" over plaintext: none).
//
// RBAC's address matchers read c's peer address (direct_remote_ip, and
// remote_ip: the connection managers trust no X-Forwarded-For hop) and
// dst's address (destination_ip). A caller in another cluster arrives
// through the east-west gateway: its peer address is the gateway's, as
// in Istio across networks.
func (p *Proxy) serveInboundChain(c *net.TCPConn, down net.Conn, st *state, ch *xdsclient.InboundChain, dst netip.AddrPort, caller, alpn, xfcc string) {
	in := newInboundConn(c, st, ch, caller, remoteIP(c), dst, alpn)
	// Decided once, the caller's identity known and nothing read from it
	// yet, as Envoy's network RBAC filter on the first byte; again with
	// each new configuration (revoke.go).
	if req := in.rbacRequest(); !ch.RBAC.Allows(&req) {
		p.refuse(c, listenerInbound, ReasonRBAC, "caller", caller, "peer", in.peer, "port", dst.Port(), "transport", ch.Transport().String())
		p.release(listenerInbound)
		return
	}
	if !p.register(in) {
		p.unregister(in)
		p.release(listenerInbound)
		return
	}
	if ch.TCP != nil {
		p.proxyTCP(down.(relay.Conn), st, ch.TCP, listenerInbound, dst, true)
		p.unregister(in)
		return
	}
	info := &connInfo{listener: listenerInbound, hcm: ch.HTTP, dst: dst, redirected: true, in: in, xfcc: xfcc}
	p.serveHTTPConn(p.inQueue, down, info)
}

// peerID is the SPIFFE ID of a verified caller's certificate (its URI
// SAN), what RBAC principal names match; empty when there is none.
func peerID(cs tls.ConnectionState) string {
	if len(cs.PeerCertificates) == 0 {
		return ""
	}
	id, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		return ""
	}
	return id.String()
}

// inboundDispatch is the TLS configuration that picks the inbound filter
// chain by the original destination port, then the ClientHello's ALPN,
// as Envoy's filter chain match does (with original_dst and
// tls_inspector), and answers with that chain's TLS. A ClientHello that
// does not come through serveInbound's inConn (none does) would be
// matched as on a port without chains.
func (st *state) inboundDispatch() *tls.Config {
	st.dispatchOnce.Do(func() {
		st.dispatch = &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			ic, _ := h.Conn.(*inConn)
			var port uint16
			if ic != nil {
				port = ic.port
			}
			i := st.cfg.Sidecar.Inbound.MatchIndex(port, xdsclient.TransportTLS, h.SupportedProtos)
			if i < 0 {
				return nil, errNoChain
			}
			if ic != nil {
				ic.chain = i
			}
			return st.inboundTLS[i], nil
		}}
	})
	return st.dispatch
}

// xfcc is Envoy's X-Forwarded-Client-Cert for a SANITIZE_SET connection
// manager: By=<own SPIFFE ID>;Hash=<hex SHA-256 of the caller's leaf
// certificate>, then URI=<caller's SPIFFE ID> when asked for.
func (p *Proxy) xfcc(cs tls.ConnectionState, withURI bool) string {
	if len(cs.PeerCertificates) == 0 {
		return ""
	}
	leaf := cs.PeerCertificates[0]
	sum := sha256.Sum256(leaf.Raw)
	var b strings.Builder
	if own, err := p.svid.GetX509SVID(); err == nil {
		b.WriteString("By=")
		b.WriteString(own.ID.String())
		b.WriteByte(';')
	}
	b.WriteString("Hash=")
	b.WriteString(hex.EncodeToString(sum[:]))
	if withURI {
		if id, err := x509svid.IDFromCert(leaf); err == nil {
			b.WriteString(";URI=")
			b.WriteString(id.String())
		}
	}
	return b.String()
}
