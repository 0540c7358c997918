package sidecar

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/net/http/httpguts"
)

// parseHead scans and parses raw as the HTTP/1.1 path does.
func parseHead(raw []byte, h *h1Head) (int, error) {
	end, _, err := scanHead(raw, 0)
	if err != nil {
		return 0, err
	}
	if end == 0 {
		return 0, io.ErrUnexpectedEOF
	}
	return end, parseRequestHead(raw[:end], h)
}

func TestParseRequestHead(t *testing.T) {
	for _, tc := range []struct {
		name string
		raw  string
		// code is the refusal's status; 0 accepts, -1 falls back.
		code int
	}{
		{"simple", "GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0},
		{"absolute-form", "GET http://a:80/p?q HTTP/1.1\r\nHost: x\r\n\r\n", 0},
		{"content-length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n", 0},
		{"same content-length twice", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", 0},
		{"chunked", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n", 0},
		{"empty host", "GET / HTTP/1.1\r\nHost:\r\n\r\n", 0},

		{"bare LF", "GET / HTTP/1.1\nHost: a\n\n", 400},
		{"bare LF in a field", "GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", 400},
		{"CR in a value", "GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400},
		{"obs-fold", "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400},
		{"space before colon", "GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 3\r\n\r\n", 400},
		{"no colon", "GET / HTTP/1.1\r\nHost: a\r\nbroken\r\n\r\n", 400},
		{"CL and TE", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
		{"TE and CL", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400},
		{"differing content-lengths", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400},
		{"content-length list", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n", 400},
		{"content-lengths equal only as numbers", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 03\r\n\r\n", 400},
		{"negative content-length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400},
		{"signed content-length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n", 400},
		{"huge content-length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 400},
		{"gzip, chunked", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501},
		{"chunked twice", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501},
		{"identity", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 501},
		{"no host", "GET / HTTP/1.1\r\n\r\n", 400},
		{"two hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400},
		{"bad host", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400},
		{"bad method", "G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400},
		{"two spaces", "GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400},
		{"bad escape", "GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n", 400},
		{"HTTP/1.2", "GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505},
		{"HTTP/3.0", "GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505},
		{"garbage version", "GET / HTTQ/1.1\r\nHost: a\r\n\r\n", 400},
		{"too many fields", "GET / HTTP/1.1\r\nHost: a\r\n" + strings.Repeat("X: y\r\n", 100) + "\r\n", 431},

		{"h2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", -1},
		{"HTTP/1.0", "GET / HTTP/1.0\r\n\r\n", -1},
		{"CONNECT", "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", -1},
		{"upgrade", "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", -1},
		{"expect", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n", -1},
		{"user info", "GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n", -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h h1Head
			_, err := parseHead([]byte(tc.raw), &h)
			var he *h1Error
			switch {
			case tc.code == 0:
				require.NoError(t, err)
			case tc.code == -1:
				require.ErrorIs(t, err, errH1Fallback)
			default:
				require.True(t, errors.As(err, &he), "%v", err)
				require.Equal(t, tc.code, he.code, he.msg)
			}
		})
	}
}

// A response head from an upstream: what the codec reads of it, and
// what it refuses (the sidecar then answers 502).
func TestParseResponseHead(t *testing.T) {
	for _, tc := range []struct {
		name, raw string
		ok        bool
		refused   *h1Error // when not ok
		// status, length (-1: none), chunked, and how the body ends.
		status                  int
		length                  int64
		chunked, toClose, keeps bool
	}{
		{name: "length", raw: "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", ok: true, status: 200, length: 3, keeps: true},
		{name: "chunked", raw: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", ok: true, status: 200, length: -1, chunked: true, keeps: true},
		{name: "to the end", raw: "HTTP/1.1 200 OK\r\n\r\n", ok: true, status: 200, length: -1, toClose: true},
		{name: "no reason", raw: "HTTP/1.1 204\r\n\r\n", ok: true, status: 204, length: -1, keeps: true},
		{name: "HTTP/1.0 keep-alive", raw: "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", ok: true, status: 200, length: 0, keeps: true},
		{name: "HTTP/1.0", raw: "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", ok: true, status: 200, length: 0},
		{name: "same length twice", raw: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n", ok: true, status: 200, length: 2, keeps: true},

		{name: "HTTP/1.0 chunked", raw: "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", refused: errTEInHTTP10},
		{name: "lengths equal only as numbers", raw: "HTTP/1.1 200 OK\r\nContent-Length: 02\r\nContent-Length: 2\r\n\r\n", refused: errContentLengths},
		{name: "differing lengths", raw: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n", refused: errContentLengths},
		{name: "chunked and length", raw: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", refused: errTEAndCL},
		{name: "gzip", raw: "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", refused: errTransferCoding},
		{name: "two-digit status", raw: "HTTP/1.1 20 OK\r\n\r\n", refused: errStatusLine},
		{name: "status below 100", raw: "HTTP/1.1 099 OK\r\n\r\n", refused: errStatusLine},
		{name: "HTTP/2", raw: "HTTP/2.0 200 OK\r\n\r\n", refused: errStatusLine},
		{name: "control in the reason", raw: "HTTP/1.1 200 O\x01K\r\n\r\n", refused: errStatusLine},
		{name: "obs-fold", raw: "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", refused: errObsFold},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h h1Head
			err := parseResponseHead([]byte(tc.raw), &h)
			if !tc.ok {
				require.ErrorIs(t, err, tc.refused)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.status, h.status)
			require.Equal(t, tc.length, h.contentLength)
			require.Equal(t, tc.chunked, h.chunked)
			_, toClose, keep := h.responseBody(false)
			require.Equal(t, tc.toClose, toClose)
			require.Equal(t, tc.keeps, keep)
		})
	}
}

func TestParseRequestHeadFields(t *testing.T) {
	raw := []byte("POST http://echo:80/a/b?c=d HTTP/1.1\r\nhost: ignored\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nTE: trailers\r\n" +
		"Content-Length: 12\r\nX-Forwarded-Client-Cert: forged\r\nX-Keep:  v \r\n\r\n")
	var h h1Head
	n, err := parseHead(raw, &h)
	require.NoError(t, err)
	require.Len(t, raw, n)
	require.Equal(t, "POST", string(h.method.of(raw)))
	require.True(t, h.absolute)
	require.Equal(t, "echo:80", string(h.authority.of(raw)))
	require.Equal(t, "/a/b?c=d", string(h.path.of(raw)))
	require.Equal(t, "ignored", string(h.host.of(raw)))
	require.EqualValues(t, 12, h.contentLength)
	require.True(t, h.connKeepAlive)
	require.True(t, h.teTrailers)
	kinds := map[string]fieldKind{}
	for i := range h.fields {
		f := &h.fields[i]
		kinds[string(f.name.of(raw))] = f.kind
		if string(f.name.of(raw)) == "X-Hop" {
			require.True(t, h.connNamed(raw, f))
		}
		if string(f.name.of(raw)) == "X-Keep" {
			require.Equal(t, "v", string(f.value.of(raw)))
			require.Equal(t, "X-Keep:  v \r\n", string(f.line.of(raw)))
		}
	}
	require.Equal(t, map[string]fieldKind{"host": fieldHost, "Connection": fieldConnection, "X-Hop": fieldOther, "TE": fieldTE,
		"Content-Length": fieldContentLength, "X-Forwarded-Client-Cert": fieldXFCC, "X-Keep": fieldOther}, kinds)
}

func TestParseChunkSize(t *testing.T) {
	for line, want := range map[string]int64{"0": 0, "a": 10, "FF": 255, "10;ext=1": 16, "10 ;ext": 16, "fffffffffffffff": 1<<60 - 1} {
		n, err := parseChunkSize([]byte(line))
		require.NoError(t, err, line)
		require.Equal(t, want, n, line)
	}
	for _, line := range []string{"", "x", "-1", "0x10", "1 2", "1000000000000000", "+a", "a\x00"} {
		_, err := parseChunkSize([]byte(line))
		require.ErrorIs(t, err, errChunkSize, "%q", line)
	}
}

// FuzzParseRequestHead: no input panics; a head the parser accepts is
// one net/http reads the same way (method, host, framing), so the two
// paths never disagree on where a request ends; and its spans hold.
func FuzzParseRequestHead(f *testing.F) {
	for _, seed := range []string{
		"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
		"GET http://echo:80/p?q HTTP/1.1\r\nHost: x\r\nConnection: close, X\r\nX: 1\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
		"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
		"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
		"OPTIONS * HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		var h h1Head
		n, err := parseHead(raw, &h)
		if err != nil {
			var he *h1Error
			if !errors.Is(err, errH1Fallback) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.As(err, &he) {
				t.Fatalf("unexpected error type %T: %v", err, err)
			}
			return
		}
		head := raw[:n]
		for _, s := range []span{h.method, h.target, h.path, h.authority, h.host} {
			if s.s < 0 || s.e < s.s || int(s.e) > n {
				t.Fatalf("span %v outside the head of %d bytes", s, n)
			}
		}
		for _, f := range h.fields {
			if line := f.line.of(head); !bytes.HasSuffix(line, []byte("\r\n")) || !bytes.HasPrefix(line, f.name.of(head)) {
				t.Fatalf("field line %q", line)
			}
		}
		r, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(head)))
		if err != nil {
			t.Fatalf("accepted %q, which net/http refuses: %v", head, err)
		}
		if r.Method != string(h.method.of(head)) {
			t.Fatalf("method %q, net/http %q", h.method.of(head), r.Method)
		}
		host := h.host.of(head)
		if h.absolute {
			host = h.authority.of(head)
		}
		if !strings.EqualFold(r.Host, string(host)) {
			t.Fatalf("host %q, net/http %q", host, r.Host)
		}
		switch {
		case h.chunked:
			if len(r.TransferEncoding) != 1 || r.TransferEncoding[0] != "chunked" {
				t.Fatalf("chunked, net/http %v", r.TransferEncoding)
			}
		case h.contentLength >= 0:
			if r.ContentLength != h.contentLength {
				t.Fatalf("length %d, net/http %d", h.contentLength, r.ContentLength)
			}
		default:
			if r.ContentLength > 0 || len(r.TransferEncoding) > 0 {
				t.Fatalf("no body, net/http length %d %v", r.ContentLength, r.TransferEncoding)
			}
		}
	})
}

// FuzzCopyChunked: a chunked body is either refused or copied as a
// chunked body that net/http decodes to the same bytes net/http decodes
// from the input.
func FuzzCopyChunked(f *testing.F) {
	for _, seed := range []string{
		"3\r\nabc\r\n0\r\n\r\n",
		"3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: v\r\n\r\n",
		"3\r\nabcd\r\n0\r\n\r\n",
		"3\nabc\n0\n\n",
		"fffffffffffffff\r\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		var out bytes.Buffer
		src := &bufReader{c: &bytesConn{r: bytes.NewReader(raw)}, buf: make([]byte, 64), tm: &timing{idle: waitFor}}
		dst := &wbuf{c: &bytesConn{w: &out}, b: make([]byte, 0, 32), tm: src.tm}
		_, err := copyChunked(dst, src)
		if err == nil {
			err = dst.flush()
		}
		if err != nil {
			return
		}
		want, werr := io.ReadAll(newChunkedReader(raw))
		got, gerr := io.ReadAll(newChunkedReader(out.Bytes()))
		if werr != nil || gerr != nil {
			t.Fatalf("copied %q as %q; net/http reads: %v, %v", raw, out.Bytes(), werr, gerr)
		}
		if !bytes.Equal(want, got) {
			t.Fatalf("body %q became %q", want, got)
		}
	})
}

// newChunkedReader is net/http's chunked decoding, through a response.
func newChunkedReader(b []byte) io.Reader {
	resp := "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + string(b)
	r, err := http.ReadResponse(bufio.NewReader(strings.NewReader(resp)), nil)
	if err != nil {
		return errReader{err}
	}
	return r.Body
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

// bytesConn is a net.Conn over a reader and a writer, for the codec's
// copy functions alone.
type bytesConn struct {
	net.Conn // nil: only what follows is called
	r        io.Reader
	w        io.Writer
}

func (c *bytesConn) Read(b []byte) (int, error)       { return c.r.Read(b) }
func (c *bytesConn) Write(b []byte) (int, error)      { return c.w.Write(b) }
func (c *bytesConn) SetReadDeadline(time.Time) error  { return nil }
func (c *bytesConn) SetWriteDeadline(time.Time) error { return nil }

// BenchmarkParseRequestHead is the codec's share of a request: finding
// the end of a typical head and parsing it.
func BenchmarkParseRequestHead(b *testing.B) {
	raw := []byte("GET /api/v1/items?limit=10 HTTP/1.1\r\nHost: echo.demo.svc.clusterset.local\r\nUser-Agent: Go-http-client/1.1\r\n" +
		"Accept: application/json\r\nAccept-Encoding: gzip\r\nX-Request-Id: 0f8fad5b-d9cb-469f-a165-70867728950e\r\n\r\n")
	var h h1Head
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := parseHead(raw, &h); err != nil {
			b.Fatal(err)
		}
	}
}

// FuzzParseResponseHead: a response head from an upstream (an app, or a
// peer that is not a sidecar) is either refused or read as net/http
// reads it: the same status, version and framing, every field net/http
// sees. The HTTP/2 header block the bridge makes of it (responseFields)
// is one RFC 9113 allows: lowercase token names, no connection-specific
// field, values without control characters or surrounding white space.
func FuzzParseResponseHead(f *testing.F) {
	for _, seed := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\n",
		"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
		"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
		"HTTP/1.1 204\r\nContent-Length: 0\r\n\r\n",
		"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
		"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
		"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\nTE: trailers\r\nUpgrade: h2c\r\n\r\n",
		"HTTP/1.1 999 \xff\r\nX: \x80\r\n\r\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		end, _, err := scanHead(raw, 0)
		if err != nil || end == 0 {
			return
		}
		head := raw[:end]
		b := h1Bridge{resp: new(h1Head)}
		h := b.resp
		if err := parseResponseHead(head, h); err != nil {
			var he *h1Error
			if !errors.As(err, &he) {
				t.Fatalf("unexpected error type %T: %v", err, err)
			}
			return
		}
		r, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(head)), &http.Request{Method: http.MethodGet})
		if err != nil {
			t.Fatalf("accepted %q, which net/http refuses: %v", head, err)
		}
		if r.StatusCode != h.status || r.ProtoMinor != int(h.minor) {
			t.Fatalf("%q: status %d HTTP/1.%d, net/http %d HTTP/1.%d", head, h.status, h.minor, r.StatusCode, r.ProtoMinor)
		}
		noBody, toClose, _ := h.responseBody(false)
		switch {
		case h.status < 200:
		case noBody:
			if r.ContentLength > 0 || len(r.TransferEncoding) > 0 {
				t.Fatalf("%q: no body, net/http length %d %v", head, r.ContentLength, r.TransferEncoding)
			}
		case h.chunked:
			if len(r.TransferEncoding) != 1 || r.TransferEncoding[0] != "chunked" {
				t.Fatalf("%q: chunked, net/http %v", head, r.TransferEncoding)
			}
		case toClose:
			if r.ContentLength != -1 || len(r.TransferEncoding) > 0 {
				t.Fatalf("%q: to the connection's end, net/http length %d %v", head, r.ContentLength, r.TransferEncoding)
			}
		default:
			if r.ContentLength != h.contentLength {
				t.Fatalf("%q: length %d, net/http %d", head, h.contentLength, r.ContentLength)
			}
		}
		for i := range h.fields {
			f := &h.fields[i]
			name, value := string(f.name.of(head)), string(f.value.of(head))
			if !slices.Contains(r.Header.Values(name), value) && f.kind != fieldTransferEncoding && f.kind != fieldContentLength {
				t.Fatalf("%q: field %q: %q, net/http %q", head, name, value, r.Header.Values(name))
			}
		}
		if h.status < 100 || h.status > 999 {
			t.Fatalf("%q: status %d", head, h.status)
		}
		fields := b.responseFields(head)
		if len(fields) == 0 || fields[0].Name != ":status" || fields[0].Value != strconv.Itoa(h.status) {
			t.Fatalf("%q: header block %v", head, fields)
		}
		for _, hf := range fields[1:] {
			if !validFieldName(hf.Name) || !httpguts.ValidHeaderFieldValue(hf.Value) || hf.Value != strings.Trim(hf.Value, " \t") {
				t.Fatalf("%q: field %q: %q in the HTTP/2 block", head, hf.Name, hf.Value)
			}
			switch hf.Name {
			case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade", "te":
				t.Fatalf("%q: connection-specific field %q in the HTTP/2 block", head, hf.Name)
			case "content-length":
				if h.chunked {
					t.Fatalf("%q: content-length beside chunked", head)
				}
			}
		}
	})
}
