package sidecar

import (
	"encoding/xml"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// ipH2Spec is b's app behind TestH2Spec's service.
var ipH2Spec = netip.MustParseAddr("127.0.0.12")

// h2specKnown are the h2spec cases the sidecar fails on purpose, by
// package and description, and why.
var h2specKnown = map[[2]string]string{
	{"http2/3.5", "Sends invalid connection preface"}: "the outbound listener serves HTTP/1.1 and HTTP/2 on one port, as Envoy's codec AUTO: " +
		"a connection that does not open with the preface is HTTP/1.1, and garbage gets a 400 before the close",
}

// TestH2Spec runs h2spec, the HTTP/2 conformance suite (make tools puts
// it in bin/), against the sidecar's own HTTP/2 server as a captured app
// reaches it: h2c to a's outbound, on to b and its app, which reads each
// request whole before it answers. Every case passes but those in
// h2specKnown. The cases send what no client should: frames on idle and
// closed streams, bodies that do not add up to their content-length,
// pseudo-headers in trailers, streams that depend on themselves.
func TestH2Spec(t *testing.T) {
	bin := h2specBinary(t)
	// h2spec names the authority after the address it dials, so the
	// service's virtual IP is the loopback address it dials: the
	// relay below hands each of its connections to a's outbound as a
	// captured connection to that address.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := ln.Addr().(*net.TCPAddr).Port
	specSvc := svc{name: "h2spec", ns: "demo", vip: "127.0.0.1", ports: []svcPort{{uint32(port), true}}, upstream: xdsclient.UpstreamHTTP2}
	m := &mesh{alpha: newTestCA(t, "alpha.mesh"), beta: newTestCA(t, "beta.mesh"), xds: startXDSServer(t), hosts: hostsOf(specSvc)}
	m.a = startPod(t, "a", m.alpha, m.hosts, podOptions{xds: m.xds})
	m.b = startPod(t, "b", m.beta, m.hosts, podOptions{xds: m.xds})
	m.b.apps[ipH2Spec] = serveApp(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, err := io.Copy(io.Discard, r.Body)
		if err != nil {
			return
		}
		_, _ = io.WriteString(w, "read "+strconv.FormatInt(n, 10)+" bytes\n")
	}))
	m.set(t, "v1", m.onB(specSvc, ipH2Spec))

	var wg sync.WaitGroup
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { relayCaptured(t, m.a.nat, c, ln.Addr().String()) })
		}
	})

	report := filepath.Join(t.TempDir(), "h2spec.xml")
	out, err := exec.CommandContext(t.Context(), bin, "-h", "127.0.0.1", "-p", strconv.Itoa(port), "-o", "5", "-S", "-j", report).CombinedOutput()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("h2spec: %v\n%s", err, out)
	}
	cases := readH2specReport(t, report)
	require.Greater(t, len(cases), 100, "h2spec ran its cases:\n%s", out)
	for _, c := range cases {
		key := [2]string{c.pkg, c.desc}
		switch why, known := h2specKnown[key]; {
		case c.skipped:
			t.Errorf("h2spec %s %q was skipped", c.pkg, c.desc)
		case c.failure != "" && !known:
			t.Errorf("h2spec %s %q failed:\n%s", c.pkg, c.desc, c.failure)
		case c.failure != "":
			t.Logf("h2spec %s %q fails, as expected: %s", c.pkg, c.desc, why)
		case known:
			t.Errorf("h2spec %s %q passes: take it out of h2specKnown", c.pkg, c.desc)
		}
	}
}

// relayCaptured carries c, an h2spec connection, to nat's sidecar as a
// connection the app made to dst, and back, passing each half-close on.
func relayCaptured(t *testing.T, nat *testNAT, c net.Conn, dst string) {
	defer c.Close()
	up, err := nat.dial(t.Context(), dst)
	if err != nil {
		return
	}
	defer up.Close()
	var wg sync.WaitGroup
	wg.Go(func() {
		_, _ = io.Copy(up, c)
		_ = up.(*net.TCPConn).CloseWrite()
	})
	_, _ = io.Copy(c, up)
	_ = c.(*net.TCPConn).CloseWrite()
	wg.Wait()
}

// h2specBinary is bin/h2spec at the module's root (make tools), or
// $ISTHMUS_H2SPEC. Without it the test fails under CI (make test
// installs it) and is skipped elsewhere.
func h2specBinary(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("ISTHMUS_H2SPEC")
	if bin == "" {
		bin = filepath.Join("..", "..", "bin", "h2spec")
	}
	if _, err := os.Stat(bin); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("h2spec not found at %s (make tools installs it): %v", bin, err)
		}
		t.Skipf("h2spec not found at %s: run make tools, or set ISTHMUS_H2SPEC", bin)
	}
	abs, err := filepath.Abs(bin)
	require.NoError(t, err)
	return abs
}

// h2specCase is one case of an h2spec JUnit report.
type h2specCase struct {
	pkg, desc string
	failure   string
	skipped   bool
}

func readH2specReport(t *testing.T, path string) []h2specCase {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err, "h2spec wrote no report")
	var r struct {
		Suites []struct {
			Cases []struct {
				Package   string `xml:"package,attr"`
				ClassName string `xml:"classname,attr"`
				// h2spec reports a case that did not pass as an error
				// (what came instead of what the spec asks), or a failure.
				Errors  []string  `xml:"error"`
				Failure []string  `xml:"failure"`
				Skipped *struct{} `xml:"skipped"`
			} `xml:"testcase"`
		} `xml:"testsuite"`
	}
	require.NoError(t, xml.Unmarshal(b, &r))
	var cases []h2specCase
	for _, s := range r.Suites {
		for _, c := range s.Cases {
			hc := h2specCase{pkg: c.Package, desc: c.ClassName, skipped: c.Skipped != nil,
				failure: strings.Join(append(c.Errors, c.Failure...), "\n")}
			cases = append(cases, hc)
		}
	}
	return cases
}
