package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/isthmus-mesh/isthmus/test/echo/echopb"
)

// CallConfig is one `echo call`.
type CallConfig struct {
	// Proto is http1, h2c, grpc or tcp.
	Proto string
	// Target is the host:port to connect to.
	Target string
	// Host is the Host header or :authority; empty means Target.
	Host string
	// Path is the HTTP request path.
	Path string
	// Headers are sent as HTTP headers or gRPC metadata.
	Headers http.Header
	// Stream, for gRPC, calls Stream for this many replies; zero calls Echo.
	Stream uint
	// Data is what a tcp call sends before half-closing.
	Data string
	// Timeout bounds the whole call.
	Timeout time.Duration
}

const (
	// maxReplyBytes bounds a reply read from the network.
	maxReplyBytes = 1 << 20
	// maxHelloBytes bounds the tcp hello line.
	maxHelloBytes = 64 << 10
	// usageExit is the exit code for bad flags.
	usageExit = 2
)

// runCall is `echo call ARGS`: it returns the exit code.
func runCall(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cfg, err := parseCall(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "echo call:", err)
		return usageExit
	}
	replies, err := Call(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "echo call %s %s: %v\n", cfg.Proto, cfg.Target, err)
		return 1
	}
	enc := json.NewEncoder(stdout)
	for _, r := range replies {
		if err := enc.Encode(r); err != nil {
			fmt.Fprintln(stderr, "echo call: write reply:", err)
			return 1
		}
	}
	return 0
}

func parseCall(args []string, stderr io.Writer) (CallConfig, error) {
	cfg := CallConfig{Headers: http.Header{}}
	fs := flag.NewFlagSet("echo call", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: echo call --proto http1|h2c|grpc|tcp --target host:port [flags]\n\n"+
			"Makes one call and prints the reply as JSON, one line per reply.\nFlags:")
		fs.PrintDefaults()
	}
	fs.StringVar(&cfg.Proto, "proto", "http1", "http1, h2c, grpc or tcp")
	fs.StringVar(&cfg.Target, "target", "", "host:port to connect to (required)")
	fs.StringVar(&cfg.Host, "host", "", "Host header (HTTP) or :authority (gRPC); default: the target")
	fs.StringVar(&cfg.Path, "path", "/", "request path (HTTP)")
	fs.Func("header", `"Name: value" to send as an HTTP header or gRPC metadata; repeatable`, func(s string) error {
		name, value, ok := strings.Cut(s, ":")
		name = strings.TrimSpace(name)
		if !ok || name == "" || strings.ContainsAny(name, " \t") {
			return fmt.Errorf("want \"Name: value\", got %q", s)
		}
		cfg.Headers.Add(name, strings.TrimSpace(value))
		return nil
	})
	fs.UintVar(&cfg.Stream, "stream", 0, "gRPC: call Stream for this many replies instead of Echo")
	fs.StringVar(&cfg.Data, "data", "ping\n", "tcp: bytes to send before half-closing")
	fs.DurationVar(&cfg.Timeout, "timeout", 10*time.Second, "bound on the whole call")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var errs []error
	only := func(flag string, protos ...string) {
		for _, p := range protos {
			if cfg.Proto == p {
				return
			}
		}
		if set[flag] {
			errs = append(errs, fmt.Errorf("--%s does not apply to --proto %s", flag, cfg.Proto))
		}
	}
	switch cfg.Proto {
	case "http1", "h2c", "grpc", "tcp":
		only("host", "http1", "h2c", "grpc")
		only("path", "http1", "h2c")
		only("header", "http1", "h2c", "grpc")
		only("stream", "grpc")
		only("data", "tcp")
	default:
		errs = append(errs, fmt.Errorf("--proto %q: want http1, h2c, grpc or tcp", cfg.Proto))
	}
	if _, _, err := net.SplitHostPort(cfg.Target); err != nil {
		errs = append(errs, fmt.Errorf("--target %q: want host:port", cfg.Target))
	}
	if !strings.HasPrefix(cfg.Path, "/") {
		errs = append(errs, fmt.Errorf("--path %q: want a path starting with /", cfg.Path))
	}
	if cfg.Stream > maxStreamReplies {
		errs = append(errs, fmt.Errorf("--stream %d: at most %d", cfg.Stream, maxStreamReplies))
	}
	if cfg.Timeout <= 0 {
		errs = append(errs, fmt.Errorf("--timeout %v: want more than zero", cfg.Timeout))
	}
	return cfg, errors.Join(errs...)
}

// Call makes the call cfg describes and returns what the server replied,
// after checking the reply crossed whole (trailers, stream, echoed bytes).
func Call(ctx context.Context, cfg CallConfig) ([]Reply, error) {
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	switch cfg.Proto {
	case "http1", "h2c":
		r, err := callHTTP(ctx, cfg)
		return []Reply{r}, err
	case "grpc":
		return callGRPC(ctx, cfg)
	case "tcp":
		r, err := callTCP(ctx, cfg)
		return []Reply{r}, err
	}
	return nil, fmt.Errorf("unknown proto %q", cfg.Proto)
}

func callHTTP(ctx context.Context, cfg CallConfig) (Reply, error) {
	var protocols http.Protocols
	if cfg.Proto == "h2c" {
		// Only unencrypted HTTP/2 on http:// URLs: prior knowledge, no
		// Upgrade.
		protocols.SetUnencryptedHTTP2(true)
	} else {
		protocols.SetHTTP1(true)
	}
	tr := &http.Transport{ // no Proxy: the call goes where --target says
		DialContext:            (&net.Dialer{}).DialContext,
		Protocols:              &protocols,
		DisableKeepAlives:      true,
		MaxResponseHeaderBytes: 64 << 10,
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+cfg.Target+cfg.Path, nil)
	if err != nil {
		return Reply{}, err
	}
	for name, values := range cfg.Headers {
		req.Header[name] = values
	}
	if cfg.Host != "" {
		req.Host = cfg.Host
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return Reply{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxReplyBytes+1))
	if err != nil {
		return Reply{}, fmt.Errorf("read the body of %s: %w", resp.Status, err)
	}
	if resp.StatusCode != http.StatusOK {
		return Reply{}, fmt.Errorf("%s %s: %q", resp.Proto, resp.Status, snippet(body))
	}
	if len(body) > maxReplyBytes {
		return Reply{}, fmt.Errorf("reply longer than %d bytes", maxReplyBytes)
	}
	var r Reply
	if err := json.Unmarshal(body, &r); err != nil {
		return Reply{}, fmt.Errorf("%s reply %q is not echo's: %w", resp.Proto, snippet(body), err)
	}
	return r, nil
}

func snippet(b []byte) string {
	if len(b) > 512 {
		return string(b[:512]) + "…"
	}
	return string(b)
}

func callGRPC(ctx context.Context, cfg CallConfig) ([]Reply, error) {
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithNoProxy(), // the call goes where --target says
	}
	if cfg.Host != "" {
		opts = append(opts, grpc.WithAuthority(cfg.Host))
	}
	// passthrough: dial the target as given, like the other protocols.
	cc, err := grpc.NewClient("passthrough:///"+cfg.Target, opts...)
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	md := metadata.MD{}
	for name, values := range cfg.Headers {
		md.Append(name, values...) // lower-cases name
	}
	ctx = metadata.NewOutgoingContext(ctx, md)
	client := echopb.NewEchoServiceClient(cc)

	if cfg.Stream == 0 {
		var trailer metadata.MD
		resp, err := client.Echo(ctx, &echopb.EchoRequest{}, grpc.Trailer(&trailer))
		if err != nil {
			return nil, fmt.Errorf("Echo: %w", err)
		}
		if err := checkReplies(trailer, 1); err != nil {
			return nil, fmt.Errorf("Echo: %w", err)
		}
		return []Reply{replyFromProto(resp.GetReply())}, nil
	}

	stream, err := client.Stream(ctx, &echopb.StreamRequest{Count: uint32(cfg.Stream)})
	if err != nil {
		return nil, fmt.Errorf("Stream: %w", err)
	}
	var replies []Reply
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("Stream, after %d replies: %w", len(replies), err)
		}
		r := replyFromProto(resp.GetReply())
		if want := uint32(len(replies) + 1); r.Seq != want || len(replies) == int(cfg.Stream) {
			return nil, fmt.Errorf("Stream: reply number %d, want %d of %d", r.Seq, want, cfg.Stream)
		}
		replies = append(replies, r)
	}
	if len(replies) != int(cfg.Stream) {
		return nil, fmt.Errorf("Stream: %d replies, want %d", len(replies), cfg.Stream)
	}
	if err := checkReplies(stream.Trailer(), cfg.Stream); err != nil {
		return nil, fmt.Errorf("Stream: %w", err)
	}
	return replies, nil
}

// checkReplies checks the trailer that counts the replies the server sent.
func checkReplies(trailer metadata.MD, want uint) error {
	got := trailer.Get(repliesTrailer)
	if len(got) != 1 {
		return fmt.Errorf("trailer %s: got %q, want one value (trailers lost on the way?)", repliesTrailer, got)
	}
	if n, err := strconv.ParseUint(got[0], 10, 32); err != nil || uint(n) != want {
		return fmt.Errorf("trailer %s: %q, want %d", repliesTrailer, got[0], want)
	}
	return nil
}

func callTCP(ctx context.Context, cfg CallConfig) (Reply, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", cfg.Target)
	if err != nil {
		return Reply{}, err
	}
	defer conn.Close()
	// Every read and write ends at the call's deadline, or when ctx is
	// cancelled earlier.
	deadline, _ := ctx.Deadline()
	if err := conn.SetDeadline(deadline); err != nil {
		return Reply{}, err
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	// The hello line fits in br's buffer, or it is not echo's.
	br := bufio.NewReaderSize(conn, maxHelloBytes)
	line, err := br.ReadSlice('\n')
	if err != nil {
		return Reply{}, fmt.Errorf("read the hello line: %w", err)
	}
	var hello Reply
	if err := json.Unmarshal(line, &hello); err != nil {
		return Reply{}, fmt.Errorf("hello line %q is not echo's: %w", snippet(line), err)
	}

	// Send while reading, so neither side blocks on a full buffer.
	sent := make(chan error, 1)
	go func() {
		_, err := io.WriteString(conn, cfg.Data)
		if err == nil {
			err = conn.(*net.TCPConn).CloseWrite()
		}
		sent <- err
	}()
	echoed, rerr := io.ReadAll(io.LimitReader(br, int64(len(cfg.Data))+1))
	if err := <-sent; err != nil {
		return Reply{}, fmt.Errorf("send %d bytes and half-close: %w", len(cfg.Data), err)
	}
	if rerr != nil {
		return Reply{}, fmt.Errorf("read the echo until the server closes, after %d of %d bytes: %w", len(echoed), len(cfg.Data), rerr)
	}
	if string(echoed) != cfg.Data {
		return Reply{}, fmt.Errorf("echoed %q, want %q", snippet(echoed), snippet([]byte(cfg.Data)))
	}
	return hello, nil
}
