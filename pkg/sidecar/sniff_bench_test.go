package sidecar

import (
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"github.com/stretchr/testify/require"
)

// BenchmarkInboundConnSetup is one inbound connection's life through
// b's sidecar to its TCP app: dial, mTLS handshake (a client
// certificate, verified), a one-byte echo, close. strict is an inbound
// listener of TLS chains only, as before plaintext chains existed;
// permissive adds a raw_buffer chain for the port, so every connection
// is sniffed (a MSG_PEEK of its first byte) before its handshake;
// plaintext is a plaintext caller on that chain (no handshake).
// syscalls/op counts the whole process's reads and writes (client,
// sidecar, app).
func BenchmarkInboundConnSetup(b *testing.B) {
	m := startMeshWith(b, nil)
	cert := tlsCert(m.alpha.svid(b, m.alpha.id("demo", "caller")))
	addr := m.b.endpoint(ipTCP).String()
	port := m.b.tcp.addr.Port()
	// set serves chains and waits for b to have them (by their number:
	// with -count, the same chains again change nothing the client
	// publishes).
	set := func(b *testing.B, version string, chains ...*listenerv3.FilterChain) {
		snap := snapshot(b, version, []*testCA{m.alpha, m.beta}, m.onB(echoSvc, ipHTTP), m.onB(dbSvc, ipTCP))
		m.xds.set(b, withInbound(b, snap, chains...))
		require.Eventually(b, func() bool {
			st := m.b.proxy.state.Load()
			return st != nil && len(st.cfg.Sidecar.Inbound.Chains) == len(chains)
		}, waitFor, 5*time.Millisecond)
	}
	strict := func(b *testing.B) []*listenerv3.FilterChain {
		return []*listenerv3.FilterChain{inboundChain(b, port, false), inboundChain(b, 0, true, alpnHTTP1, alpnHTTP2), inboundChain(b, 0, false)}
	}
	permissive := func(b *testing.B) []*listenerv3.FilterChain {
		return append(strict(b), plaintext(inboundChain(b, port, false)))
	}
	one := make([]byte, 1)
	echo := func(b *testing.B, c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(waitFor))
		if _, err := c.Write(one); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, one); err != nil {
			b.Fatal(err)
		}
		_ = c.Close()
	}
	run := func(b *testing.B, dial func() (net.Conn, error)) {
		before, ok := ioSyscalls()
		b.ReportAllocs()
		for b.Loop() {
			c, err := dial()
			if err != nil {
				b.Fatal(err)
			}
			echo(b, c)
		}
		if after, ok2 := ioSyscalls(); ok && ok2 {
			b.ReportMetric(float64(after-before)/float64(b.N), "syscalls/op")
		}
	}
	dialTLS := func() (net.Conn, error) { return dialInbound(b, addr, cert) }
	n := 0
	version := func() string { n++; return "bench" + strconv.Itoa(n) }
	b.Run("tls/strict", func(b *testing.B) {
		set(b, version(), strict(b)...)
		run(b, dialTLS)
	})
	b.Run("tls/permissive", func(b *testing.B) {
		set(b, version(), permissive(b)...)
		run(b, dialTLS)
	})
	b.Run("plaintext/permissive", func(b *testing.B) {
		set(b, version(), permissive(b)...)
		run(b, func() (net.Conn, error) { return net.DialTimeout("tcp", addr, waitFor) })
	})
}
