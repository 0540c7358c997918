package dns

import (
	"encoding/binary"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// benchClients is how many clients send queries at once, each waiting for
// its answer before the next query: enough to keep 2 cores busy, as
// several resolving threads of one pod would.
const benchClients = 8

// BenchmarkAnswered is queries answered from the table, over UDP. The
// peer, measured in the same run with the same clients, is the test
// upstream — a miekg/dns server, what CoreDNS is built on — answering a
// name from memory. ns/op and queries/s are the proxy's; ratio is the
// proxy's rate over the peer's.
func BenchmarkAnswered(b *testing.B) {
	f := start(b)
	if err := f.p.SetTable(testTable); err != nil {
		b.Fatal(err)
	}
	f.up.quiet.Store(true)
	compare(b, f, "foo.bar.svc.clusterset.local.", f.p.Addr(), upstreamName, f.up.addr)
}

// BenchmarkForwarded is queries forwarded to the upstream, over UDP. The
// peer is the same queries sent to the upstream directly, without the
// proxy: ratio is what the extra hop leaves of the direct rate.
func BenchmarkForwarded(b *testing.B) {
	f := start(b)
	if err := f.p.SetTable(testTable); err != nil {
		b.Fatal(err)
	}
	f.up.quiet.Store(true)
	compare(b, f, upstreamName, f.p.Addr(), upstreamName, f.up.addr)
}

func compare(b *testing.B, f *fixture, name string, addr netip.AddrPort, peerName string, peerAddr netip.AddrPort) {
	// Warm up both paths (sockets, pools, the scheduler) outside the
	// measurement.
	load(b, addr, name, 2000)
	load(b, peerAddr, peerName, 2000)
	b.ReportAllocs()
	b.ResetTimer()
	ours := load(b, addr, name, b.N)
	b.StopTimer()
	peer := load(b, peerAddr, peerName, b.N)
	b.ReportMetric(float64(b.N)/ours.Seconds(), "queries/s")
	b.ReportMetric(float64(b.N)/peer.Seconds(), "peer-queries/s")
	b.ReportMetric(peer.Seconds()/ours.Seconds(), "ratio")
	if n := f.counter("isthmus_dns_queries", "result=servfail"); n > 0 {
		b.Errorf("%d queries got SERVFAIL", n)
	}
}

// load sends n A queries for name to addr from benchClients clients over
// UDP and returns how long it took for every one to be answered. A query
// lost on loopback is sent again after a second.
func load(b *testing.B, addr netip.AddrPort, name string, n int) time.Duration {
	b.Helper()
	query, err := new(mdns.Msg).SetQuestion(name, mdns.TypeA).Pack()
	if err != nil {
		b.Fatal(err)
	}
	var left atomic.Int64
	left.Store(int64(n))
	var wg sync.WaitGroup
	begin := time.Now()
	for i := range benchClients {
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(addr))
		if err != nil {
			b.Fatal(err)
		}
		q := append([]byte(nil), query...)
		wg.Go(func() {
			defer c.Close()
			buf := make([]byte, 1500)
			for id := uint16(i) << 12; left.Add(-1) >= 0; id++ {
				binary.BigEndian.PutUint16(q, id)
				for {
					if _, err := c.Write(q); err != nil {
						b.Error(err)
						return
					}
					_ = c.SetReadDeadline(time.Now().Add(time.Second))
					m, err := c.Read(buf)
					if err != nil {
						if readTimeout(err) {
							continue
						}
						b.Error(err)
						return
					}
					if m < headerLen || binary.BigEndian.Uint16(buf) != id || buf[3]&0x0f != mdns.RcodeSuccess {
						b.Errorf("bad answer % x", buf[:m])
						return
					}
					break
				}
			}
		})
	}
	wg.Wait()
	return time.Since(begin)
}
