package gateway

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// captureClientHello returns the first flight crypto/tls sends as a
// client with cfg: the ClientHello's record(s).
func captureClientHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	c, s := net.Pipe()
	defer s.Close()
	go func() {
		_ = tls.Client(c, cfg).Handshake()
		_ = c.Close()
	}()
	_ = s.SetReadDeadline(time.Now().Add(10 * time.Second))
	hdr := make([]byte, 5)
	_, err := io.ReadFull(s, hdr)
	require.NoError(t, err)
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	_, err = io.ReadFull(s, body)
	require.NoError(t, err)
	return append(hdr, body...)
}

// Hand-made ClientHellos, for what crypto/tls will not send.

func u16(n int) []byte { return []byte{byte(n >> 8), byte(n)} }

func tlsExt(typ int, body []byte) []byte {
	return append(append(u16(typ), u16(len(body))...), body...)
}

func sniExt(names ...string) []byte {
	var list []byte
	for _, n := range names {
		list = append(list, 0)
		list = append(list, u16(len(n))...)
		list = append(list, n...)
	}
	return tlsExt(0, append(u16(len(list)), list...))
}

// helloMsg is a ClientHello handshake message; exts nil means no
// extensions block at all.
func helloMsg(exts ...[]byte) []byte {
	body := []byte{3, 3}
	body = append(body, make([]byte, 32)...)    // random
	body = append(body, 0)                      // session id
	body = append(body, 0, 2, 0x13, 0x01, 1, 0) // one suite, null compression
	if exts != nil {
		all := bytes.Join(exts, nil)
		body = append(body, u16(len(all))...)
		body = append(body, all...)
	}
	return append([]byte{1, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}, body...)
}

// records splits a handshake message into records of at most size bytes.
func records(msg []byte, size int) []byte {
	var out []byte
	for len(msg) > 0 {
		n := min(size, len(msg))
		out = append(out, 22, 3, 1)
		out = append(out, u16(n)...)
		out = append(out, msg[:n]...)
		msg = msg[n:]
	}
	return out
}

// splitRecords splits a handshake message into n records of about the
// same size.
func splitRecords(msg []byte, n int) []byte {
	var out []byte
	for i := range n {
		part := msg[i*len(msg)/n : (i+1)*len(msg)/n]
		out = append(out, 22, 3, 1)
		out = append(out, u16(len(part))...)
		out = append(out, part...)
	}
	return out
}

func oddSuites() []byte {
	body := append([]byte{3, 3}, make([]byte, 32)...)
	body = append(body, 0, 0, 1, 0x13, 1, 0)
	return append([]byte{1, 0, 0, byte(len(body))}, body...)
}

func goHello(t testing.TB, sni string, mod func(*tls.Config)) []byte {
	cfg := &tls.Config{ServerName: sni, InsecureSkipVerify: sni == ""}
	if mod != nil {
		mod(cfg)
	}
	return captureClientHello(t, cfg)
}

func TestParseClientHello(t *testing.T) {
	const name = "outbound_.80_._.echo.demo.svc.cluster.local"
	goDefault := goHello(t, name, nil)
	cases := []struct {
		name    string
		data    []byte
		sni     string
		wantErr error
	}{
		{"go default (TLS 1.3, X25519MLKEM768)", goDefault, name, nil},
		{"go TLS 1.2 only", goHello(t, name, func(c *tls.Config) { c.MaxVersion = tls.VersionTLS12 }), name, nil},
		{"go with ALPN and X25519 only", goHello(t, name, func(c *tls.Config) {
			c.NextProtos = []string{"h2", "http/1.1"}
			c.CurvePreferences = []tls.CurveID{tls.X25519}
		}), name, nil},
		{"go federation name", goHello(t, "federation.isthmus.internal", nil), "federation.isthmus.internal", nil},
		{"go without SNI", goHello(t, "", nil), "", ErrNoSNI},
		{"uppercase is lowercased", records(helloMsg(sniExt("Echo.Demo.SVC")), 1<<14), "echo.demo.svc", nil},
		{"fragmented over 64 records, the most allowed", splitRecords(goDefault[5:], 64), name, nil},
		{"fragmented over 65 records", splitRecords(goDefault[5:], 65), "", ErrTooLarge},
		{"65 one-byte records of a ClientHello said to be 16000 bytes", records(append([]byte{1, 0, 0x3e, 0x7c}, make([]byte, 61)...), 1), "", ErrTooLarge},
		{"fragment splits the handshake header", records(helloMsg(sniExt("a.b")), 2), "a.b", nil},
		{"non-host_name entries are skipped", records(helloMsg(tlsExt(0, append(u16(8), 1, 0, 1, 'x', 0, 0, 1, 'y'))), 1<<14), "y", nil},
		{"no extensions block", records(helloMsg(), 1<<14), "", ErrNoSNI},
		{"extensions without server_name", records(helloMsg(tlsExt(16, []byte{0, 3, 2, 'h', '2'})), 1<<14), "", ErrNoSNI},

		{"plain HTTP", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "", ErrNotTLS},
		{"SSLv2 hello", []byte{0x80, 0x2e, 0x01, 0x03, 0x01}, "", ErrNotTLS},
		{"TLS alert record", []byte{21, 3, 3, 0, 2, 2, 40}, "", ErrNotTLS},
		{"record version 2", []byte{22, 2, 0, 0, 1, 1}, "", ErrNotTLS},
		{"first byte only, not TLS", []byte{'G'}, "", ErrNotTLS},
		{"ServerHello, not ClientHello", records([]byte{2, 0, 0, 0}, 1<<14), "", ErrMalformed},
		{"empty record", []byte{22, 3, 1, 0, 0}, "", ErrMalformed},
		{"record over 16 KiB", []byte{22, 3, 1, 0x40, 0x01}, "", ErrMalformed},
		{"alert amid the fragments", append(records(goDefault[5:10], 5), 21, 3, 3, 0, 2, 2, 40), "", ErrMalformed},
		{"too large (header says 20000)", []byte{22, 3, 1, 0, 4, 1, 0, 0x4e, 0x20}, "", ErrTooLarge},
		{"too large (real padding)", records(helloMsg(sniExt("a.b"), tlsExt(21, make([]byte, 17000))), 1<<14), "", ErrTooLarge},
		{"session id of 33 bytes", records(append([]byte{1, 0, 0, 36 + 7, 3, 3}, append(make([]byte, 32), append([]byte{33}, make([]byte, 33)...)...)...), 1<<14), "", ErrMalformed},
		{"odd cipher suites length", records(oddSuites(), 1<<14), "", ErrMalformed},
		{"two server_name extensions", records(helloMsg(sniExt("a.b"), sniExt("c.d")), 1<<14), "", ErrMalformed},
		{"two host_names", records(helloMsg(sniExt("a.b", "c.d")), 1<<14), "", ErrMalformed},
		{"empty host_name", records(helloMsg(sniExt("")), 1<<14), "", ErrMalformed},
		{"host_name with a space", records(helloMsg(sniExt("a b")), 1<<14), "", ErrMalformed},
		{"host_name with a trailing dot", records(helloMsg(sniExt("a.b.")), 1<<14), "", ErrMalformed},
		{"host_name with NUL", records(helloMsg(sniExt("a.b\x00.evil")), 1<<14), "", ErrMalformed},
		{"extension longer than the block", records(helloMsg([]byte{0, 16, 0, 9, 0}), 1<<14), "", ErrMalformed},
		{"truncated ClientHello", goDefault[:40], "", io.ErrUnexpectedEOF},
		{"nothing yet", nil, "", io.ErrUnexpectedEOF},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h, n, err := ParseClientHello(tc.data)
			if tc.wantErr != nil {
				require.ErrorIs(t, err, tc.wantErr)
				for _, other := range []error{ErrNotTLS, ErrNoSNI, ErrTooLarge, ErrMalformed, io.ErrUnexpectedEOF} {
					if other != tc.wantErr {
						require.NotErrorIs(t, err, other, "one reason only")
					}
				}
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.sni, h.ServerName)
			require.Equal(t, len(tc.data), n, "the records holding the ClientHello")
		})
	}
}

// Every proper prefix of a real ClientHello is incomplete, never an error
// of another kind: the peeker must keep reading.
func TestParseClientHelloPrefixes(t *testing.T) {
	for _, data := range [][]byte{goHello(t, "a.example", nil), records(goHello(t, "a.example", nil)[5:], 100)} {
		for i := range len(data) {
			_, _, err := ParseClientHello(data[:i])
			require.ErrorIs(t, err, io.ErrUnexpectedEOF, "prefix of %d bytes", i)
		}
		h, _, err := ParseClientHello(append(data, "trailing early data"...))
		require.NoError(t, err)
		require.Equal(t, "a.example", h.ServerName)
	}
}

// The parser agrees with crypto/tls's server on the server name.
func TestParseClientHelloMatchesCryptoTLS(t *testing.T) {
	for _, name := range []string{"outbound_.9080_.v1_.reviews.bookinfo.svc.cluster.local", "federation.isthmus.internal", "x", ""} {
		data := goHello(t, name, nil)
		h, _, err := ParseClientHello(data)
		if name == "" {
			require.ErrorIs(t, err, ErrNoSNI)
		} else {
			require.NoError(t, err)
		}
		require.Equal(t, name, h.ServerName)
		require.Equal(t, name, cryptoTLSServerName(t, data))
	}
}

// cryptoTLSServerName feeds data to a crypto/tls server and returns the
// server name it saw.
func cryptoTLSServerName(t testing.TB, data []byte) string {
	c, s := net.Pipe()
	defer c.Close()
	got := make(chan string, 1)
	go func() {
		defer s.Close()
		_ = tls.Server(s, &tls.Config{GetConfigForClient: func(hi *tls.ClientHelloInfo) (*tls.Config, error) {
			got <- hi.ServerName
			return nil, errors.New("seen")
		}}).Handshake()
	}()
	go func() { _, _ = c.Write(data) }()
	go func() { _, _ = io.Copy(io.Discard, c) }()
	select {
	case name := <-got:
		return name
	case <-time.After(10 * time.Second):
		t.Fatal("crypto/tls never parsed the ClientHello")
		return ""
	}
}

// readClientHello on a real socket: bytes in several writes are gathered,
// everything read is reported for replay.
func TestReadClientHello(t *testing.T) {
	data := goHello(t, "a.example", nil)
	c, s := net.Pipe()
	defer c.Close()
	defer s.Close()
	go func() {
		for _, part := range [][]byte{data[:3], data[3:50], data[50:]} {
			_, _ = c.Write(part)
		}
	}()
	buf := make([]byte, peekBufferSize)
	h, n, err := readClientHello(s, buf, time.Now().Add(10*time.Second))
	require.NoError(t, err)
	require.Equal(t, "a.example", h.ServerName)
	require.Equal(t, data, buf[:n])

	// A client that stops mid-way is timed out.
	go func() { _, _ = c.Write(data[:10]) }()
	_, _, err = readClientHello(s, buf, time.Now().Add(100*time.Millisecond))
	require.ErrorIs(t, err, ErrClientHelloTimeout)
}

// trickleConn is a client that sends its bytes one Read at a time, as a
// client that writes one byte per segment would.
type trickleConn struct {
	net.Conn // nil: only Read and SetReadDeadline are called
	data     []byte
	read     int
}

func (c *trickleConn) Read(b []byte) (int, error) {
	if c.read == len(c.data) {
		return 0, io.EOF
	}
	c.read++
	return copy(b, c.data[c.read-1:c.read]), nil
}

func (c *trickleConn) SetReadDeadline(time.Time) error { return nil }

// A ClientHello trickled in one byte per read, split over as many records
// as are allowed, costs work in proportion to its bytes: each read resumes
// the parse where the last one stopped, and each record's fragment is
// copied once into a buffer allocated once. Parsing from the first byte
// on every read, copying the whole message per record, made that
// thousands of allocations (and, with 1-byte records, ~1.35 s of CPU per
// connection).
func TestReadClientHelloTrickled(t *testing.T) {
	hello := goHello(t, "a.example", nil)
	data := splitRecords(hello[5:], MaxClientHelloRecords)
	buf := make([]byte, peekBufferSize)
	var (
		h   ClientHello
		n   int
		err error
	)
	allocs := testing.AllocsPerRun(20, func() {
		h, n, err = readClientHello(&trickleConn{data: data}, buf, time.Time{})
	})
	require.NoError(t, err)
	require.Equal(t, "a.example", h.ServerName)
	require.Equal(t, len(data), n)
	require.LessOrEqual(t, allocs, 5.0, "allocations to read %d bytes in %d records", len(data), MaxClientHelloRecords)

	// One-byte records of a ClientHello that claims 16000 bytes: refused
	// after MaxClientHelloRecords records, not after 17 KiB of them.
	attack := records(append([]byte{1, 0, 0x3e, 0x7c}, make([]byte, 15996)...), 1)
	allocs = testing.AllocsPerRun(20, func() {
		_, n, err = readClientHello(&trickleConn{data: attack}, buf, time.Time{})
	})
	require.ErrorIs(t, err, ErrTooLarge)
	require.LessOrEqual(t, n, (MaxClientHelloRecords+1)*(recordHeaderLen+1), "bytes read before the refusal")
	require.LessOrEqual(t, allocs, 10.0, "allocations to refuse it")
}

func FuzzParseClientHello(f *testing.F) {
	for _, sni := range []string{"outbound_.80_._.echo.demo.svc.cluster.local", "federation.isthmus.internal", ""} {
		for _, mod := range []func(*tls.Config){nil, func(c *tls.Config) { c.MaxVersion = tls.VersionTLS12 }, func(c *tls.Config) {
			c.NextProtos = []string{"h2"}
			c.CurvePreferences = []tls.CurveID{tls.X25519}
		}} {
			h := goHello(f, sni, mod)
			f.Add(h)
			f.Add(records(h[5:], 64))
		}
	}
	f.Add(records(helloMsg(sniExt("a.b", "c.d")), 1<<14))
	f.Add(records(helloMsg(sniExt("a.b"), tlsExt(21, make([]byte, 300))), 100))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, n, err := ParseClientHello(data)
		if err != nil {
			require.Zero(t, n)
			require.Empty(t, h.ServerName)
			kinds := 0
			for _, e := range []error{ErrNotTLS, ErrNoSNI, ErrTooLarge, ErrMalformed, io.ErrUnexpectedEOF} {
				if errors.Is(err, e) {
					kinds++
				}
			}
			require.Equal(t, 1, kinds, "exactly one reason: %v", err)
			return
		}
		require.LessOrEqual(t, n, len(data))
		require.NoError(t, validServerName(h.ServerName))
		require.Equal(t, strings.ToLower(h.ServerName), h.ServerName)
		// The records it reported hold the ClientHello by themselves.
		h2, n2, err := ParseClientHello(data[:n])
		require.NoError(t, err)
		require.Equal(t, h, h2)
		require.Equal(t, n, n2)
	})
}

func BenchmarkParseClientHello(b *testing.B) {
	data := goHello(b, "outbound_.80_._.echo.demo.svc.cluster.local", nil)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := ParseClientHello(data); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReadClientHelloTrickled is the worst case a client can make
// the peeker's parse: one byte per read, in one-byte records.
func BenchmarkReadClientHelloTrickled(b *testing.B) {
	attack := records(append([]byte{1, 0, 0x3e, 0x7c}, make([]byte, 15996)...), 1)
	buf := make([]byte, peekBufferSize)
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := readClientHello(&trickleConn{data: attack}, buf, time.Time{}); !errors.Is(err, ErrTooLarge) {
			b.Fatal(err)
		}
	}
}
