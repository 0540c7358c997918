// Package hostport checks the host:port addresses a process is given
// (flags, configuration) before it acts on any: net.Listen and the
// dialers would refuse a port out of range only once the process has
// written objects or fetched credentials, and gRPC dials a port-less
// target at 443 and retries for ever.
package hostport

import (
	"errors"
	"fmt"
	"net"
	"strconv"
)

// CheckListen checks an address to listen on: host:port, the host may be
// empty (every address), the port a number from 0 (any free port) to
// 65535.
func CheckListen(a string) error {
	_, port, err := net.SplitHostPort(a)
	if err != nil {
		return err
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("port %q is not a number from 0 to 65535", port)
	}
	return nil
}

// CheckDial checks an address to dial: host:port with a host, and a
// port from 1 to 65535.
func CheckDial(a string) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil {
		return fmt.Errorf("want host:port: %w", err)
	}
	if host == "" {
		return errors.New("want host:port: no host")
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		return fmt.Errorf("port %q is not a number from 1 to 65535", port)
	}
	return nil
}
