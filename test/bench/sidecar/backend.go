package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// runBackend is the app behind the server-side sidecar, run as a child
// process (`sidecar backend --listen ADDR ... --body N`): HTTP/1.1 and h2c
// (prior knowledge) on every address, answering every request 200 with
// a body of N bytes, as cheaply as net/http allows so the proxies' cost
// stands out.
func runBackend(args []string) error {
	fs := flag.NewFlagSet("backend", flag.ExitOnError)
	var listen listFlag
	fs.Var(&listen, "listen", "address to serve on (repeatable)")
	size := fs.Int("body", 64, "response body size (bytes)")
	_ = fs.Parse(args)
	if len(listen) == 0 {
		return errors.New("backend: no --listen address")
	}
	body := []byte(strings.Repeat("x", max(*size-1, 0)) + "\n")[:*size]
	length := strconv.Itoa(len(body))
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	srv := &http.Server{
		Protocols:         &protos,
		ReadHeaderTimeout: 10 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			h := w.Header()
			h["Content-Type"] = []string{"text/plain"}
			h["Content-Length"] = []string{length}
			_, _ = w.Write(body)
		}),
	}
	errc := make(chan error, len(listen))
	for _, a := range listen {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			return err
		}
		go func() { errc <- srv.Serve(ln) }()
	}
	fmt.Println("backend serving on", strings.Join(listen, " "))
	return <-errc
}

// listFlag is a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }
