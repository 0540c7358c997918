package dns

import (
	"context"
	"encoding/binary"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// serveDNS is the whole handling of one message, as the UDP and TCP
// loops do it, with the forward done in line: the fuzzer's entry point.
func (p *Proxy) serveDNS(ctx context.Context, raw []byte, proto protocol) []byte {
	resp, fwd, res := p.answer(raw, proto, make([]byte, 0, 512))
	if fwd == nil {
		p.metrics.query(res, proto)
		return resp
	}
	p.forwards <- struct{}{}
	var out []byte
	p.forward(ctx, fwd, func(b []byte) { out = append([]byte(nil), b...) })
	return out
}

// FuzzServeDNS feeds raw bytes to the handler, forwarding to a real
// upstream on loopback. Whatever the input: no panic; an answer, when
// there is one, is a parseable DNS response with the query's ID that
// fits the client's limit; and no name of the table ever reaches the
// upstream.
func FuzzServeDNS(f *testing.F) {
	seed := func(name string, qtype uint16, edit ...func(*mdns.Msg)) {
		m := new(mdns.Msg).SetQuestion(name, qtype)
		for _, e := range edit {
			e(m)
		}
		b, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, false)
		f.Add(b, true)
	}
	seed("foo.bar.svc.clusterset.local.", mdns.TypeA)
	seed("FOO.bar.svc.clusterset.local.", mdns.TypeAAAA, withEDNS)
	seed("foo.bar.svc.clusterset.local.ns1.svc.cluster.local.", mdns.TypeA)
	seed("nope.bar.svc.clusterset.local.", mdns.TypeA, func(m *mdns.Msg) { m.SetEdns0(4096, true) })
	seed("bar.svc.clusterset.local.", mdns.TypeTXT)
	seed("clusterset.local.", mdns.TypeSOA)
	seed("v6.example.com.", mdns.TypeANY)
	seed(upstreamName, mdns.TypeA, withEDNS)
	seed(bigName, mdns.TypeA)
	seed(refusedName, mdns.TypeA)
	seed("version.bind.", mdns.TypeTXT, func(m *mdns.Msg) { m.Question[0].Qclass = mdns.ClassCHAOS })
	seed("foo.bar.svc.clusterset.local.", mdns.TypeA, func(m *mdns.Msg) { m.SetEdns0(1232, false); m.IsEdns0().SetVersion(1) })
	seed("foo.bar.svc.clusterset.local.", mdns.TypeA, func(m *mdns.Msg) {
		m.Question = append(m.Question, mdns.Question{Name: upstreamName, Qtype: mdns.TypeA, Qclass: mdns.ClassINET})
	})
	notify := new(mdns.Msg).SetNotify("clusterset.local.")
	if b, err := notify.Pack(); err == nil {
		f.Add(b, false)
	}
	f.Add([]byte{}, false)
	f.Add([]byte{0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c, 0, 1, 0, 1}, false) // a name pointing at itself

	up := startUpstream(f)
	cfg := DefaultConfig()
	cfg.ListenAddr = "127.0.0.1:0"
	cfg.ResolvConf = ""
	cfg.Upstreams = []string{up.addr.String()}
	cfg.SearchDomains = []string{"ns1.svc.cluster.local", "svc.cluster.local", "cluster.local"}
	cfg.UpstreamTimeout = 100 * time.Millisecond
	p, err := New(cfg, Options{})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(p.close)
	if err := p.SetTable(testTable); err != nil {
		f.Fatal(err)
	}
	t, _ := newTable(testTable, 1, 5)

	f.Fuzz(func(tt *testing.T, raw []byte, overTCP bool) {
		proto := udp
		if overTCP {
			proto = tcp
		}
		resp := p.serveDNS(context.Background(), raw, proto)
		if len(raw) < headerLen || raw[2]&0x80 != 0 {
			if resp != nil {
				tt.Fatalf("answered a message that is no query: % x", resp)
			}
			return
		}
		if resp == nil {
			tt.Fatalf("no answer to a query")
		}
		var m mdns.Msg
		if err := m.Unpack(resp); err != nil {
			tt.Fatalf("answer does not parse: %v\n% x", err, resp)
		}
		if !m.Response || binary.BigEndian.Uint16(raw) != m.Id {
			tt.Fatalf("answer %v is not a response to ID %d", m.MsgHdr, binary.BigEndian.Uint16(raw))
		}
		var q mdns.Msg
		if q.Unpack(raw) == nil && proto == udp {
			limit := mdns.MinMsgSize
			if opt := q.IsEdns0(); opt != nil {
				limit = max(limit, int(opt.UDPSize()))
			}
			if len(resp) > limit {
				tt.Fatalf("%d-byte answer over a %d-byte limit", len(resp), limit)
			}
		}
		for _, s := range up.drain() {
			for _, uq := range s.msg.Question {
				if _, ok := t.hosts[mdns.CanonicalName(uq.Name)]; ok && (uq.Qclass == mdns.ClassINET || uq.Qclass == mdns.ClassANY) {
					tt.Fatalf("table name %q reached the upstream", uq.Name)
				}
			}
		}
	})
}
