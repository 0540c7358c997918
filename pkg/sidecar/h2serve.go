package sidecar

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"slices"
	"time"

	"golang.org/x/net/http2"
)

// h2Preface is what the HTTP/1.1 path reads as a request head when a
// connection opens with HTTP/2's client preface.
const h2Preface = "PRI * HTTP/2.0\r\n\r\n"

// isH2Preface reports whether the bytes a connection opened with are the
// start of HTTP/2's client preface.
func isH2Preface(b []byte) bool {
	return bytes.HasPrefix(b, []byte(h2Preface))
}

// serveH2 serves a downstream HTTP/2 connection until it closes; c
// replays the bytes already read. It runs on the connection's goroutine.
func (p *Proxy) serveH2(c net.Conn, info *connInfo) {
	defer p.releaseHTTP(info)
	hc := newH2Conn(p, c, false)
	hc.info = info
	hc.xfcc = xfccFields(info)
	hc.w, hc.tc = h2Writer(c)
	hc.startReader(c)
	p.h2Mu.Lock()
	p.h2Conns[hc] = struct{}{}
	p.h2Mu.Unlock()
	defer func() {
		p.h2Mu.Lock()
		delete(p.h2Conns, hc)
		p.h2Mu.Unlock()
	}()

	_ = c.SetReadDeadline(time.Now().Add(p.cfg.ReadHeaderTimeout))
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(hc.br, preface); err != nil || string(preface) != http2.ClientPreface {
		_ = c.Close()
		return
	}
	hc.greet()
	go hc.writeLoop()
	if p.draining.Load() {
		hc.goAwayNow()
	}
	err := hc.readLoop()
	hc.shut()
	<-hc.writerDone
	_ = c.Close()
	hc.failStreams(err)
}

// goAwayNow tells the peer the connection takes no new stream, and
// closes it once its streams ended: the drain.
func (hc *h2Conn) goAwayNow() {
	hc.mu.Lock()
	if !hc.goAway && !hc.closed {
		hc.goAway = true
		hc.out = appendGoAway(hc.out, hc.goAwayID(), http2.ErrCodeNo)
		hc.kick()
	}
	hc.mu.Unlock()
	hc.closeIfDone()
}

// h2GoAwayAll starts the drain of the HTTP/2 downstream connections.
func (p *Proxy) h2GoAwayAll() {
	p.h2Mu.Lock()
	conns := make([]*h2Conn, 0, len(p.h2Conns))
	for hc := range p.h2Conns {
		conns = append(conns, hc)
	}
	p.h2Mu.Unlock()
	for _, hc := range conns {
		hc.goAwayNow()
	}
}

// h2CutAll closes the HTTP/2 downstream connections left when the drain
// timeout passed.
func (p *Proxy) h2CutAll() int {
	p.h2Mu.Lock()
	defer p.h2Mu.Unlock()
	for hc := range p.h2Conns {
		hc.shut()
		_ = hc.c.Close()
	}
	return len(p.h2Conns)
}

// h2Attach opens stream s to endpoint ep on a connection of the pool
// that has room, or queues it on a new one being dialled. s.mu held.
func (pl *pool) h2Attach(s *h2Stream, ep netip.AddrPort) error {
	pl.h2mu.Lock()
	conns := pl.h2conns[ep]
	var retired []retiredConn
	defer func() {
		for _, r := range retired {
			pl.p.log.Info("retiring an upstream HTTP/2 connection on which most streams were reset soon after they opened: new streams go to another",
				"cluster", pl.cluster, "endpoint", ep.String(), "streams", r.opened, "resets", r.resets)
		}
	}()
	for _, c := range conns {
		c.mu.Lock()
		if c.closed || c.goAway || c.reserved >= c.peerMaxStreams || c.nextID >= 1<<31-1 {
			c.mu.Unlock()
			continue
		}
		if c.resetsCouldTrip() {
			// Its streams go on; new ones go elsewhere. Idle, it closes
			// when its idle timer fires.
			c.goAway = true
			retired = append(retired, retiredConn{c.opened, c.premature.Load()})
			c.mu.Unlock()
			continue
		}
		c.reserved++
		if c.idle != nil {
			c.idle.Stop()
		}
		if !c.ready {
			c.waiting = append(c.waiting, s)
			s.waitingOn = c
			c.mu.Unlock()
			pl.h2mu.Unlock()
			return nil
		}
		c.mu.Unlock()
		pl.h2mu.Unlock()
		return c.open(s)
	}
	if !pl.p.upstreams.enter() {
		pl.h2mu.Unlock()
		return errors.New("sidecar: stopping")
	}
	c := newH2Conn(pl.p, nil, true)
	c.pool, c.ep = pl, ep
	if len(conns) > 0 {
		// Until its own SETTINGS come, the new connection assumes the
		// stream limit of the newest one to ep (the endpoint's, or what
		// that one assumed in turn), not 100: an app that takes one
		// stream at a time would otherwise refuse all but one of the
		// streams queued on each new connection, and a burst would run
		// out of attempts. A 0 (none for now) is not a limit to assume.
		newest := conns[len(conns)-1]
		newest.mu.Lock()
		if n := newest.peerMaxStreams; n > 0 {
			c.peerMaxStreams = n
		}
		newest.mu.Unlock()
	}
	c.reserved = 1
	c.waiting = []*h2Stream{s}
	s.waitingOn = c
	if pl.h2conns == nil {
		pl.h2conns = map[netip.AddrPort][]*h2Conn{}
	}
	pl.h2conns[ep] = append(pl.h2conns[ep], c)
	pl.conns.Add(1)
	pl.h2mu.Unlock()
	go c.dialAndServe()
	return nil
}

// open sends s's request head on the connection, which reserved room
// for it. s.mu held.
func (c *h2Conn) open(s *h2Stream) error {
	c.mu.Lock()
	if c.closed || c.goAway {
		c.mu.Unlock()
		c.unreserve()
		return errH2Closed
	}
	id := c.nextID
	c.nextID += 2
	c.opened++
	c.streams[id] = s
	s.up, s.waitingOn, s.upGone, s.upBorn = c, nil, false, time.Now()
	s.toUp.dst, s.toUp.dstID, s.toUp.sendWin = c, id, c.peerInitWin
	s.toDown.src, s.toDown.srcID, s.toDown.recvWin, s.toDown.owed = c, id, h2StreamWindow, 0
	end := s.toUp.srcEnded && len(s.toUp.queue) == 0 && s.toUp.trailers == nil
	c.writeHeaders(id, s.fields, keepRequestField, s.down.xfcc, end)
	if end {
		s.toUp.dstEnded = true
	}
	c.mu.Unlock()
	s.wake(c)
	s.flush(&s.toUp)
	return nil
}

// countReset counts a reset of a stream the sidecar opened on upstream
// connection c at born, if it was young enough for the upstream to count
// it as premature (twice the upstream's lifetime: a stream is younger
// there, by the time its HEADERS took to arrive). c.mu held.
func (c *h2Conn) countReset(born time.Time) {
	if time.Since(born) < 2*h2PrematureReset {
		c.premature.Add(1)
	}
}

// resetsCouldTrip reports whether one more stream on upstream connection
// c could get c closed by the upstream's rapid-reset rule (h2Conn.frame
// on the other side, Envoy's defaults): it could if that stream, every
// stream open or reserved on c, and every one before them that the
// sidecar reset young would make more than half of h2PrematureResets or
// more. Only the sidecar opens streams on c, so a connection never
// retired here is never closed for it: the resets a downstream causes
// (a client cancelling everything, or rapid-resetting until it is cut
// off) would otherwise cost every other caller on the connection its
// request. c.mu held.
func (c *h2Conn) resetsCouldTrip() bool {
	pending := int64(c.reserved - len(c.streams))
	opened := c.opened + pending + 1
	couldReset := c.premature.Load() + int64(c.reserved) + 1
	return opened >= h2PrematureResets && 2*couldReset > opened
}

// retiredConn is what the log says of a connection resetsCouldTrip
// retired.
type retiredConn struct{ opened, resets int64 }

// unreserve gives back room a stream reserved but did not use.
func (c *h2Conn) unreserve() {
	c.mu.Lock()
	c.reserved--
	idle := c.reserved == 0
	if idle && c.closeIdle {
		c.goAway = true
	}
	if idle && !c.goAway && c.ready && !c.closed {
		if c.idle == nil {
			c.idle = time.AfterFunc(c.p.cfg.UpstreamIdleTimeout, c.idleExpired)
		} else {
			c.idle.Reset(c.p.cfg.UpstreamIdleTimeout)
		}
	}
	closeNow := idle && c.goAway
	c.mu.Unlock()
	if closeNow {
		c.connError(http2.ErrCodeNo)
	}
}

// idleExpired closes an upstream connection unused for
// UpstreamIdleTimeout.
func (c *h2Conn) idleExpired() {
	pl := c.pool
	pl.h2mu.Lock()
	c.mu.Lock()
	expired := c.reserved == 0 && !c.closed
	if expired {
		c.goAway = true
	}
	c.mu.Unlock()
	pl.h2mu.Unlock()
	if expired {
		c.connError(http2.ErrCodeNo)
	}
}

// dialAndServe connects the upstream connection, opens the streams that
// waited for it, then reads its frames until it closes.
func (c *h2Conn) dialAndServe() {
	pl, p := c.pool, c.p
	defer p.upstreams.leave()
	defer pl.conns.Add(-1)
	defer pl.h2remove(c)
	conn, err := pl.dial(context.Background(), c.ep, pl.tlsH2)
	if err != nil {
		c.failStreams(err)
		return
	}
	if !pl.original {
		p.health.Restore(c.ep)
	}
	conn = withRawIO(conn)
	c.c = conn
	c.w, c.tc = h2Writer(conn)
	c.startReader(conn)
	c.greet()
	go c.writeLoop()
	c.mu.Lock()
	c.ready = true
	waiting := c.waiting
	c.waiting = nil
	c.mu.Unlock()
	for _, s := range waiting {
		s.lock(c) // c's reader, about to start, writes what this queues
		switch {
		case s.waitingOn != c:
		case s.toUp.dstEnded:
			s.waitingOn = nil
			c.unreserve()
		default:
			if err := c.open(s); err != nil {
				s.waitingOn = nil
				s.connectFailed(err)
			}
		}
		s.maybeDone()
		s.unlock()
	}
	err = c.readLoop()
	c.shut()
	<-c.writerDone
	_ = conn.Close()
	c.mu.Lock()
	if c.idle != nil {
		c.idle.Stop()
	}
	c.mu.Unlock()
	c.failStreams(err)
}

// h2remove takes a closed connection out of the pool.
func (pl *pool) h2remove(c *h2Conn) {
	pl.h2mu.Lock()
	defer pl.h2mu.Unlock()
	conns := pl.h2conns[c.ep]
	if i := slices.Index(conns, c); i >= 0 {
		conns = slices.Delete(conns, i, i+1)
	}
	if len(conns) == 0 {
		delete(pl.h2conns, c.ep)
	} else {
		pl.h2conns[c.ep] = conns
	}
}

// h2CloseIdle closes the pool's unused HTTP/2 connections, and has the
// others close after their last stream.
func (pl *pool) h2CloseIdle() {
	pl.h2mu.Lock()
	var all []*h2Conn
	for _, conns := range pl.h2conns {
		all = append(all, conns...)
	}
	pl.h2mu.Unlock()
	for _, c := range all {
		c.mu.Lock()
		idle := c.reserved == 0 && c.ready
		if c.ready {
			c.goAway = true
		} else {
			c.closeIdle = true // still dialling: the streams waiting for it go first
		}
		c.mu.Unlock()
		if idle {
			c.connError(http2.ErrCodeNo)
		}
	}
}
