package dns

import (
	"strings"

	mdns "github.com/miekg/dns"
)

const (
	headerLen = 12
	// ourUDPSize is the EDNS0 payload size the proxy advertises in its
	// own answers (the DNS flag day 2020 value).
	ourUDPSize = 1232
)

// request is one parsed query. Answers from the table are built from it
// on the reader's stack; a forwarded query keeps one on the heap until its
// answer is sent.
type request struct {
	// raw is the client's message, sent upstream byte for byte: the ID,
	// the flags and the client's EDNS0 options arrive unchanged.
	raw   []byte
	msg   mdns.Msg
	opt   *mdns.OPT // msg's OPT record; nil without EDNS0
	proto protocol
	// limit is the largest answer the client accepts: 512 bytes over
	// UDP without EDNS0 (RFC 1035), its EDNS0 payload size with it, and
	// 65535 over TCP.
	limit int
}

// answer decides what to do with one message from a client. It returns
// either an answer to send now (from the table, or an error the proxy
// gives itself), or a request to forward upstream, or neither: a message
// that is not a query at all is dropped. buf is where the answer is built
// when it is large enough.
func (p *Proxy) answer(raw []byte, proto protocol, buf []byte) ([]byte, *request, result) {
	if len(raw) < headerLen {
		return nil, nil, resultMalformed // not even an ID to answer to
	}
	if raw[2]&0x80 != 0 {
		// A response: answering it could start a loop between two
		// resolvers, and nobody is waiting for an answer to it.
		return nil, nil, resultMalformed
	}
	var r request
	r.raw, r.proto = raw, proto
	if err := r.msg.Unpack(raw); err != nil {
		return headerOnly(raw, mdns.RcodeFormatError, buf), nil, resultMalformed
	}
	var opts int
	for _, rr := range r.msg.Extra {
		if o, ok := rr.(*mdns.OPT); ok {
			r.opt = o
			opts++
		}
	}
	if opts > 1 { // RFC 6891 §6.1.1
		return headerOnly(raw, mdns.RcodeFormatError, buf), nil, resultMalformed
	}
	switch {
	case proto == tcp:
		r.limit = mdns.MaxMsgSize
	case r.opt != nil && r.opt.UDPSize() > mdns.MinMsgSize:
		r.limit = int(r.opt.UDPSize())
	default:
		r.limit = mdns.MinMsgSize
	}

	if r.msg.Opcode != mdns.OpcodeQuery {
		// NOTIFY, UPDATE, DSO and the rest have no business coming
		// from a workload (the cluster DNS would refuse them too), and
		// forwarding them would carry table names upstream.
		return p.reply(&r, mdns.RcodeNotImplemented, false, nil, nil, nil, buf), nil, resultAnswered
	}
	// Queries the proxy cannot place (no question — a DNS cookie probe
	// —, a class other than IN) are the cluster DNS's business.
	if len(r.msg.Question) == 0 {
		return nil, r.forward(), resultNone
	}
	if len(r.msg.Question) > 1 {
		// No server answers several questions; refusing keeps a table
		// name from reaching upstream beside another.
		return headerOnly(raw, mdns.RcodeFormatError, buf), nil, resultMalformed
	}
	q := r.msg.Question[0]
	if q.Qclass != mdns.ClassINET && q.Qclass != mdns.ClassANY {
		return nil, r.forward(), resultNone
	}
	if r.opt != nil && r.opt.Version() != 0 {
		// RFC 6891 §6.1.3; upstream would answer the same, but a table
		// name never goes there and this costs nothing.
		return p.reply(&r, mdns.RcodeBadVers, false, nil, nil, nil, buf), nil, resultAnswered
	}

	name := strings.ToLower(q.Name)
	t := p.table.Load()
	if t != nil {
		if e, ok := t.hosts[name]; ok {
			return p.hostAnswer(&r, t, name, e, buf), nil, resultAnswered
		}
	}
	if inZone(name, ClustersetZone) {
		switch {
		case t == nil:
			// Before the first table every name is unknown, not absent:
			// SERVFAIL makes the client try again rather than cache a
			// denial.
			return p.reply(&r, mdns.RcodeServerFailure, false, nil, nil,
				&mdns.EDNS0_EDE{InfoCode: mdns.ExtendedErrorCodeNotReady, ExtraText: "no service table yet"}, buf), nil, resultServFail
		case name == ClustersetZone && (q.Qtype == mdns.TypeSOA || q.Qtype == mdns.TypeANY):
			return p.reply(&r, mdns.RcodeSuccess, true, t.soa, nil, nil, buf), nil, resultAnswered
		}
		if _, ent := t.ents[name]; ent || name == ClustersetZone {
			return p.reply(&r, mdns.RcodeSuccess, true, nil, t.soa, nil, buf), nil, resultAnswered
		}
		return p.reply(&r, mdns.RcodeNameError, true, nil, t.soa, nil, buf), nil, resultNXDomain
	}
	// A search-path expansion of a known name, as a pod's resolver makes
	// with ndots:5 before it tries the name itself: it cannot exist, and
	// asking the cluster DNS would cost a round trip per search domain.
	for _, s := range p.search {
		if !under(name, s) {
			continue
		}
		base := name[:len(name)-len(s)]
		if _, known := t.lookup(base); known || inZone(base, ClustersetZone) {
			return p.reply(&r, mdns.RcodeNameError, true, nil, nil, nil, buf), nil, resultNXDomain
		}
	}
	return nil, r.forward(), resultNone
}

// forward moves r to the heap for the trip upstream.
func (r *request) forward() *request {
	f := new(request)
	*f = *r
	return f
}

// lookup is hosts[name] on a table that may be nil.
func (t *table) lookup(name string) (entry, bool) {
	if t == nil {
		return entry{}, false
	}
	e, ok := t.hosts[name]
	return e, ok
}

// hostAnswer answers for a name in the table, whatever the type: its
// address for A (or AAAA, for an IPv6 VIP) and ANY, NODATA otherwise —
// never NXDOMAIN, which would deny the other type too.
func (p *Proxy) hostAnswer(r *request, t *table, name string, e entry, buf []byte) []byte {
	q := r.msg.Question[0]
	hdr := mdns.RR_Header{Name: q.Name, Class: mdns.ClassINET, Ttl: p.ttl}
	var rr mdns.RR
	switch {
	case e.addr.Is4() && (q.Qtype == mdns.TypeA || q.Qtype == mdns.TypeANY):
		hdr.Rrtype = mdns.TypeA
		rr = &mdns.A{Hdr: hdr, A: e.ip}
	case e.addr.Is6() && (q.Qtype == mdns.TypeAAAA || q.Qtype == mdns.TypeANY):
		hdr.Rrtype = mdns.TypeAAAA
		rr = &mdns.AAAA{Hdr: hdr, AAAA: e.ip}
	}
	var soa mdns.RR
	if rr == nil && under(name, ClustersetZone) {
		soa = t.soa
	}
	return p.reply(r, mdns.RcodeSuccess, true, rr, soa, nil, buf)
}

// reply builds the proxy's own answer to r, at most r.limit bytes (the
// answer's records are dropped and TC set if they do not fit). With
// EDNS0 in the query, the answer carries an OPT record with the DO bit
// copied (RFC 3225) and, for errors, an extended error (RFC 8914) saying
// why.
func (p *Proxy) reply(r *request, rcode int, authoritative bool, answer, authority mdns.RR, ede *mdns.EDNS0_EDE, buf []byte) []byte {
	var m mdns.Msg
	m.SetReply(&r.msg)
	m.Rcode = rcode
	m.Authoritative = authoritative
	// The proxy recurses, through its upstreams; Go's resolver, for one,
	// takes an answer with neither AA nor RA for a lame referral.
	m.RecursionAvailable = true
	if answer != nil {
		m.Answer = []mdns.RR{answer}
	}
	if authority != nil {
		m.Ns = []mdns.RR{authority}
	}
	if r.opt != nil {
		o := &mdns.OPT{Hdr: mdns.RR_Header{Name: ".", Rrtype: mdns.TypeOPT}}
		o.SetUDPSize(ourUDPSize)
		o.SetDo(r.opt.Do())
		if ede != nil {
			o.Option = []mdns.EDNS0{ede}
		}
		m.Extra = []mdns.RR{o}
	}
	m.Truncate(r.limit)
	out, err := m.PackBuffer(buf[:cap(buf)])
	if err != nil {
		// Only a name the parser accepted but the packer refuses gets
		// here; the client still learns the query failed.
		return headerOnly(r.raw, mdns.RcodeServerFailure, buf)
	}
	return out
}

// headerOnly answers raw with a bare header: its ID, opcode and RD bit,
// QR and RA set, no records. It is the answer to a message too broken to
// echo anything else (RFC 1035 FORMERR), built from bytes alone.
func headerOnly(raw []byte, rcode int, buf []byte) []byte {
	out := append(buf[:0], raw[:headerLen]...)
	out[2] = 0x80 | raw[2]&0x79 // QR; opcode and RD copied; AA, TC cleared
	out[3] = 0x80 | byte(rcode&0x0f)
	clear(out[4:headerLen])
	return out
}

// servFail is the proxy's SERVFAIL for a request it could not forward.
func (p *Proxy) servFail(r *request, code uint16, text string, buf []byte) []byte {
	return p.reply(r, mdns.RcodeServerFailure, false, nil, nil, &mdns.EDNS0_EDE{InfoCode: code, ExtraText: text}, buf)
}
