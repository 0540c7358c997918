package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/isthmus-mesh/isthmus/internal/testlog"
)

var testIdentity = Identity{Pod: "echo-0", Namespace: "demo", Cluster: "a"}

const (
	clientXFCC = "By=spiffe://a.mesh/ns/demo/sa/echo;Hash=aa;Subject=\"\";URI=spiffe://b.mesh/ns/demo/sa/client"
	gwXFCC     = "By=spiffe://a.mesh/ns/demo/sa/echo;Hash=bb;URI=spiffe://a.mesh/ns/isthmus-system/sa/eastwest-gw"
)

type echoAddrs struct {
	http, grpc, tcp string
}

// startEcho serves cfg on three loopback listeners until the test ends, and
// checks it then shuts down cleanly.
func startEcho(t *testing.T, cfg Config) echoAddrs {
	t.Helper()
	ls := listeners{http: listenLoopback(t), grpc: listenLoopback(t), tcp: listenLoopback(t)}
	done := make(chan error, 1)
	go func() { done <- serve(t.Context(), testlog.New(t), cfg, ls) }()
	t.Cleanup(func() {
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(2 * shutdownTimeout):
			t.Error("echo did not stop")
		}
	})
	return echoAddrs{ls.http.Addr().String(), ls.grpc.Addr().String(), ls.tcp.Addr().String()}
}

func listenLoopback(t testing.TB) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	return ln
}

// acceptLoop runs handle on every connection ln accepts, and holds each
// open until the test ends, then closes them and ln.
func acceptLoop(t *testing.T, ln net.Listener, handle func(net.Conn)) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	t.Cleanup(func() {
		close(done)
		ln.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				handle(c)
				<-done
			})
		}
	})
}

// callCLI runs `echo call args…` and returns its replies, stderr and exit
// code.
func callCLI(t *testing.T, args ...string) ([]Reply, string, int) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := runCall(t.Context(), args, &stdout, &stderr)
	var replies []Reply
	dec := json.NewDecoder(&stdout)
	for dec.More() {
		var r Reply
		require.NoError(t, dec.Decode(&r), "stdout: %s", stdout.String())
		replies = append(replies, r)
	}
	return replies, stderr.String(), code
}

func TestCallEveryProtocol(t *testing.T) {
	addrs := startEcho(t, Config{Identity: testIdentity})
	who := func(r Reply) Reply {
		r.Pod, r.Namespace, r.Cluster = testIdentity.Pod, testIdentity.Namespace, testIdentity.Cluster
		return r
	}
	bigData := strings.Repeat("0123456789abcdef", 16<<10) // 256 KiB: more than socket buffers hold at once

	for _, tc := range []struct {
		name string
		args []string
		want []Reply // Remote is checked apart
	}{
		{name: "http1", args: []string{"--proto", "http1", "--target", addrs.http, "--path", "/hello"},
			want: []Reply{who(Reply{Method: "GET", Host: addrs.http, Path: "/hello", Proto: "HTTP/1.1"})}},
		{name: "http1 is the default, with host and caller", args: []string{"--target", addrs.http, "--host", "echo.demo.svc.clusterset.local", "--header", "X-Forwarded-Client-Cert: " + clientXFCC},
			want: []Reply{who(Reply{Method: "GET", Host: "echo.demo.svc.clusterset.local", Path: "/", Proto: "HTTP/1.1",
				XFCC: clientXFCC, CallerIdentity: "spiffe://b.mesh/ns/demo/sa/client"})}},
		{name: "h2c on the same port", args: []string{"--proto", "h2c", "--target", addrs.http, "--path", "/x"},
			want: []Reply{who(Reply{Method: "GET", Host: addrs.http, Path: "/x", Proto: "HTTP/2.0"})}},
		{name: "h2c, two XFCC lines: the last element names the caller", args: []string{"--proto", "h2c", "--target", addrs.http,
			"--header", "x-forwarded-client-cert: " + clientXFCC, "--header", "x-forwarded-client-cert: " + gwXFCC},
			want: []Reply{who(Reply{Method: "GET", Host: addrs.http, Path: "/", Proto: "HTTP/2.0",
				XFCC: clientXFCC + "," + gwXFCC, CallerIdentity: "spiffe://a.mesh/ns/isthmus-system/sa/eastwest-gw"})}},
		{name: "malformed XFCC is reported, not trusted", args: []string{"--proto", "http1", "--target", addrs.http,
			"--header", `X-Forwarded-Client-Cert: URI="spiffe://b.mesh/ns/demo/sa/client`},
			want: []Reply{who(Reply{Method: "GET", Host: addrs.http, Path: "/", Proto: "HTTP/1.1",
				XFCC:      `URI="spiffe://b.mesh/ns/demo/sa/client`,
				XFCCError: "malformed x-forwarded-client-cert: at byte 4: unterminated quoted value"})}},
		{name: "grpc unary", args: []string{"--proto", "grpc", "--target", addrs.grpc, "--host", "echo.demo:9090",
			"--header", "x-forwarded-client-cert: " + clientXFCC},
			want: []Reply{who(Reply{Method: "POST", Host: "echo.demo:9090", Path: "/isthmus.echo.v1.EchoService/Echo", Proto: "grpc",
				XFCC: clientXFCC, CallerIdentity: "spiffe://b.mesh/ns/demo/sa/client"})}},
		{name: "grpc stream", args: []string{"--proto", "grpc", "--target", addrs.grpc, "--stream", "3",
			"--header", "X-Forwarded-Client-Cert: " + gwXFCC},
			want: func() []Reply {
				var rs []Reply
				for i := range uint32(3) {
					rs = append(rs, who(Reply{Method: "POST", Host: addrs.grpc, Path: "/isthmus.echo.v1.EchoService/Stream", Proto: "grpc",
						XFCC: gwXFCC, CallerIdentity: "spiffe://a.mesh/ns/isthmus-system/sa/eastwest-gw", Seq: i + 1}))
				}
				return rs
			}()},
		{name: "tcp", args: []string{"--proto", "tcp", "--target", addrs.tcp},
			want: []Reply{who(Reply{Proto: "tcp"})}},
		{name: "tcp, nothing sent: half-close at once", args: []string{"--proto", "tcp", "--target", addrs.tcp, "--data", ""},
			want: []Reply{who(Reply{Proto: "tcp"})}},
		{name: "tcp, more than the buffers hold", args: []string{"--proto", "tcp", "--target", addrs.tcp, "--data", bigData},
			want: []Reply{who(Reply{Proto: "tcp"})}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			replies, stderr, code := callCLI(t, tc.args...)
			require.Equal(t, 0, code, "stderr: %s", stderr)
			require.Empty(t, stderr)
			require.Len(t, replies, len(tc.want))
			for i := range replies {
				host, _, err := net.SplitHostPort(replies[i].Remote)
				require.NoError(t, err, "remote %q", replies[i].Remote)
				require.Equal(t, "127.0.0.1", host)
				replies[i].Remote = ""
			}
			require.Equal(t, tc.want, replies)
		})
	}
}

func TestCallFlags(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		msg  string
	}{
		{"no target", nil, `--target "": want host:port`},
		{"unknown proto", []string{"--proto", "http3", "--target", "a:1"}, `--proto "http3": want http1, h2c, grpc or tcp`},
		{"stream over HTTP", []string{"--proto", "h2c", "--target", "a:1", "--stream", "2"}, "--stream does not apply to --proto h2c"},
		{"data over gRPC", []string{"--proto", "grpc", "--target", "a:1", "--data", "x"}, "--data does not apply to --proto grpc"},
		{"host over tcp", []string{"--proto", "tcp", "--target", "a:1", "--host", "x"}, "--host does not apply to --proto tcp"},
		{"path over gRPC", []string{"--proto", "grpc", "--target", "a:1", "--path", "/x"}, "--path does not apply to --proto grpc"},
		{"bad header", []string{"--target", "a:1", "--header", "no colon"}, `want "Name: value", got "no colon"`},
		{"relative path", []string{"--target", "a:1", "--path", "x"}, `--path "x": want a path starting with /`},
		{"too long a stream", []string{"--proto", "grpc", "--target", "a:1", "--stream", "1001"}, "--stream 1001: at most 1000"},
		{"no timeout", []string{"--target", "a:1", "--timeout", "0s"}, "--timeout 0s: want more than zero"},
		{"stray argument", []string{"--target", "a:1", "extra"}, `unexpected arguments ["extra"]`},
		{"several problems at once", []string{"--proto", "tcp", "--path", "/x"}, "--path does not apply to --proto tcp\n--target"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			replies, stderr, code := callCLI(t, tc.args...)
			require.Equal(t, usageExit, code)
			require.Contains(t, stderr, tc.msg)
			require.Empty(t, replies)
		})
	}
}

// What a call that cannot complete says, and that it ends in time.
func TestCallFailures(t *testing.T) {
	// A port nobody listens on.
	closed := listenLoopback(t)
	refused := closed.Addr().String()
	closed.Close()

	// A server that accepts and never says anything.
	silent := listenLoopback(t)
	acceptLoop(t, silent, func(c net.Conn) {})

	// An HTTP server that is not echo.
	unavailable := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "no healthy upstream", http.StatusServiceUnavailable)
	}))
	t.Cleanup(unavailable.Close)
	notEcho := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello") }))
	t.Cleanup(notEcho.Close)

	// A TCP echo that loses the half-close: it echoes but never closes.
	noClose := listenLoopback(t)
	acceptLoop(t, noClose, func(c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, `{"pod":"p","namespace":"n","proto":"tcp","remote":"x"}`+"\n")
		buf := make([]byte, 64)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return // EOF too: the half-close goes no further
			}
			c.Write(buf[:n])
		}
	})

	for _, tc := range []struct {
		name string
		args []string
		msg  string
	}{
		{"http1 refused", []string{"--proto", "http1", "--target", refused}, "connection refused"},
		{"h2c refused", []string{"--proto", "h2c", "--target", refused}, "connection refused"},
		{"grpc refused", []string{"--proto", "grpc", "--target", refused}, "connection refused"},
		{"tcp refused", []string{"--proto", "tcp", "--target", refused}, "connection refused"},
		{"http1 silent", []string{"--proto", "http1", "--target", silent.Addr().String(), "--timeout", "300ms"}, "context deadline exceeded"},
		{"h2c silent", []string{"--proto", "h2c", "--target", silent.Addr().String(), "--timeout", "300ms"}, "context deadline exceeded"},
		{"grpc silent", []string{"--proto", "grpc", "--target", silent.Addr().String(), "--timeout", "300ms"}, "DeadlineExceeded"},
		{"tcp silent", []string{"--proto", "tcp", "--target", silent.Addr().String(), "--timeout", "300ms"}, "read the hello line"},
		{"tcp half-close lost", []string{"--proto", "tcp", "--target", noClose.Addr().String(), "--timeout", "300ms"},
			"read the echo until the server closes, after 5 of 5 bytes"},
		{"http error status", []string{"--target", unavailable.Listener.Addr().String()}, `503 Service Unavailable: "no healthy upstream\n"`},
		{"http, not echo", []string{"--target", notEcho.Listener.Addr().String()}, `HTTP/1.1 reply "hello" is not echo's`},
		{"tcp, not echo", []string{"--proto", "tcp", "--target", unavailable.Listener.Addr().String(), "--timeout", "300ms"}, "read the hello line"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			replies, stderr, code := callCLI(t, tc.args...)
			require.Equal(t, 1, code)
			require.Contains(t, stderr, tc.msg)
			require.True(t, strings.HasPrefix(stderr, "echo call "), stderr)
			require.Empty(t, replies)
			require.Less(t, time.Since(start), 10*time.Second, "the call is bounded by --timeout")
		})
	}
}

func TestGRPCStreamBound(t *testing.T) {
	addrs := startEcho(t, Config{Identity: testIdentity})
	_, err := Call(t.Context(), CallConfig{Proto: "grpc", Target: addrs.grpc, Stream: maxStreamReplies + 1, Timeout: 10 * time.Second})
	require.Equal(t, codes.InvalidArgument, status.Code(err), "err: %v", err)
	require.ErrorContains(t, err, "count 1001 is more than 1000")
}

func TestCheckReplies(t *testing.T) {
	require.NoError(t, checkReplies(map[string][]string{repliesTrailer: {"3"}}, 3))
	require.ErrorContains(t, checkReplies(nil, 1), "trailer echo-replies: got [], want one value (trailers lost on the way?)")
	require.ErrorContains(t, checkReplies(map[string][]string{repliesTrailer: {"2"}}, 3), `trailer echo-replies: "2", want 3`)
	require.ErrorContains(t, checkReplies(map[string][]string{repliesTrailer: {"x"}}, 3), `trailer echo-replies: "x", want 3`)
}

// A TCP peer that goes quiet is closed after the idle timeout, and one that
// is still connected when echo stops is closed then.
func TestTCPBounds(t *testing.T) {
	t.Run("idle", func(t *testing.T) {
		addrs := startEcho(t, Config{Identity: testIdentity, IdleTimeout: 200 * time.Millisecond})
		conn, err := net.Dial("tcp", addrs.tcp)
		require.NoError(t, err)
		defer conn.Close()
		require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
		br := bufio.NewReader(conn)
		line, err := br.ReadBytes('\n')
		require.NoError(t, err)
		var hello Reply
		require.NoError(t, json.Unmarshal(line, &hello))
		require.Equal(t, "tcp", hello.Proto)
		require.Equal(t, conn.LocalAddr().String(), hello.Remote)
		_, err = br.ReadByte()
		require.ErrorIs(t, err, io.EOF, "echo closes a connection idle for longer than IdleTimeout")
	})

	t.Run("shutdown", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		ls := listeners{http: listenLoopback(t), tcp: listenLoopback(t)}
		done := make(chan error, 1)
		go func() { done <- serve(ctx, testlog.New(t), Config{Identity: testIdentity}, ls) }()
		conn, err := net.Dial("tcp", ls.tcp.Addr().String())
		require.NoError(t, err)
		defer conn.Close()
		require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
		br := bufio.NewReader(conn)
		_, err = br.ReadBytes('\n')
		require.NoError(t, err)
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(2 * shutdownTimeout):
			t.Fatal("echo did not stop")
		}
		_, err = br.ReadByte()
		require.ErrorIs(t, err, io.EOF, "the open connection is closed")
		_, err = net.DialTimeout("tcp", ls.tcp.Addr().String(), time.Second)
		require.Error(t, err, "the listener is closed")
	})
}

func TestRun(t *testing.T) {
	t.Run("invalid config", func(t *testing.T) {
		err := Run(t.Context(), testlog.New(t), Config{GRPCAddr: "nohost", IdleTimeout: -1})
		require.ErrorContains(t, err, "no HTTP address")
		require.ErrorContains(t, err, "gRPC address: address nohost: missing port in address")
		require.ErrorContains(t, err, "idle timeout -1ns is negative")
	})
	t.Run("a port in use", func(t *testing.T) {
		busy := listenLoopback(t)
		err := Run(t.Context(), testlog.New(t), Config{HTTPAddr: "127.0.0.1:0", TCPAddr: busy.Addr().String()})
		require.ErrorContains(t, err, "address already in use")
	})
	t.Run("serves until cancelled", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		defer cancel()
		require.NoError(t, Run(ctx, testlog.New(t), Config{HTTPAddr: "127.0.0.1:0", GRPCAddr: "127.0.0.1:0", TCPAddr: "127.0.0.1:0"}))
	})
}
