package gateway

import (
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"testing"
)

// BenchmarkConnection is the gateway's per-connection path without TLS
// crypto: accept, read and parse the ClientHello, route, dial, replay,
// one byte back, close both ways. The backend answers the replayed
// ClientHello with one byte and closes. Clients, gateway and backend
// share the machine: ns/op is their combined cost per connection.
func BenchmarkConnection(b *testing.B) {
	hello := captureClientHello(b, &tls.Config{ServerName: echoSNI})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, len(hello))
				if _, err := io.ReadFull(c, buf); err == nil {
					_, _ = c.Write([]byte{1})
				}
			}()
		}
	}()
	h := startGateway(b, mustRoutes(b, route(echoSNI, echoCluster, netip.MustParseAddrPort(ln.Addr().String()))), func(c *Config) {
		c.HealthAddr, c.MetricsAddr = "", ""
	})
	b.ReportAllocs()
	b.SetParallelism(4) // 8 clients on 2 cores: saturate, or it only measures wake-up latency
	b.RunParallel(func(pb *testing.PB) {
		one := make([]byte, 1)
		for pb.Next() {
			c, err := net.Dial("tcp", h.addr())
			if err != nil {
				b.Error(err)
				return
			}
			if _, err := c.Write(hello); err != nil {
				b.Error(err)
			}
			if _, err := io.ReadFull(c, one); err != nil {
				b.Error(err)
			}
			_ = c.Close()
		}
	})
}
