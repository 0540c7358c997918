package dns

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	mdns "github.com/miekg/dns"
)

// bufPool holds 64 KiB buffers for upstream answers: the largest DNS
// message, so no answer is ever cut short by the proxy's own buffer.
var bufPool = sync.Pool{New: func() any { b := make([]byte, mdns.MaxMsgSize); return &b }}

// errBadResponse marks an upstream answer that is not an answer to the
// query sent.
var errBadResponse = errors.New("answer does not match the query")

// forward sends r to the upstreams in order, over r's transport, until one
// answers, and hands send the answer for the client: the upstream's
// answer byte for byte (a truncated UDP answer included, so the client
// retries over TCP), or the proxy's SERVFAIL when no upstream gave one.
// An upstream's SERVFAIL or REFUSED moves on to the next upstream, as
// glibc's resolver does; the last one's is passed back. The query is
// counted before send is called, so the count is there once the client
// has its answer. The caller holds a token of p.forwards; forward gives
// it back before calling send, so a client that has its answer finds the
// slot free. send must not keep the slice.
func (p *Proxy) forward(ctx context.Context, r *request, send func([]byte)) {
	p.metrics.forwards.Add(context.Background(), 1)
	released := false
	release := func() {
		if !released {
			released = true
			p.metrics.forwards.Add(context.Background(), -1)
			<-p.forwards
		}
	}
	defer release()

	cur := bufPool.Get().(*[]byte)
	// cur changes hands with kept below: put back what it is at the end,
	// not what it was here (that one would go back twice).
	defer func() { bufPool.Put(cur) }()
	var kept *[]byte // holds the last SERVFAIL or REFUSED while the next upstream is tried
	defer func() {
		if kept != nil {
			bufPool.Put(kept)
		}
	}()
	var last []byte
	var lastErr error
	for i, up := range p.upstreams {
		if ctx.Err() != nil {
			break
		}
		resp, err := p.exchange(ctx, up, r, *cur)
		if err != nil {
			lastErr = err
			p.metrics.fail(classify(err))
			p.log.Debug("upstream attempt failed", "upstream", up.String(), "protocol", r.proto.String(), "error", err)
			continue
		}
		if rc := resp[3] & 0x0f; (rc == mdns.RcodeServerFailure || rc == mdns.RcodeRefused) && i < len(p.upstreams)-1 {
			p.metrics.fail(failRcode)
			p.log.Debug("upstream refused or failed, trying the next", "upstream", up.String(), "rcode", mdns.RcodeToString[int(rc)])
			last = resp
			cur, kept = p.swap(kept), cur
			continue
		}
		last = resp
		break
	}
	if last == nil {
		text := "no upstream answered"
		if lastErr != nil {
			text = lastErr.Error()
		}
		p.metrics.query(resultServFail, r.proto)
		release()
		send(p.servFail(r, mdns.ExtendedErrorCodeNoReachableAuthority, text, (*cur)[:0]))
		return
	}
	if r.proto == udp && len(last) > r.limit {
		// Upstream sent more than the client can take (it should have
		// truncated, given the client's own EDNS0 size): cut it down
		// here, TC set, rather than let the client lose it.
		var m mdns.Msg
		if err := m.Unpack(last); err != nil {
			p.metrics.fail(failBadResponse)
			p.metrics.query(resultServFail, r.proto)
			release()
			send(p.servFail(r, mdns.ExtendedErrorCodeInvalidData, "oversized upstream answer", nil))
			return
		}
		m.Truncate(r.limit)
		out, err := m.Pack()
		if err != nil {
			p.metrics.query(resultServFail, r.proto)
			release()
			send(p.servFail(r, mdns.ExtendedErrorCodeInvalidData, "oversized upstream answer", nil))
			return
		}
		last = out
	}
	p.metrics.query(resultForwarded, r.proto)
	release()
	send(last)
}

// swap returns a buffer for the next attempt: b if there is one (the
// answer it held is no longer wanted), a fresh one otherwise.
func (p *Proxy) swap(b *[]byte) *[]byte {
	if b != nil {
		return b
	}
	return bufPool.Get().(*[]byte)
}

// exchange is one attempt at one upstream, bounded by UpstreamTimeout and
// cut short when ctx ends. The answer is read into buf.
func (p *Proxy) exchange(ctx context.Context, up netip.AddrPort, r *request, buf []byte) (resp []byte, err error) {
	deadline := time.Now().Add(p.cfg.UpstreamTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	var c net.Conn
	if r.proto == tcp {
		d := net.Dialer{Deadline: deadline, KeepAlive: -1}
		c, err = d.DialContext(ctx, "tcp", up.String())
	} else {
		c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(up))
	}
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	defer c.Close()
	if err := c.SetDeadline(deadline); err != nil {
		return nil, err
	}
	// Shutdown must not wait out an upstream: ctx ending moves the
	// deadline to now. Waiting for the callback keeps it from outliving
	// the exchange.
	done := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(done)
		_ = c.SetDeadline(time.Now())
	})
	defer func() {
		if !stop() {
			<-done
		}
	}()

	if r.proto == tcp {
		return exchangeTCP(c, r, buf)
	}
	return exchangeUDP(c, r, buf)
}

func exchangeUDP(c net.Conn, r *request, buf []byte) ([]byte, error) {
	if _, err := c.Write(r.raw); err != nil {
		return nil, fmt.Errorf("send: %w", err)
	}
	// The socket is connected to the upstream, and its port is fresh for
	// this query; what does not match is dropped and the read goes on
	// until the deadline, so a stray datagram cannot answer for the
	// upstream.
	for {
		n, err := c.Read(buf)
		if err != nil {
			return nil, fmt.Errorf("receive: %w", err)
		}
		if err := matches(r, buf[:n]); err == nil {
			return buf[:n], nil
		}
	}
}

func exchangeTCP(c net.Conn, r *request, buf []byte) ([]byte, error) {
	msg := make([]byte, 2+len(r.raw))
	binary.BigEndian.PutUint16(msg, uint16(len(r.raw)))
	copy(msg[2:], r.raw)
	if _, err := c.Write(msg); err != nil {
		return nil, fmt.Errorf("send: %w", err)
	}
	if _, err := io.ReadFull(c, buf[:2]); err != nil {
		return nil, fmt.Errorf("receive: %w", err)
	}
	n := int(binary.BigEndian.Uint16(buf[:2]))
	if _, err := io.ReadFull(c, buf[:n]); err != nil {
		return nil, fmt.Errorf("receive: %w", err)
	}
	if err := matches(r, buf[:n]); err != nil {
		return nil, err
	}
	return buf[:n], nil
}

// matches checks that resp answers r: same ID, QR set, and the same
// opcode and question — or no question at all in an error answer, as
// servers send for queries they reject (CoreDNS, like miekg/dns, answers
// FORMERR with opcode QUERY whatever the query's was).
func matches(r *request, resp []byte) error {
	if len(resp) < headerLen {
		return fmt.Errorf("%w: %d bytes", errBadResponse, len(resp))
	}
	if resp[0] != r.raw[0] || resp[1] != r.raw[1] {
		return fmt.Errorf("%w: ID differs", errBadResponse)
	}
	if resp[2]&0x80 == 0 {
		return fmt.Errorf("%w: QR not set", errBadResponse)
	}
	rcode := resp[3] & 0x0f
	if binary.BigEndian.Uint16(resp[4:6]) == 0 && rcode != mdns.RcodeSuccess {
		return nil
	}
	if resp[2]&0x78 != r.raw[2]&0x78 {
		return fmt.Errorf("%w: not a response to this opcode", errBadResponse)
	}
	if len(r.msg.Question) == 0 {
		return nil
	}
	if binary.BigEndian.Uint16(resp[4:6]) == 0 {
		return fmt.Errorf("%w: no question in a NOERROR answer", errBadResponse)
	}
	name, off, err := mdns.UnpackDomainName(resp, headerLen)
	if err != nil || off+4 > len(resp) {
		return fmt.Errorf("%w: unreadable question", errBadResponse)
	}
	q := r.msg.Question[0]
	if !strings.EqualFold(name, q.Name) ||
		binary.BigEndian.Uint16(resp[off:]) != q.Qtype || binary.BigEndian.Uint16(resp[off+2:]) != q.Qclass {
		return fmt.Errorf("%w: question differs", errBadResponse)
	}
	return nil
}

// classify maps an attempt's error to its failure reason.
func classify(err error) failure {
	switch {
	case errors.Is(err, errBadResponse):
		return failBadResponse
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return failTimeout
	default:
		return failNetwork
	}
}
