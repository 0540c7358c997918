package dns

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func withEDNS(m *mdns.Msg) { m.SetEdns0(1232, false) }

// TestTableAnswers covers every answer the proxy gives on its own, over
// both transports, and checks that none of those names reached upstream.
func TestTableAnswers(t *testing.T) {
	type want struct {
		rcode  int
		answer string // the answer's address; "" for none
		soa    bool   // the zone's SOA in the authority section
	}
	cases := []struct {
		name  string
		qname string
		qtype uint16
		edns  bool
		want  want
	}{
		{"A of a clusterset service", "foo.bar.svc.clusterset.local.", mdns.TypeA, false, want{rcode: mdns.RcodeSuccess, answer: "240.240.1.1"}},
		{"names are case-insensitive", "FOO.Bar.SVC.clusterset.LOCAL.", mdns.TypeA, false, want{rcode: mdns.RcodeSuccess, answer: "240.240.1.1"}},
		{"table names are case-insensitive too", "baz.bar.svc.clusterset.local.", mdns.TypeA, true, want{rcode: mdns.RcodeSuccess, answer: "240.240.1.2"}},
		{"AAAA of a clusterset service is NODATA", "foo.bar.svc.clusterset.local.", mdns.TypeAAAA, false, want{rcode: mdns.RcodeSuccess, soa: true}},
		{"any other type is NODATA", "foo.bar.svc.clusterset.local.", mdns.TypeMX, true, want{rcode: mdns.RcodeSuccess, soa: true}},
		{"ANY gets the address", "foo.bar.svc.clusterset.local.", mdns.TypeANY, false, want{rcode: mdns.RcodeSuccess, answer: "240.240.1.1"}},
		{"ServiceEntry host outside the zone", "api.example.com.", mdns.TypeA, false, want{rcode: mdns.RcodeSuccess, answer: "240.240.9.9"}},
		{"its AAAA is NODATA without SOA", "api.example.com.", mdns.TypeAAAA, false, want{rcode: mdns.RcodeSuccess}},
		{"IPv6 VIP answers AAAA", "v6.example.com.", mdns.TypeAAAA, false, want{rcode: mdns.RcodeSuccess, answer: "fd00::1"}},
		{"IPv6 VIP: A is NODATA", "v6.example.com.", mdns.TypeA, false, want{rcode: mdns.RcodeSuccess}},
		{"unknown clusterset service", "nope.bar.svc.clusterset.local.", mdns.TypeA, false, want{rcode: mdns.RcodeNameError, soa: true}},
		{"unknown clusterset namespace", "foo.other.svc.clusterset.local.", mdns.TypeAAAA, true, want{rcode: mdns.RcodeNameError, soa: true}},
		{"empty non-terminal is NODATA", "bar.svc.clusterset.local.", mdns.TypeA, false, want{rcode: mdns.RcodeSuccess, soa: true}},
		{"zone apex SOA", "clusterset.local.", mdns.TypeSOA, false, want{rcode: mdns.RcodeSuccess}},
		{"zone apex A is NODATA", "clusterset.local.", mdns.TypeA, false, want{rcode: mdns.RcodeSuccess, soa: true}},
		{"search expansion: namespace", "foo.bar.svc.clusterset.local.ns1.svc.cluster.local.", mdns.TypeA, false, want{rcode: mdns.RcodeNameError}},
		{"search expansion: svc", "foo.bar.svc.clusterset.local.svc.cluster.local.", mdns.TypeAAAA, false, want{rcode: mdns.RcodeNameError}},
		{"search expansion: cluster", "FOO.bar.svc.clusterset.local.cluster.local.", mdns.TypeA, true, want{rcode: mdns.RcodeNameError}},
		{"search expansion of a ServiceEntry host", "api.example.com.ns1.svc.cluster.local.", mdns.TypeA, false, want{rcode: mdns.RcodeNameError}},
		{"search expansion of an unknown clusterset name", "nope.bar.svc.clusterset.local.svc.cluster.local.", mdns.TypeA, false, want{rcode: mdns.RcodeNameError}},
	}
	f := start(t)
	require.NoError(t, f.p.SetTable(testTable))
	for _, proto := range []string{"udp", "tcp"} {
		for _, tc := range cases {
			t.Run(proto+"/"+tc.name, func(t *testing.T) {
				var edit []func(*mdns.Msg)
				if tc.edns {
					edit = append(edit, withEDNS)
				}
				r := f.ask(proto, tc.qname, tc.qtype, edit...)
				assert.Equal(t, mdns.RcodeToString[tc.want.rcode], mdns.RcodeToString[r.Rcode])
				assert.True(t, r.Authoritative, "AA")
				assert.True(t, r.RecursionAvailable, "RA")
				assert.False(t, r.Truncated, "TC")
				require.Len(t, r.Question, 1)
				assert.Equal(t, tc.qname, r.Question[0].Name, "question echoed as asked")
				var got string
				for _, rr := range r.Answer {
					assert.Equal(t, tc.qname, rr.Header().Name)
					switch rr := rr.(type) {
					case *mdns.A:
						got = rr.A.String()
						assert.EqualValues(t, 30, rr.Hdr.Ttl)
					case *mdns.AAAA:
						got = rr.AAAA.String()
						assert.EqualValues(t, 30, rr.Hdr.Ttl)
					case *mdns.SOA:
						assert.Equal(t, ClustersetZone, rr.Hdr.Name)
					default:
						t.Errorf("unexpected answer %v", rr)
					}
				}
				if tc.qtype != mdns.TypeSOA {
					assert.Equal(t, tc.want.answer, got)
				} else {
					assert.Len(t, r.Answer, 1)
				}
				if tc.want.soa {
					require.Len(t, r.Ns, 1)
					soa, ok := r.Ns[0].(*mdns.SOA)
					require.True(t, ok, "authority %v", r.Ns[0])
					assert.Equal(t, ClustersetZone, soa.Hdr.Name)
					assert.EqualValues(t, 5, soa.Minttl, "negative TTL")
				} else {
					assert.Empty(t, r.Ns)
				}
				assert.Equal(t, tc.edns, r.IsEdns0() != nil, "OPT in the answer when, and only when, the query had one")
				assert.Zero(t, f.up.asked(tc.qname), "a name the proxy answers never goes upstream")
			})
		}
	}
	assert.Empty(t, f.up.queries(), "nothing went upstream")
	assert.EqualValues(t, 2*7, f.counter("isthmus_dns_queries", "result=nxdomain"))
	assert.EqualValues(t, 2*13, f.counter("isthmus_dns_queries", "result=answered"))
	assert.EqualValues(t, 13, f.counter("isthmus_dns_queries", "result=answered", "protocol=tcp"))
	assert.EqualValues(t, 4, f.counter("isthmus_dns_table_names"))
}

// TestForwarding: names that are not the proxy's go to the upstream over
// the client's transport, and its answer comes back with the client's ID;
// the client's EDNS0 options reach the upstream unchanged.
func TestForwarding(t *testing.T) {
	f := start(t)
	require.NoError(t, f.p.SetTable(testTable))
	for _, proto := range []string{"udp", "tcp"} {
		t.Run(proto, func(t *testing.T) {
			cookie := &mdns.EDNS0_COOKIE{Code: mdns.EDNS0COOKIE, Cookie: "0102030405060708"}
			r := f.ask(proto, "WWW.example.", mdns.TypeA, func(m *mdns.Msg) {
				m.Id = 0xbeef
				m.SetEdns0(4000, true)
				opt := m.IsEdns0()
				opt.Option = append(opt.Option, cookie)
			})
			assert.EqualValues(t, 0xbeef, r.Id)
			assert.Equal(t, mdns.RcodeSuccess, r.Rcode)
			assert.False(t, r.Authoritative, "the upstream's answer, not the proxy's")
			require.Len(t, r.Answer, 1)
			assert.Equal(t, upstreamAddr.String(), r.Answer[0].(*mdns.A).A.String())

			var seen []seenQuery
			for _, q := range f.up.queries() {
				if q.name() == upstreamName && q.msg.Id == 0xbeef && q.proto == proto {
					seen = append(seen, q)
				}
			}
			require.Len(t, seen, 1, "one query upstream, same ID, same transport")
			opt := seen[0].msg.IsEdns0()
			require.NotNil(t, opt, "EDNS0 forwarded")
			assert.EqualValues(t, 4000, opt.UDPSize())
			assert.True(t, opt.Do())
			require.Len(t, opt.Option, 1)
			assert.Equal(t, cookie.Cookie, opt.Option[0].(*mdns.EDNS0_COOKIE).Cookie)
			assert.Equal(t, "WWW.example.", seen[0].msg.Question[0].Name, "the question as the client wrote it")

			// The upstream's NXDOMAIN is passed back as it is.
			r = f.ask(proto, "nothing.example.", mdns.TypeA)
			assert.Equal(t, mdns.RcodeNameError, r.Rcode)
			assert.Equal(t, 1, f.up.askedOver("nothing.example.", proto))

			// A search expansion of a name the proxy does not know is
			// the cluster DNS's.
			r = f.ask(proto, "kubernetes.default.ns1.svc.cluster.local.", mdns.TypeA)
			assert.Equal(t, mdns.RcodeNameError, r.Rcode)
			assert.Positive(t, f.up.asked("kubernetes.default.ns1.svc.cluster.local."))
		})
	}
	assert.EqualValues(t, 6, f.counter("isthmus_dns_queries", "result=forwarded"))
	assert.EqualValues(t, 3, f.counter("isthmus_dns_queries", "result=forwarded", "protocol=tcp"))
}

// TestTruncationFallsBackToTCP: an answer too large for UDP reaches the
// client truncated, and the client's retry over TCP is forwarded over TCP
// and gets it whole. Go's own resolver plays the client.
func TestTruncationFallsBackToTCP(t *testing.T) {
	f := start(t)

	r := f.ask("udp", bigName, mdns.TypeA)
	assert.True(t, r.Truncated, "TC passed back")
	assert.Less(t, len(r.Answer), bigCount)

	var dials []string
	var mu sync.Mutex
	res := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		mu.Lock()
		dials = append(dials, network)
		mu.Unlock()
		var d net.Dialer
		return d.DialContext(ctx, network, f.p.Addr().String())
	}}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	addrs, err := res.LookupNetIP(ctx, "ip4", bigName)
	require.NoError(t, err)
	assert.Len(t, addrs, bigCount, "the whole answer, over TCP")
	mu.Lock()
	assert.Contains(t, dials, "udp")
	assert.Contains(t, dials, "tcp")
	mu.Unlock()

	var protos []string
	for _, q := range f.up.queries() {
		if q.name() == bigName && q.msg.Question[0].Qtype == mdns.TypeA {
			protos = append(protos, q.proto)
		}
	}
	assert.Contains(t, protos, "udp")
	assert.Contains(t, protos, "tcp")
}

// TestUpstreamFailures: no answer, a dead upstream, or a refusal from
// every upstream ends in an answer to the client — SERVFAIL when nobody
// answered — and upstreams are tried in order.
func TestUpstreamFailures(t *testing.T) {
	t.Run("timeout gives SERVFAIL", func(t *testing.T) {
		f := start(t, func(c *Config) { c.UpstreamTimeout = 200 * time.Millisecond })
		for _, proto := range []string{"udp", "tcp"} {
			r := f.ask(proto, slowName, mdns.TypeA, withEDNS)
			assert.Equal(t, mdns.RcodeServerFailure, r.Rcode, proto)
			assert.False(t, r.Authoritative)
			opt := r.IsEdns0()
			require.NotNil(t, opt)
			require.Len(t, opt.Option, 1)
			ede := opt.Option[0].(*mdns.EDNS0_EDE)
			assert.Equal(t, mdns.ExtendedErrorCodeNoReachableAuthority, ede.InfoCode)
			assert.Contains(t, ede.ExtraText, "timeout")
		}
		assert.EqualValues(t, 2, f.counter("isthmus_dns_queries", "result=servfail"))
		assert.EqualValues(t, 2, f.counter("isthmus_dns_forward_failures", "reason=timeout"))
	})
	t.Run("dead upstream then a live one", func(t *testing.T) {
		var f *fixture
		dead := deadAddr(t)
		f = start(t, func(c *Config) { c.Upstreams = append([]string{dead.String()}, c.Upstreams...) })
		for _, proto := range []string{"udp", "tcp"} {
			r := f.ask(proto, upstreamName, mdns.TypeA)
			assert.Equal(t, mdns.RcodeSuccess, r.Rcode, proto)
			require.Len(t, r.Answer, 1)
		}
		assert.Equal(t, 2, f.up.asked(upstreamName))
		assert.EqualValues(t, 2, f.counter("isthmus_dns_forward_failures", "reason=network"))
		assert.EqualValues(t, 2, f.counter("isthmus_dns_queries", "result=forwarded"))
	})
	t.Run("only dead upstreams", func(t *testing.T) {
		f := start(t, func(c *Config) { c.Upstreams = []string{deadAddr(t).String()} })
		for _, proto := range []string{"udp", "tcp"} {
			r := f.ask(proto, upstreamName, mdns.TypeA)
			assert.Equal(t, mdns.RcodeServerFailure, r.Rcode, proto)
		}
	})
	t.Run("REFUSED moves on, the last one is passed back", func(t *testing.T) {
		second := startUpstream(t)
		f := start(t, func(c *Config) { c.Upstreams = append(c.Upstreams, second.addr.String()) })
		r := f.ask("udp", refusedName, mdns.TypeA)
		assert.Equal(t, mdns.RcodeRefused, r.Rcode)
		assert.Equal(t, 1, f.up.asked(refusedName))
		assert.Equal(t, 1, second.asked(refusedName), "the second upstream was tried")
		assert.EqualValues(t, 1, f.counter("isthmus_dns_forward_failures", "reason=rcode"))
		assert.EqualValues(t, 1, f.counter("isthmus_dns_queries", "result=forwarded"))
		// The buffers went back to the pool once each: two forwards at
		// once never share one (they did, and raced, when the answer
		// kept while the next upstream was tried went back twice).
		a, b := bufPool.Get().(*[]byte), bufPool.Get().(*[]byte)
		assert.NotSame(t, a, b, "a buffer was put back twice")
		bufPool.Put(a)
		bufPool.Put(b)
	})
	t.Run("a timeout then a live upstream", func(t *testing.T) {
		// The first upstream takes the query and never answers.
		silent, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		require.NoError(t, err)
		defer silent.Close()
		f := start(t, func(c *Config) {
			c.UpstreamTimeout = 200 * time.Millisecond
			c.Upstreams = append([]string{silent.LocalAddr().String()}, c.Upstreams...)
		})
		r := f.ask("udp", upstreamName, mdns.TypeA)
		assert.Equal(t, mdns.RcodeSuccess, r.Rcode)
		buf := make([]byte, 512)
		_ = silent.SetReadDeadline(time.Now().Add(time.Second))
		n, err := silent.Read(buf)
		require.NoError(t, err, "the first upstream was asked first")
		var m mdns.Msg
		require.NoError(t, m.Unpack(buf[:n]))
		assert.Equal(t, upstreamName, m.Question[0].Name)
	})
}

// TestSpoofedAnswerIgnored: a datagram that does not answer the query
// (wrong ID, wrong question) does not reach the client; the real answer
// after it does.
func TestSpoofedAnswerIgnored(t *testing.T) {
	fake, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	defer fake.Close()
	f := start(t, func(c *Config) { c.Upstreams = []string{fake.LocalAddr().String()} })
	go func() {
		buf := make([]byte, 512)
		n, from, err := fake.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		var q mdns.Msg
		if q.Unpack(buf[:n]) != nil {
			return
		}
		send := func(m *mdns.Msg) {
			b, _ := m.Pack()
			_, _ = fake.WriteToUDPAddrPort(b, from)
		}
		wrongID := new(mdns.Msg).SetReply(&q)
		wrongID.Id++
		send(wrongID)
		wrongQ := new(mdns.Msg).SetReply(&q)
		wrongQ.Question[0].Name = "evil.example."
		send(wrongQ)
		good := new(mdns.Msg).SetReply(&q)
		good.Answer = []mdns.RR{&mdns.A{Hdr: mdns.RR_Header{Name: q.Question[0].Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 5}, A: net.IPv4(192, 0, 2, 99)}}
		send(good)
	}()
	r := f.ask("udp", upstreamName, mdns.TypeA)
	require.Len(t, r.Answer, 1)
	assert.Equal(t, "192.0.2.99", r.Answer[0].(*mdns.A).A.String())
}

// TestTableSwap: SetTable takes effect at once, a bad table is refused
// whole and the last good one stays, and swaps under load never give a
// torn answer.
func TestTableSwap(t *testing.T) {
	f := start(t)
	const name = "foo.bar.svc.clusterset.local."

	r := f.ask("udp", name, mdns.TypeA)
	assert.Equal(t, mdns.RcodeServerFailure, r.Rcode, "no table yet: not ready, not NXDOMAIN")
	r = f.ask("udp", name, mdns.TypeA, withEDNS)
	assert.Equal(t, mdns.ExtendedErrorCodeNotReady, r.IsEdns0().Option[0].(*mdns.EDNS0_EDE).InfoCode)
	r = f.ask("udp", upstreamName, mdns.TypeA)
	assert.Equal(t, mdns.RcodeSuccess, r.Rcode, "other names are forwarded before the first table")

	require.NoError(t, f.p.SetTable(testTable))
	r = f.ask("udp", name, mdns.TypeA)
	require.Len(t, r.Answer, 1)
	assert.Equal(t, "240.240.1.1", r.Answer[0].(*mdns.A).A.String())

	require.NoError(t, f.p.SetTable(map[string]netip.Addr{name: netip.MustParseAddr("240.240.7.7")}))
	r = f.ask("tcp", name, mdns.TypeA)
	require.Len(t, r.Answer, 1)
	assert.Equal(t, "240.240.7.7", r.Answer[0].(*mdns.A).A.String())
	r = f.ask("udp", "baz.bar.svc.clusterset.local.", mdns.TypeA)
	assert.Equal(t, mdns.RcodeNameError, r.Rcode, "a removed name no longer resolves")

	err := f.p.SetTable(map[string]netip.Addr{
		"ok.bar.svc.clusterset.local": netip.MustParseAddr("240.240.8.8"),
		"*.example.com":               netip.MustParseAddr("240.240.8.9"),
		"bad..name":                   netip.MustParseAddr("240.240.8.10"),
		"zero.example.com":            netip.IPv4Unspecified(),
		"unset.example.com":           {},
		"Dup.example.com":             netip.MustParseAddr("240.240.8.11"),
		"dup.example.com.":            netip.MustParseAddr("240.240.8.12"),
		"localhost":                   netip.MustParseAddr("240.240.8.13"),
	})
	require.Error(t, err)
	for _, want := range []string{"*.example.com", "bad..name", "zero.example.com", "unset.example.com", "dup.example.com.", "localhost"} {
		assert.Contains(t, err.Error(), want)
	}
	r = f.ask("udp", "ok.bar.svc.clusterset.local.", mdns.TypeA)
	assert.Equal(t, mdns.RcodeNameError, r.Rcode, "a refused table is not installed in part")
	r = f.ask("udp", name, mdns.TypeA)
	require.Len(t, r.Answer, 1)
	assert.Equal(t, "240.240.7.7", r.Answer[0].(*mdns.A).A.String(), "the last good table stays")

	// Swaps racing queries: every answer is one table's or the other's.
	a := map[string]netip.Addr{name: netip.MustParseAddr("240.240.0.1")}
	b := map[string]netip.Addr{name: netip.MustParseAddr("240.240.0.2")}
	// One of them is in place before the first query: a query that
	// came before the swapping goroutine's first swap got the table
	// before, 240.240.7.7 (a CI run on a loaded machine did).
	require.NoError(t, f.p.SetTable(a))
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 1; ctx.Err() == nil; i++ {
			tbl := a
			if i%2 == 1 {
				tbl = b
			}
			if err := f.p.SetTable(tbl); err != nil {
				t.Error(err)
				return
			}
			time.Sleep(100 * time.Microsecond)
		}
	})
	for range 200 {
		r := f.ask("udp", name, mdns.TypeA)
		require.Len(t, r.Answer, 1)
		assert.Contains(t, []string{"240.240.0.1", "240.240.0.2"}, r.Answer[0].(*mdns.A).A.String())
	}
	cancel()
	wg.Wait()
	assert.Zero(t, f.up.asked(name))
}

// TestMalformed: garbage is dropped or answered FORMERR, counted, and the
// proxy keeps serving.
func TestMalformed(t *testing.T) {
	f := start(t)
	require.NoError(t, f.p.SetTable(testTable))
	c, err := net.Dial("udp", f.p.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	roundTrip := func(b []byte) ([]byte, error) {
		if _, err := c.Write(b); err != nil {
			return nil, err
		}
		_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		return buf[:n], err
	}

	_, err = roundTrip([]byte{1, 2, 3})
	assert.True(t, readTimeout(err), "shorter than a header: dropped, got %v", err)

	query, err := new(mdns.Msg).SetQuestion("foo.bar.svc.clusterset.local.", mdns.TypeA).Pack()
	require.NoError(t, err)
	resp := slices.Clone(query)
	resp[2] |= 0x80
	_, err = roundTrip(resp)
	assert.True(t, readTimeout(err), "a response is never answered, got %v", err)

	broken := slices.Clone(query[:len(query)-3]) // question cut short
	broken[0], broken[1] = 0x12, 0x34
	got, err := roundTrip(broken)
	require.NoError(t, err)
	var m mdns.Msg
	require.NoError(t, m.Unpack(got))
	assert.EqualValues(t, 0x1234, m.Id)
	assert.True(t, m.Response)
	assert.Equal(t, mdns.RcodeFormatError, m.Rcode)

	two := new(mdns.Msg).SetQuestion("foo.bar.svc.clusterset.local.", mdns.TypeA)
	two.Question = append(two.Question, mdns.Question{Name: upstreamName, Qtype: mdns.TypeA, Qclass: mdns.ClassINET})
	b, err := two.Pack()
	require.NoError(t, err)
	got, err = roundTrip(b)
	require.NoError(t, err)
	require.NoError(t, m.Unpack(got))
	assert.Equal(t, mdns.RcodeFormatError, m.Rcode, "two questions")
	assert.Zero(t, f.up.asked(upstreamName))

	// Over TCP: a bad message gets FORMERR and the connection goes on; a
	// length too short for a header ends it.
	tc, err := net.Dial("tcp", f.p.Addr().String())
	require.NoError(t, err)
	defer tc.Close()
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	writeFrame(t, tc, broken)
	require.NoError(t, m.Unpack(readFrame(t, tc)))
	assert.Equal(t, mdns.RcodeFormatError, m.Rcode)
	writeFrame(t, tc, query)
	require.NoError(t, m.Unpack(readFrame(t, tc)))
	assert.Equal(t, mdns.RcodeSuccess, m.Rcode)
	require.Len(t, m.Answer, 1)
	writeFrame(t, tc, []byte{1, 2, 3})
	_, err = tc.Read(make([]byte, 1))
	require.Error(t, err, "framing broken: connection closed")
	assert.False(t, readTimeout(err), "closed, not left open: %v", err)

	// A NOTIFY naming a table name: not a query, not forwarded.
	r := f.ask("udp", "foo.bar.svc.clusterset.local.", mdns.TypeSOA, func(m *mdns.Msg) { m.Opcode = mdns.OpcodeNotify })
	assert.Equal(t, mdns.RcodeNotImplemented, r.Rcode)
	assert.Equal(t, mdns.OpcodeNotify, r.Opcode)

	r = f.ask("udp", "foo.bar.svc.clusterset.local.", mdns.TypeA)
	assert.Len(t, r.Answer, 1, "still serving")
	assert.Empty(t, f.up.queries(), "nothing went upstream")
	assert.EqualValues(t, 6, f.counter("isthmus_dns_queries", "result=malformed"))
}

func writeFrame(tb testing.TB, c net.Conn, b []byte) {
	tb.Helper()
	frame := binary.BigEndian.AppendUint16(nil, uint16(len(b)))
	_, err := c.Write(append(frame, b...))
	require.NoError(tb, err)
}

func readFrame(tb testing.TB, c net.Conn) []byte {
	tb.Helper()
	var l [2]byte
	_, err := io.ReadFull(c, l[:])
	require.NoError(tb, err)
	b := make([]byte, binary.BigEndian.Uint16(l[:]))
	_, err = io.ReadFull(c, b)
	require.NoError(tb, err)
	return b
}

// TestTCPBounds: connections beyond the limit are closed, an idle one is
// closed after the idle timeout, and pipelined queries on one connection
// are all answered, a slow forward not holding up a table answer.
func TestTCPBounds(t *testing.T) {
	f := start(t, func(c *Config) {
		c.MaxTCPConnections = 2
		c.TCPIdleTimeout = 300 * time.Millisecond
		c.UpstreamTimeout = time.Second
	})
	require.NoError(t, f.p.SetTable(testTable))

	var held []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", f.p.Addr().String())
		require.NoError(t, err)
		defer c.Close()
		held = append(held, c)
	}
	// The proxy has the first two once it answers on them.
	q, _ := new(mdns.Msg).SetQuestion("foo.bar.svc.clusterset.local.", mdns.TypeA).Pack()
	for _, c := range held {
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		writeFrame(t, c, q)
		readFrame(t, c)
	}
	// The reset may come before connect returns, or after.
	third, err := net.Dial("tcp", f.p.Addr().String())
	if err == nil {
		defer third.Close()
		_ = third.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = third.Read(make([]byte, 1))
	}
	require.Error(t, err, "a third connection is closed at once")
	assert.False(t, readTimeout(err), "closed, not left hanging: %v", err)
	require.Eventually(t, func() bool { return f.counter("isthmus_dns_tcp_connections_refused") == 1 }, 5*time.Second, 10*time.Millisecond)

	// Idle: both held connections are closed by the proxy.
	for _, c := range held {
		_, err := c.Read(make([]byte, 1))
		assert.ErrorIs(t, err, io.EOF, "idle connection closed by the proxy")
	}

	// Pipelining: a slow forward, then a table name; the table answer
	// comes first, the SERVFAIL after the upstream timeout.
	c, err := net.Dial("tcp", f.p.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	slow := new(mdns.Msg).SetQuestion(slowName, mdns.TypeA)
	slow.Id = 1
	fast := new(mdns.Msg).SetQuestion("foo.bar.svc.clusterset.local.", mdns.TypeA)
	fast.Id = 2
	for _, m := range []*mdns.Msg{slow, fast} {
		b, err := m.Pack()
		require.NoError(t, err)
		writeFrame(t, c, b)
	}
	var ids []uint16
	for range 2 {
		var m mdns.Msg
		require.NoError(t, m.Unpack(readFrame(t, c)))
		ids = append(ids, m.Id)
		if m.Id == 1 {
			assert.Equal(t, mdns.RcodeServerFailure, m.Rcode)
		} else {
			assert.Equal(t, mdns.RcodeSuccess, m.Rcode)
		}
	}
	assert.Equal(t, []uint16{2, 1}, ids)
}

// TestForwardLimit: beyond MaxForwards a query gets SERVFAIL at once,
// while table answers go on.
func TestForwardLimit(t *testing.T) {
	f := start(t, func(c *Config) {
		c.MaxForwards = 1
		c.UpstreamTimeout = 3 * time.Second
	})
	require.NoError(t, f.p.SetTable(testTable))
	slowDone := make(chan *mdns.Msg, 1)
	go func() {
		r, _ := f.exchange("udp", slowName, mdns.TypeA)
		slowDone <- r
	}()
	require.Eventually(t, func() bool { return f.up.asked(slowName) == 1 }, 5*time.Second, 5*time.Millisecond)

	r := f.ask("udp", upstreamName, mdns.TypeA)
	assert.Equal(t, mdns.RcodeServerFailure, r.Rcode, "no forward slot")
	r = f.ask("tcp", upstreamName, mdns.TypeA)
	assert.Equal(t, mdns.RcodeServerFailure, r.Rcode, "no forward slot over TCP either")
	r = f.ask("udp", "foo.bar.svc.clusterset.local.", mdns.TypeA)
	assert.Len(t, r.Answer, 1, "the table needs no slot")
	assert.EqualValues(t, 2, f.counter("isthmus_dns_forward_failures", "reason=overload"))
	assert.Zero(t, f.up.asked(upstreamName))

	r = <-slowDone
	require.NotNil(t, r)
	assert.Equal(t, mdns.RcodeServerFailure, r.Rcode)
	r = f.ask("udp", upstreamName, mdns.TypeA)
	assert.Equal(t, mdns.RcodeSuccess, r.Rcode, "the slot is free again")
}

// TestRunStopsForwards: ending Run's context cuts short a query waiting on
// a silent upstream; Run does not wait out the upstream timeout.
func TestRunStopsForwards(t *testing.T) {
	up := startUpstream(t)
	cfg := DefaultConfig()
	cfg.ListenAddr = "127.0.0.1:0"
	cfg.ResolvConf = ""
	cfg.Upstreams = []string{up.addr.String()}
	cfg.UpstreamTimeout = time.Minute
	p, err := New(cfg, Options{})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	ran := make(chan error, 1)
	go func() { ran <- p.Run(ctx) }()

	q, err := new(mdns.Msg).SetQuestion(slowName, mdns.TypeA).Pack()
	require.NoError(t, err)
	uc, err := net.Dial("udp", p.Addr().String())
	require.NoError(t, err)
	defer uc.Close()
	_, err = uc.Write(q)
	require.NoError(t, err)
	tc, err := net.Dial("tcp", p.Addr().String())
	require.NoError(t, err)
	defer tc.Close()
	writeFrame(t, tc, q)
	require.Eventually(t, func() bool { return up.asked(slowName) == 2 }, 5*time.Second, 5*time.Millisecond)
	stopped := time.Now()
	cancel()
	select {
	case err := <-ran:
		require.NoError(t, err)
		t.Logf("Run returned %v after its context ended, with two forwards in flight", time.Since(stopped))
	case <-time.After(20 * time.Second):
		t.Fatal("Run waited for the upstream")
	}
	assert.Error(t, p.Run(context.Background()), "Run twice")
}

func TestNew(t *testing.T) {
	t.Run("resolv.conf gives upstreams and search list", func(t *testing.T) {
		cfg := DefaultConfig()
		cfg.ListenAddr = "127.0.0.1:0"
		cfg.ResolvConf = writeResolvConf(t, "nameserver fd00::a", "nameserver 10.96.0.11", "nameserver 10.96.0.12")
		p, err := New(cfg, Options{})
		require.NoError(t, err)
		defer p.close()
		assert.Equal(t, []netip.AddrPort{
			netip.MustParseAddrPort("10.96.0.10:53"), netip.MustParseAddrPort("[fd00::a]:53"), netip.MustParseAddrPort("10.96.0.11:53"),
		}, p.Upstreams(), "the first three, as glibc")
		assert.Equal(t, []string{"ns1.svc.cluster.local.", "svc.cluster.local.", "cluster.local."}, p.search)
		assert.NotZero(t, p.Addr().Port())
	})
	t.Run("errors", func(t *testing.T) {
		cfg := DefaultConfig()
		cfg.ResolvConf = "/nonexistent/resolv.conf"
		_, err := New(cfg, Options{})
		assert.ErrorContains(t, err, "/nonexistent/resolv.conf")

		cfg.ResolvConf = writeResolvConf(t, "nameserver kube-dns")
		_, err = New(cfg, Options{})
		assert.ErrorContains(t, err, `"kube-dns" is not an IP address`)

		// An upstream that is the proxy itself.
		pc, ln := listenPair(t)
		addr := pc.LocalAddr().String()
		_ = pc.Close()
		_ = ln.Close()
		cfg = DefaultConfig()
		cfg.ListenAddr = addr
		cfg.Upstreams = []string{addr}
		_, err = New(cfg, Options{})
		assert.ErrorContains(t, err, "is the proxy itself")
	})
}

func TestConfigValidate(t *testing.T) {
	require.NoError(t, DefaultConfig().Validate())
	err := Config{
		ListenAddr:    "15053",
		Upstreams:     []string{"kube-dns:53", "10.0.0.1"},
		SearchDomains: []string{"ok.local", "bad..domain"},
		TTL:           1500 * time.Millisecond,
	}.Validate()
	require.Error(t, err)
	for _, want := range []string{`listen address "15053"`, `upstream "kube-dns:53"`, `upstream "10.0.0.1"`, "bad..domain",
		"TTL must be", "negative TTL", "upstream timeout", "TCP idle timeout", "I/O timeout", "max forwards", "max TCP connections"} {
		assert.Contains(t, err.Error(), want)
	}
	assert.NotContains(t, err.Error(), "ok.local")
	err = Config{ListenAddr: ":53"}.Validate()
	assert.ErrorContains(t, err, "nowhere to forward to")
}

func TestParseResolvConf(t *testing.T) {
	cases := []struct {
		name    string
		in      string
		servers []string
		search  []string
		err     string
	}{
		{"kubelet", "nameserver 10.96.0.10\nsearch ns.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
			[]string{"10.96.0.10:53"}, []string{"ns.svc.cluster.local", "svc.cluster.local", "cluster.local"}, ""},
		{"comments and blanks", "# generated\n\n; old style\nnameserver 1.1.1.1 # inline\n  nameserver\t8.8.8.8\n",
			[]string{"1.1.1.1:53", "8.8.8.8:53"}, nil, ""},
		{"last of search and domain wins", "search a.example b.example\ndomain c.example\n", nil, []string{"c.example"}, ""},
		{"IPv6 and mapped IPv4", "nameserver fe80::1%eth0\nnameserver ::ffff:10.0.0.1\n", []string{"[fe80::1%eth0]:53", "10.0.0.1:53"}, nil, ""},
		{"not an address", "nameserver dns.example\n", nil, nil, `line 1: nameserver "dns.example" is not an IP address`},
		{"no address", "search x\nnameserver\n", nil, []string{"x"}, "line 2: nameserver without an address"},
		// systemd-resolved's stub file without a search domain.
		{"root search domain", "nameserver 127.0.0.53\nsearch .\n", []string{"127.0.0.53:53"}, nil, ""},
		{"root among others", "search . corp.example\n", nil, []string{"corp.example"}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rc, err := parseResolvConf(strings.NewReader(tc.in))
			if tc.err != "" {
				assert.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			var servers []string
			for _, s := range rc.nameservers {
				servers = append(servers, s.String())
			}
			assert.Equal(t, tc.servers, servers)
			assert.Equal(t, tc.search, rc.search)
		})
	}
}

func TestUnder(t *testing.T) {
	cases := []struct {
		name, zone string
		want       bool
	}{
		{"a.clusterset.local.", "clusterset.local.", true},
		{"clusterset.local.", "clusterset.local.", false},
		{"xclusterset.local.", "clusterset.local.", false},
		{`a\.clusterset.local.`, "clusterset.local.", false},
		{`a\\.clusterset.local.`, "clusterset.local.", true},
		{".clusterset.local.", "clusterset.local.", false},
		{"local.", "clusterset.local.", false},
	}
	for _, tc := range cases {
		assert.Equal(t, tc.want, under(tc.name, tc.zone), "%s under %s", tc.name, tc.zone)
	}
}

// ip6tables capture (`sidecar iptables --ipv6`) sends the app's IPv6
// queries to [::1]:15053: the proxy serves there too, at the same port,
// table names and forwarding alike, over UDP and TCP. Before, nothing
// listened there and every IPv6 query went unanswered.
func TestServesIPv6Loopback(t *testing.T) {
	if c, err := net.ListenPacket("udp", "[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback here: %v", err)
	} else {
		_ = c.Close()
	}
	f := start(t)
	require.NoError(t, f.p.SetTable(testTable))
	addrs := f.p.Addrs()
	require.Len(t, addrs, 2)
	require.Equal(t, f.p.Addr(), addrs[0])
	v6 := netip.AddrPortFrom(netip.IPv6Loopback(), f.p.Addr().Port())
	require.Equal(t, v6, addrs[1])
	for _, proto := range []string{"udp", "tcp"} {
		c := mdns.Client{Net: proto, Timeout: 5 * time.Second}
		r, _, err := c.Exchange(new(mdns.Msg).SetQuestion("foo.bar.svc.clusterset.local.", mdns.TypeA), v6.String())
		require.NoError(t, err, proto)
		require.Len(t, r.Answer, 1, proto)
		require.Equal(t, "240.240.1.1", r.Answer[0].(*mdns.A).A.String(), proto)
		r, _, err = c.Exchange(new(mdns.Msg).SetQuestion(upstreamName, mdns.TypeA), v6.String())
		require.NoError(t, err, proto)
		require.Equal(t, mdns.RcodeSuccess, r.Rcode, proto)
		require.NotEmpty(t, r.Answer, proto)
	}

	// Only beside 127.0.0.1, and not when turned off.
	require.Len(t, start(t, func(c *Config) { c.IPv6Loopback = false }).p.Addrs(), 1)
}
