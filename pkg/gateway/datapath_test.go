package gateway

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Several connections stream megabytes both ways at once, each through
// a backend that echoes every byte: what comes back is what went out,
// whatever splice, the pipes and the socket buffers did to it.
func TestBulkBothWays(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, func(_ net.Conn, c *tls.Conn) {
		_, _ = io.Copy(c, c)
		_ = c.CloseWrite()
	})
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, be.addr())), nil)
	// One connection large enough to fill socket buffers and pipes, the
	// others smaller.
	const conns = 6
	sizes := [conns]int{6 << 20, 1 << 20, 1 << 20, 512 << 10, 512 << 10, 100}
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for i := range conns {
		wg.Go(func() {
			errs <- func() error {
				c, err := h.dialTLS(p.client, echoSNI)
				if err != nil {
					return err
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(60 * time.Second))
				size := sizes[i]
				data := make([]byte, size)
				_, _ = rand.Read(data)
				sent := sha256.Sum256(data)
				werr := make(chan error, 1)
				go func() {
					// Small and large writes, so records and segments vary.
					chunk := 1000 + i*7919%65536
					for off := 0; off < len(data); off += chunk {
						if _, err := c.Write(data[off:min(off+chunk, len(data))]); err != nil {
							werr <- err
							return
						}
					}
					werr <- c.CloseWrite()
				}()
				got := sha256.New()
				n, err := io.Copy(got, c)
				if err != nil {
					return err
				}
				if err := <-werr; err != nil {
					return err
				}
				if n != int64(size) || !bytes.Equal(got.Sum(nil), sent[:]) {
					return fmt.Errorf("connection %d: %d bytes back, not the %d sent", i, n, size)
				}
				return nil
			}()
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	eventually(t, func() bool { return h.metric("isthmus_gateway_connections_active", "") == 0 }, "every connection closed")
	total := 0
	for _, n := range sizes {
		total += n
	}
	require.GreaterOrEqual(t, h.metric("isthmus_gateway_sent_bytes_total", `cluster="`+echoCluster+`"`), float64(total))
	require.GreaterOrEqual(t, h.metric("isthmus_gateway_received_bytes_total", `cluster="`+echoCluster+`"`), float64(total))
}

// Many short connections at once: each is routed, and the count of open
// connections returns to zero.
func TestManyConnections(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, namedEcho("echo"))
	// 200 dials at once under -race on two cores can take longer than
	// the default second: what is tested is routing, not dial speed.
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, be.addr())), func(c *Config) { c.DialTimeout = 30 * time.Second })
	const n = 200
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Go(func() {
			c, err := h.dialTLS(p.client, echoSNI)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
			line, err := readLineErr(c)
			if err == nil && line != "echo" {
				err = fmt.Errorf("read %q", line)
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.Equal(t, float64(n), h.metric("isthmus_gateway_routed_connections_total", `cluster="`+echoCluster+`"`))
	eventually(t, func() bool { return h.metric("isthmus_gateway_connections_active", "") == 0 }, "every connection closed")
}

func readLineErr(c net.Conn) (string, error) {
	var b []byte
	one := make([]byte, 1)
	for {
		if _, err := c.Read(one); err != nil {
			return string(b), err
		}
		if one[0] == '\n' {
			return string(b), nil
		}
		b = append(b, one[0])
	}
}

// blackhole is an address whose SYNs are dropped: a listener that never
// accepts, with its accept queue full.
func blackhole(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	// Go's listen backlog is the system's; fill the queue until a dial
	// times out, which is then what the gateway's dial meets.
	addr := ln.Addr().String()
	var held []net.Conn
	t.Cleanup(func() {
		for _, c := range held {
			_ = c.Close()
		}
	})
	for range 8192 {
		c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err != nil {
			var ne net.Error
			require.True(t, errors.As(err, &ne) && ne.Timeout(), "dial: %v", err)
			return netip.MustParseAddrPort(addr)
		}
		held = append(held, c)
	}
	t.Skip("could not fill a listener's accept queue")
	return netip.AddrPort{}
}

// An endpoint that does not answer the SYN costs the route's connect
// timeout, then the next endpoint answers; the silent one is ejected.
func TestConnectTimeout(t *testing.T) {
	p := newPKI(t)
	alive := startBackend(t, p.server, namedEcho("alive"))
	silent := blackhole(t)
	r := route(echoSNI, echoCluster, silent, alive.addr())
	r.ConnectTimeout = 300 * time.Millisecond
	h := startGateway(t, mustRoutes(t, r), nil)
	for i := range 4 {
		c, err := h.dialTLS(p.client, echoSNI)
		require.NoError(t, err, "connection %d", i)
		require.Equal(t, "alive", readLine(t, c))
		_ = c.Close()
	}
	require.Equal(t, 1.0, h.metric("isthmus_gateway_upstream_connect_failures_total", `cluster="`+echoCluster+`"`),
		"the silent endpoint was tried once, then ejected")
}
