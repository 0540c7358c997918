package capture

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

// helperEnv makes the test binary act as a client (the app, or the
// sidecar) instead of running tests: tests start it inside a pod's
// namespace with another uid, which iptables' owner match sees.
const helperEnv = "ISTHMUS_CAPTURE_TEST_CLIENT"

// clientTimeout bounds everything the helper client does.
const clientTimeout = 10 * time.Second

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode != "" {
		if err := client(mode, os.Args[1:]); err != nil {
			fmt.Fprintln(os.Stderr, "client:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// client sends msg to addr and prints the answer and where it came from:
//
//	tcp <addr> <msg>  sends "<msg>\n", prints "reply <line>"
//	udp <addr> <msg>  sends a DNS query with msg as its name, prints
//	                  "reply <answer's name> from <source>"
func client(mode string, args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("want <addr> <msg>, got %q", args)
	}
	addr, msg := args[0], args[1]
	ctx, cancel := context.WithTimeout(context.Background(), clientTimeout)
	defer cancel()
	switch mode {
	case "tcp":
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		if err := c.SetDeadline(time.Now().Add(clientTimeout)); err != nil {
			return err
		}
		if _, err := fmt.Fprintf(c, "%s\n", msg); err != nil {
			return err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return fmt.Errorf("read reply: %w", err)
		}
		fmt.Printf("reply %s\n", strings.TrimSpace(line))
		return nil
	case "udp":
		dst, err := net.ResolveUDPAddr("udp", addr)
		if err != nil {
			return err
		}
		// Unconnected, so the reply's source shows.
		pc, err := net.ListenPacket("udp", ":0")
		if err != nil {
			return err
		}
		defer pc.Close()
		if err := pc.SetDeadline(time.Now().Add(clientTimeout)); err != nil {
			return err
		}
		const id = 0x1234
		if _, err := pc.WriteTo(dnsQuery(id, msg), dst); err != nil {
			return err
		}
		buf := make([]byte, 512)
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return fmt.Errorf("read reply: %w", err)
		}
		gotID, name, err := parseDNSName(buf[:n])
		if err != nil {
			return err
		}
		if gotID != id {
			return fmt.Errorf("reply has id %#x, want %#x", gotID, id)
		}
		fmt.Printf("reply %s from %s\n", name, from)
		return nil
	}
	return fmt.Errorf("unknown mode %q", mode)
}

// dnsQuery is a minimal DNS query (RFC 1035): a header with one question,
// name.test. IN A.
func dnsQuery(id uint16, name string) []byte {
	b := binary.BigEndian.AppendUint16(nil, id)
	b = append(b, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0) // RD; QDCOUNT 1
	for _, label := range strings.Split(name+".test", ".") {
		b = append(b, byte(len(label)))
		b = append(b, label...)
	}
	b = append(b, 0)
	return append(b, 0, 1, 0, 1) // A, IN
}

// parseDNSName returns the id and the first label of the first question
// of a message made by dnsQuery (or echoed from one).
func parseDNSName(b []byte) (uint16, string, error) {
	if len(b) < 13 || int(b[12]) > len(b)-13 {
		return 0, "", errors.New("short DNS message")
	}
	return binary.BigEndian.Uint16(b), string(b[13 : 13+b[12]]), nil
}
