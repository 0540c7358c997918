package dns

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// maxPipelined bounds the queries one TCP connection may have upstream at
// once (RFC 7766 pipelining); past it the proxy stops reading from that
// connection until one is answered, so one client cannot take every
// forward slot.
const maxPipelined = 16

// Proxy is the sidecar's DNS proxy. New binds its sockets; Run serves
// until its context ends; SetTable may be called at any time, before Run
// too.
type Proxy struct {
	cfg       Config
	log       *slog.Logger
	metrics   *metrics
	upstreams []netip.AddrPort
	// search is the pod's search list, canonical (lower case, fully
	// qualified).
	search []string
	ttl    uint32 // seconds

	// socks are where the proxy serves: ListenAddr first, then [::1]
	// (Config.IPv6Loopback).
	socks []socket

	table  atomic.Pointer[table]
	serial atomic.Uint32 // the SOA serial of the next table

	// forwards holds one token per query upstream (MaxForwards).
	forwards chan struct{}
	// tcpSlots holds one token per open client TCP connection
	// (MaxTCPConnections).
	tcpSlots chan struct{}
	ran      atomic.Bool
}

// New validates cfg, reads the resolv.conf it names and binds the UDP and
// TCP sockets; the proxy serves once Run is called, which also closes
// them. Until SetTable is called, names under ClustersetZone are answered
// SERVFAIL (not ready) and everything else is forwarded.
func New(cfg Config, opts Options) (*Proxy, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("dns proxy config: %w", err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Proxy{
		cfg:      cfg,
		log:      log.With("component", "dns-proxy"),
		metrics:  newMetrics(opts.Meter),
		ttl:      uint32(cfg.TTL / time.Second),
		forwards: make(chan struct{}, cfg.MaxForwards),
		tcpSlots: make(chan struct{}, cfg.MaxTCPConnections),
	}
	var rc resolvConf
	if cfg.ResolvConf != "" {
		var err error
		if rc, err = readResolvConf(cfg.ResolvConf); err != nil {
			return nil, fmt.Errorf("dns proxy: %w", err)
		}
	}
	p.upstreams = rc.nameservers
	if len(cfg.Upstreams) > 0 {
		p.upstreams = make([]netip.AddrPort, len(cfg.Upstreams))
		for i, u := range cfg.Upstreams {
			p.upstreams[i] = netip.MustParseAddrPort(u) // Validate parsed it
		}
	}
	if len(p.upstreams) == 0 {
		return nil, fmt.Errorf("dns proxy: no upstream: %s has no nameserver and Upstreams is empty", cfg.ResolvConf)
	}
	search := rc.search
	if cfg.SearchDomains != nil {
		search = cfg.SearchDomains
	}
	for _, s := range search {
		canon, err := canonicalName(s, 1)
		if err != nil {
			return nil, fmt.Errorf("dns proxy: search domain: %w", err)
		}
		p.search = append(p.search, canon)
	}
	if err := p.listen(); err != nil {
		return nil, err
	}
	for _, up := range p.upstreams {
		if slices.Contains(p.Addrs(), up) || (up.Port() == p.Addr().Port() && up.Addr().IsUnspecified()) {
			p.close()
			return nil, fmt.Errorf("dns proxy: upstream %s is the proxy itself", up)
		}
	}
	return p, nil
}

// socket is one address the proxy serves on, UDP and TCP.
type socket struct {
	udp *net.UDPConn
	tcp *net.TCPListener
}

// listen binds ListenAddr, UDP first, then TCP on the same port (with port
// 0, UDP's pick is tried for TCP a few times before giving up); then
// [::1] on that port when Config.IPv6Loopback asks for it.
func (p *Proxy) listen() error {
	s, err := bindPair(p.cfg.ListenAddr)
	if err != nil {
		return err
	}
	p.socks = []socket{s}
	host, _, _ := net.SplitHostPort(p.cfg.ListenAddr)
	if p.cfg.IPv6Loopback && host == "127.0.0.1" {
		v6 := net.JoinHostPort("::1", strconv.Itoa(int(p.Addr().Port())))
		s6, err := bindPair(v6)
		if err != nil {
			p.log.Warn("DNS proxy not serving IPv6 loopback: queries ip6tables captures would go unanswered", "addr", v6, "error", err)
			return nil
		}
		p.socks = append(p.socks, s6)
	}
	return nil
}

func bindPair(addr string) (socket, error) {
	for attempt := 0; ; attempt++ {
		uaddr, err := net.ResolveUDPAddr("udp", addr)
		if err != nil {
			return socket{}, fmt.Errorf("dns proxy: listen address %q: %w", addr, err)
		}
		u, err := net.ListenUDP("udp", uaddr)
		if err != nil {
			return socket{}, fmt.Errorf("dns proxy: listen on udp %s: %w", addr, err)
		}
		taddr := &net.TCPAddr{IP: uaddr.IP, Port: u.LocalAddr().(*net.UDPAddr).Port, Zone: uaddr.Zone}
		t, err := net.ListenTCP("tcp", taddr)
		if err == nil {
			return socket{udp: u, tcp: t}, nil
		}
		_ = u.Close()
		if uaddr.Port != 0 || attempt == 5 {
			return socket{}, fmt.Errorf("dns proxy: listen on tcp %s: %w", taddr, err)
		}
	}
}

func (p *Proxy) close() {
	for _, s := range p.socks {
		_ = s.udp.Close()
		_ = s.tcp.Close()
	}
}

// Addr is the address the proxy serves on (ListenAddr), UDP and TCP
// alike.
func (p *Proxy) Addr() netip.AddrPort {
	return p.socks[0].udp.LocalAddr().(*net.UDPAddr).AddrPort()
}

// Addrs are every address the proxy serves on: Addr, then [::1] if it
// serves there too.
func (p *Proxy) Addrs() []netip.AddrPort {
	out := make([]netip.AddrPort, len(p.socks))
	for i, s := range p.socks {
		out[i] = s.udp.LocalAddr().(*net.UDPAddr).AddrPort()
	}
	return out
}

// Upstreams are the resolvers the proxy forwards to, in the order tried.
func (p *Proxy) Upstreams() []netip.AddrPort {
	return append([]netip.AddrPort(nil), p.upstreams...)
}

// SetTable replaces the proxy's name table with names, host name → VIP:
// answers change at once, queries in flight finish with the table they
// started with. Names are case-insensitive, with or without the final dot;
// an IPv4 address answers A queries, an IPv6 one AAAA. When any entry is
// unusable (not a host name, a wildcard, an invalid or unspecified
// address, two addresses for one name) SetTable reports every problem and
// keeps the current table. The proxy keeps no reference to names.
func (p *Proxy) SetTable(names map[string]netip.Addr) error {
	t, err := newTable(names, p.serial.Add(1), uint32(p.cfg.NegativeTTL/time.Second))
	if err != nil {
		return err
	}
	p.table.Store(t)
	p.metrics.tableNames.Record(context.Background(), int64(len(t.hosts)))
	p.log.Debug("name table replaced", "names", len(t.hosts), "serial", t.soa.Serial)
	return nil
}

// Run serves DNS until ctx ends, then closes the sockets, cuts short the
// queries still upstream and returns once every goroutine it started has
// ended: nil on a clean shutdown, an error if a socket failed. Run may be
// called once.
func (p *Proxy) Run(ctx context.Context) error {
	if !p.ran.CompareAndSwap(false, true) {
		return errors.New("dns proxy: Run called twice")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// wg counts every goroutine Run starts, and the ones those start:
	// each is added by a goroutine already counted, so Wait below cannot
	// miss one.
	var wg sync.WaitGroup
	errc := make(chan error, 1)
	fail := func(err error) {
		select {
		case errc <- err:
		default:
		}
		cancel()
	}
	for i, s := range p.socks {
		readers := 1
		if i == 0 {
			readers = max(2, runtime.GOMAXPROCS(0))
		}
		for range readers {
			wg.Go(func() { p.serveUDP(ctx, &wg, fail, s.udp) })
		}
		wg.Go(func() { p.acceptTCP(ctx, &wg, fail, s.tcp) })
	}
	p.log.Info("DNS proxy serving", "addrs", p.Addrs(), "upstreams", p.upstreams, "search", p.search)

	<-ctx.Done()
	p.close()
	wg.Wait()
	p.log.Info("DNS proxy stopped")
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}

// serveUDP is one of the UDP readers. Answers from the table are sent from
// here; forwards go to their own goroutine.
func (p *Proxy) serveUDP(ctx context.Context, wg *sync.WaitGroup, fail func(error), conn *net.UDPConn) {
	// A query larger than its buffer would be cut short by the kernel
	// and look malformed; queries are small, but nothing forbids 64 KiB.
	in := make([]byte, 65535)
	out := make([]byte, 0, 4096)
	for {
		n, from, err := conn.ReadFromUDPAddrPort(in)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			if isTransient(err) {
				continue
			}
			fail(fmt.Errorf("dns proxy: read udp: %w", err))
			return
		}
		p.handleUDP(ctx, wg, conn, in[:n], from, out)
	}
}

func (p *Proxy) handleUDP(ctx context.Context, wg *sync.WaitGroup, conn *net.UDPConn, raw []byte, from netip.AddrPort, out []byte) {
	resp, fwd, res := p.answer(raw, udp, out)
	if fwd != nil {
		select {
		case p.forwards <- struct{}{}:
		default:
			p.metrics.fail(failOverload)
			resp, res = p.servFail(fwd, 0, "too many queries upstream", out), resultServFail
			fwd = nil
		}
	}
	if fwd != nil {
		fwd.raw = bytes.Clone(raw) // raw is the reader's buffer
		wg.Go(func() { p.forward(ctx, fwd, func(b []byte) { _, _ = conn.WriteToUDPAddrPort(b, from) }) })
		return
	}
	p.metrics.query(res, udp)
	if resp != nil {
		_, _ = conn.WriteToUDPAddrPort(resp, from)
	}
}

// isTransient reports errors a socket recovers from: out of descriptors
// or buffers, a connection aborted before accept, an ICMP error reported
// for an earlier send.
func isTransient(err error) bool {
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM,
		syscall.ECONNABORTED, syscall.ECONNREFUSED, syscall.EHOSTUNREACH, syscall.ENETUNREACH} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func (p *Proxy) acceptTCP(ctx context.Context, wg *sync.WaitGroup, fail func(error), ln *net.TCPListener) {
	var delay time.Duration
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: back off as
			// net/http does, and go on.
			if isTransient(err) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				p.log.Debug("accept failed, backing off", "error", err, "delay", delay)
				select {
				case <-time.After(delay):
				case <-ctx.Done():
					return
				}
				continue
			}
			fail(fmt.Errorf("dns proxy: accept tcp: %w", err))
			return
		}
		delay = 0
		select {
		case p.tcpSlots <- struct{}{}:
		default:
			p.metrics.tcpRefused.Add(context.Background(), 1)
			_ = c.SetLinger(0)
			_ = c.Close()
			continue
		}
		wg.Go(func() { p.serveTCP(ctx, c) })
	}
}

// serveTCP reads queries from one client connection until it closes,
// idles for TCPIdleTimeout, breaks the framing, or the proxy stops.
// Answers from the table are written in order; forwarded ones whenever
// they come back (RFC 7766 allows it: the ID matches them up). It gives
// back the connection's token of p.tcpSlots before closing it, so a
// client that sees the close can connect again.
func (p *Proxy) serveTCP(ctx context.Context, c *net.TCPConn) {
	p.metrics.tcpConns.Add(context.Background(), 1)
	defer p.metrics.tcpConns.Add(context.Background(), -1)
	var inflight sync.WaitGroup
	done := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(done)
		_ = c.Close()
	})
	defer func() {
		inflight.Wait()
		<-p.tcpSlots
		_ = c.Close()
		if !stop() {
			<-done
		}
	}()

	// wmu serializes answers on the connection.
	var wmu sync.Mutex
	write := func(b []byte) error {
		wmu.Lock()
		defer wmu.Unlock()
		msg := make([]byte, 2+len(b))
		binary.BigEndian.PutUint16(msg, uint16(len(b)))
		copy(msg[2:], b)
		_ = c.SetWriteDeadline(time.Now().Add(p.cfg.IOTimeout))
		_, err := c.Write(msg)
		return err
	}
	pipeline := make(chan struct{}, maxPipelined)
	var length [2]byte
	out := make([]byte, 0, 4096)
	for {
		_ = c.SetReadDeadline(time.Now().Add(p.cfg.TCPIdleTimeout))
		if _, err := io.ReadFull(c, length[:]); err != nil {
			return
		}
		n := binary.BigEndian.Uint16(length[:])
		if n < headerLen {
			// Not a DNS message, and nothing to answer: the framing
			// cannot be trusted any further.
			p.metrics.query(resultMalformed, tcp)
			return
		}
		raw := make([]byte, n) // owned by this query: forwards keep it
		_ = c.SetReadDeadline(time.Now().Add(p.cfg.IOTimeout))
		if _, err := io.ReadFull(c, raw); err != nil {
			return
		}
		resp, fwd, res := p.answer(raw, tcp, out)
		if fwd != nil {
			select {
			case pipeline <- struct{}{}:
			case <-ctx.Done():
				return
			}
			select {
			case p.forwards <- struct{}{}:
			default:
				<-pipeline
				p.metrics.fail(failOverload)
				resp, res = p.servFail(fwd, 0, "too many queries upstream", out), resultServFail
				fwd = nil
			}
		}
		if fwd != nil {
			inflight.Go(func() {
				defer func() { <-pipeline }()
				p.forward(ctx, fwd, func(b []byte) {
					if write(b) != nil {
						_ = c.Close() // the reader sees it and ends the connection
					}
				})
			})
			continue
		}
		p.metrics.query(res, tcp)
		if resp != nil {
			if err := write(resp); err != nil {
				return
			}
		}
	}
}
