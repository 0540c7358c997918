package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"
)

// serveTCP runs the raw TCP echo until ctx ends, then closes the
// connections still open: a byte stream has no request to let finish.
func serveTCP(ctx context.Context, log *slog.Logger, cfg Config, ln net.Listener) error {
	log = log.With("component", "tcp")
	stopAccept := context.AfterFunc(ctx, func() { ln.Close() })
	defer stopAccept()

	var (
		wg sync.WaitGroup
		// mu guards conns and closed.
		mu     sync.Mutex
		conns  = map[net.Conn]struct{}{}
		closed bool
	)
	defer func() {
		mu.Lock()
		closed = true
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	}()

	backoff := 5 * time.Millisecond
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("tcp: %w", err)
			}
			// Out of file descriptors and the like: wait, as net/http does.
			log.Warn("accept", "err", err, "retry", backoff)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		mu.Lock()
		if closed {
			mu.Unlock()
			conn.Close()
			return nil
		}
		conns[conn] = struct{}{}
		mu.Unlock()
		wg.Go(func() {
			defer func() {
				mu.Lock()
				delete(conns, conn)
				mu.Unlock()
				conn.Close()
			}()
			if err := echoTCP(conn, cfg.Identity, cfg.IdleTimeout); err != nil {
				log.Debug("connection", "remote", conn.RemoteAddr(), "err", err)
			}
		})
	}
}

// echoTCP writes the hello line, then echoes what conn sends until it
// half-closes. Every read and write waits at most idle.
func echoTCP(conn net.Conn, id Identity, idle time.Duration) error {
	hello := id.reply(nil)
	hello.Proto, hello.Remote = "tcp", conn.RemoteAddr().String()
	line, err := json.Marshal(hello)
	if err != nil {
		return err
	}
	if err := conn.SetWriteDeadline(time.Now().Add(idle)); err != nil {
		return err
	}
	if _, err := conn.Write(append(line, '\n')); err != nil {
		return fmt.Errorf("write hello: %w", err)
	}
	buf := make([]byte, 32<<10)
	for {
		if err := conn.SetReadDeadline(time.Now().Add(idle)); err != nil {
			return err
		}
		n, rerr := conn.Read(buf)
		if n > 0 {
			if err := conn.SetWriteDeadline(time.Now().Add(idle)); err != nil {
				return err
			}
			if _, err := conn.Write(buf[:n]); err != nil {
				return fmt.Errorf("echo: %w", err)
			}
		}
		if errors.Is(rerr, io.EOF) {
			return nil // the client half-closed: the deferred Close answers it
		}
		if rerr != nil {
			return fmt.Errorf("read: %w", rerr)
		}
	}
}
