package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"
)

// Reply is what echo answers with, as JSON over HTTP and TCP and as
// echopb.Reply over gRPC; `echo call` prints it as JSON whatever the
// protocol.
type Reply struct {
	Pod       string `json:"pod"`
	Namespace string `json:"namespace"`
	Cluster   string `json:"cluster,omitempty"`
	Method    string `json:"method,omitempty"`
	Host      string `json:"host,omitempty"`
	Path      string `json:"path,omitempty"`
	// Proto is what the server saw: HTTP/1.1, HTTP/2.0, grpc or tcp.
	Proto string `json:"proto"`
	// XFCC is the X-Forwarded-Client-Cert header (gRPC: metadata) as
	// received, several lines joined with ",".
	XFCC string `json:"xfcc,omitempty"`
	// CallerIdentity is the SPIFFE ID in the URI of XFCC's last element.
	CallerIdentity string `json:"callerIdentity,omitempty"`
	// XFCCError says why XFCC did not parse.
	XFCCError string `json:"xfccError,omitempty"`
	Remote    string `json:"remote"`
	// Seq numbers a gRPC stream's replies from 1.
	Seq uint32 `json:"seq,omitempty"`
}

// Identity is who this echo says it is.
type Identity struct {
	Pod, Namespace, Cluster string
}

// reply starts a Reply from id and the XFCC values received.
func (id Identity) reply(xfcc []string) Reply {
	r := Reply{Pod: id.Pod, Namespace: id.Namespace, Cluster: id.Cluster, XFCC: strings.Join(xfcc, ",")}
	caller, err := CallerIdentity(r.XFCC)
	if err != nil {
		r.XFCCError = err.Error()
	}
	r.CallerIdentity = caller
	return r
}

// Config is what echo serves.
type Config struct {
	// HTTPAddr serves HTTP/1.1 and h2c. Required.
	HTTPAddr string
	// GRPCAddr serves EchoService; empty for none.
	GRPCAddr string
	// TCPAddr serves the raw TCP echo; empty for none.
	TCPAddr string
	// Identity is reported in every reply.
	Identity Identity
	// IdleTimeout bounds every wait for a peer: a TCP echo read, an idle
	// HTTP keep-alive connection, an HTTP/2 or gRPC ping. Zero means 30 s.
	IdleTimeout time.Duration
}

const (
	defaultIdleTimeout = 30 * time.Second
	// shutdownTimeout bounds how long calls in flight may finish once the
	// context ends.
	shutdownTimeout = 5 * time.Second
)

// Validate reports every problem with c at once.
func (c Config) Validate() error {
	var errs []error
	if c.HTTPAddr == "" {
		errs = append(errs, errors.New("no HTTP address"))
	}
	for _, a := range []struct{ name, addr string }{{"HTTP", c.HTTPAddr}, {"gRPC", c.GRPCAddr}, {"TCP", c.TCPAddr}} {
		if a.addr == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a.addr); err != nil {
			errs = append(errs, fmt.Errorf("%s address: %w", a.name, err))
		}
	}
	if c.IdleTimeout < 0 {
		errs = append(errs, fmt.Errorf("idle timeout %v is negative", c.IdleTimeout))
	}
	return errors.Join(errs...)
}

// listeners are echo's sockets; a nil one is not served.
type listeners struct {
	http, grpc, tcp net.Listener
}

// Run listens on every address of cfg, then serves until ctx ends. It
// returns nil after a clean shutdown.
func Run(ctx context.Context, log *slog.Logger, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	var ls listeners
	var lc net.ListenConfig
	for _, l := range []struct {
		addr string
		dst  *net.Listener
	}{{cfg.HTTPAddr, &ls.http}, {cfg.GRPCAddr, &ls.grpc}, {cfg.TCPAddr, &ls.tcp}} {
		if l.addr == "" {
			continue
		}
		ln, err := lc.Listen(ctx, "tcp", l.addr)
		if err != nil {
			ls.close()
			return err
		}
		*l.dst = ln
	}
	log.Info("echo listening", "http", addrOf(ls.http), "grpc", addrOf(ls.grpc), "tcp", addrOf(ls.tcp),
		"pod", cfg.Identity.Pod, "namespace", cfg.Identity.Namespace, "cluster", cfg.Identity.Cluster)
	return serve(ctx, log, cfg, ls)
}

func (ls listeners) close() {
	for _, ln := range []net.Listener{ls.http, ls.grpc, ls.tcp} {
		if ln != nil {
			ln.Close()
		}
	}
}

func addrOf(ln net.Listener) string {
	if ln == nil {
		return ""
	}
	return ln.Addr().String()
}

// serve serves on ls, which it closes, until ctx ends or a server fails.
func serve(ctx context.Context, log *slog.Logger, cfg Config, ls listeners) error {
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = defaultIdleTimeout
	}
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return serveHTTP(ctx, log, cfg, ls.http) })
	if ls.grpc != nil {
		g.Go(func() error { return serveGRPC(ctx, cfg, ls.grpc) })
	}
	if ls.tcp != nil {
		g.Go(func() error { return serveTCP(ctx, log, cfg, ls.tcp) })
	}
	return g.Wait()
}

func serveHTTP(ctx context.Context, log *slog.Logger, cfg Config, ln net.Listener) error {
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{
		Handler:           httpHandler(cfg.Identity),
		Protocols:         &protocols,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       cfg.IdleTimeout,
		WriteTimeout:      cfg.IdleTimeout,
		IdleTimeout:       cfg.IdleTimeout,
		MaxHeaderBytes:    64 << 10,
		HTTP2:             &http.HTTP2Config{SendPingTimeout: cfg.IdleTimeout, PingTimeout: 10 * time.Second},
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return fmt.Errorf("http: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	<-served
	return nil
}

func httpHandler(id Identity) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reply := id.reply(r.Header.Values("X-Forwarded-Client-Cert"))
		reply.Method, reply.Host, reply.Path, reply.Proto, reply.Remote = r.Method, r.Host, r.URL.Path, r.Proto, r.RemoteAddr
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(reply)
	})
}
