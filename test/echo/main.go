// Command echo is the small workload that Isthmus's tests and demo run as
// pods: it answers every HTTP request with who it is (pod, namespace,
// cluster) and what it was sent (method, host, path, and the
// X-Forwarded-Client-Cert header a sidecar passes on).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// Reply is the JSON body echo answers with.
type Reply struct {
	Pod       string `json:"pod"`
	Namespace string `json:"namespace"`
	Cluster   string `json:"cluster,omitempty"`
	Method    string `json:"method"`
	Host      string `json:"host"`
	Path      string `json:"path"`
	Proto     string `json:"proto"`
	XFCC      string `json:"xfcc,omitempty"`
	Remote    string `json:"remote"`
}

func main() {
	addr := flag.String("listen", net.JoinHostPort(os.Getenv("POD_IP"), "8080"), "address to listen on")
	cluster := flag.String("cluster", os.Getenv("CLUSTER_NAME"), "cluster name to report")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))

	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(Reply{
			Pod: os.Getenv("POD_NAME"), Namespace: os.Getenv("POD_NAMESPACE"), Cluster: *cluster,
			Method: r.Method, Host: r.Host, Path: r.URL.Path, Proto: r.Proto,
			XFCC: r.Header.Get("X-Forwarded-Client-Cert"), Remote: r.RemoteAddr,
		})
	})
	srv := &http.Server{Addr: *addr, Handler: handler, ReadHeaderTimeout: 5 * time.Second, IdleTimeout: time.Minute}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	log.Info("echo listening", "addr", *addr)
	if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(os.Stderr, "echo:", err)
		os.Exit(1)
	}
}
