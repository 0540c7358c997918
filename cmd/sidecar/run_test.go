package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	mdns "github.com/miekg/dns"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/internal/fedtest"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/xds"
)

// Bad flags are refused before anything is dialled, every problem at once.
func TestRunRefusesBadFlags(t *testing.T) {
	t.Setenv("CLUSTER_NAME", "")
	t.Setenv("POD_IP", "")
	t.Setenv("POD_NAME", "")
	_, _, err := execute(t.Context(), "run", "--max-connections", "0", "--outbound-addr", "nonsense", "--concurrency", "-1")
	require.Error(t, err)
	for _, want := range []string{"--cluster-name", "max connections", "outbound address", "--concurrency -1"} {
		require.ErrorContains(t, err, want)
	}
}

// A listen address whose port is out of range is refused before the CA
// is dialled, not after an SVID was obtained.
func TestRunRefusesListenPortsOutOfRange(t *testing.T) {
	_, _, err := execute(t.Context(), "run", "--cluster-name", "alpha", "--pod-ip", "10.0.0.9", "--pod-name", "web-0",
		"--outbound-addr", "127.0.0.1:99999", "--inbound-addr", ":-1", "--admin-addr", "127.0.0.1:http",
		"--health-addr", "[::1]:65536", "--dns-addr", "127.0.0.1:70000")
	for _, want := range []string{
		`outbound address "127.0.0.1:99999": port "99999" is not a number from 0 to 65535`,
		`inbound address ":-1": port "-1"`,
		`admin address "127.0.0.1:http": port "http"`,
		`health address "[::1]:65536": port "65536"`,
		`--dns-addr "127.0.0.1:70000": port "70000"`,
	} {
		require.ErrorContains(t, err, want)
	}
}

// A port-less or out-of-range --xds-address or --ca-address is refused
// before the CA is dialled, naming the flag, instead of gRPC dialling 443
// and retrying for ever.
func TestRunRefusesBadFederatorAddresses(t *testing.T) {
	_, _, err := execute(t.Context(), "run", "--cluster-name", "alpha", "--pod-ip", "10.0.0.9", "--pod-name", "web-0",
		"--xds-address", "isthmus-federator.isthmus-system.svc", "--ca-address", "10.0.0.1:99999")
	require.ErrorContains(t, err, `--xds-address "isthmus-federator.isthmus-system.svc": want host:port`)
	require.ErrorContains(t, err, `--ca-address "10.0.0.1:99999": port "99999" is not a number from 1 to 65535`)
}

// --concurrency sets GOMAXPROCS: its default 1 unless the environment
// sets GOMAXPROCS, a value given always, 0 never.
func TestProcsFor(t *testing.T) {
	for _, tc := range []struct {
		concurrency int
		given, env  bool
		want        int
	}{
		{1, false, false, 1},
		{1, false, true, 0},
		{2, true, true, 2},
		{4, true, false, 4},
		{0, true, false, 0},
	} {
		require.Equal(t, tc.want, procsFor(tc.concurrency, tc.given, tc.env), "%+v", tc)
	}
}

// freePort is a port free on host, for a listener the command under
// test opens later. On a loopback address of the test's own only a
// wildcard bind can take it meanwhile: a connection to 127.0.0.0/8 takes
// its source port on 127.0.0.1.
func freePort(t *testing.T, host string) string {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	require.NoError(t, err)
	defer ln.Close()
	return ln.Addr().String()
}

// `sidecar run` against a federator's CA and xDS (the federator's own
// translation of a catalog, served by go-control-plane): it gets its
// SVID, adopts the configuration, becomes ready, answers the clusterset
// name from the xDS name table over DNS, and exits cleanly when its
// context ends.
func TestRun(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("alpha.mesh")
	caLn, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	authority, err := fedtest.StartCA(t.Context(), caLn, td, fedtest.Tokens{"tok": {Namespace: "demo", ServiceAccount: "web"}})
	require.NoError(t, err)
	t.Cleanup(authority.Close)

	// The federator's translation of one exported HTTP service.
	local, err := catalog.NewSnapshot(catalog.LocalSource, []catalog.Service{{
		Namespace: "demo", Name: "echo", Cluster: "alpha",
		Ports:      []catalog.Port{{Name: "http", Port: 80, Protocol: catalog.ProtocolTCP, TargetPort: 8080}},
		Endpoints:  []catalog.LocalityEndpoints{{Locality: catalog.Locality{Region: "r1", Zone: "z1"}, Ready: 1, Addresses: []catalog.Address{{IP: "10.0.0.8", Ready: true}}}},
		Identities: []string{"spiffe://alpha.mesh/ns/demo/sa/echo"},
	}})
	require.NoError(t, err)
	snap, err := fedtest.SidecarSnapshot(local, nil, xds.SidecarOptions{Region: "r1"}, authority.Bundle())
	require.NoError(t, err)
	xdsLn, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	xdsSrv := fedtest.StartXDS(xdsLn)
	t.Cleanup(xdsSrv.Close)
	require.NoError(t, xdsSrv.Set(t.Context(), snap))
	caAddr, xdsAddr := authority.Addr, xdsSrv.Addr

	dir := t.TempDir()
	roots := authority.RootsPEM()
	rootsFile, tokenFile := filepath.Join(dir, "roots.pem"), filepath.Join(dir, "token")
	require.NoError(t, os.WriteFile(rootsFile, roots, 0o600))
	require.NoError(t, os.WriteFile(tokenFile, []byte("tok"), 0o600))
	admin, health, dnsAddr := freePort(t, "127.0.22.1"), freePort(t, "127.0.22.2"), freePort(t, "127.0.22.3")

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		_, stderr, err := execute(ctx, "run", "--log-level", "debug",
			"--xds-plaintext", "--xds-address", xdsAddr, "--ca-address", caAddr,
			"--cluster-name", "alpha", "--pod-ip", "10.0.0.7", "--pod-name", "web-0", "--namespace", "demo", "--service-account", "web",
			"--token-file", tokenFile, "--ca-roots-file", rootsFile,
			"--outbound-addr", "127.0.0.1:0", "--inbound-addr", "127.0.0.1:0", "--admin-addr", admin, "--health-addr", health,
			"--dns-addr", dnsAddr, "--dns-resolv-conf", "", "--dns-upstreams", "127.0.0.1:9", "--drain-timeout", "1s",
			"--concurrency", "0") // the test binary keeps its GOMAXPROCS
		if err != nil {
			err = errors.Join(err, errors.New(stderr))
		}
		errc <- err
	}()

	get := func(url string) (int, string) {
		resp, err := http.Get(url)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	require.Eventually(t, func() bool {
		select {
		case err := <-errc:
			t.Fatalf("sidecar run exited: %v", err)
		default:
		}
		code, _ := get("http://" + health + "/healthz/ready")
		return code == http.StatusOK
	}, 30*time.Second, 50*time.Millisecond, "sidecar run never became ready")

	code, body := get("http://" + admin + "/config_dump")
	require.Equal(t, http.StatusOK, code)
	var dump struct {
		Versions map[string]string `json:"versions"`
		SVID     struct {
			ID string `json:"spiffe_id"`
		} `json:"svid"`
		Names map[string]string `json:"names"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &dump))
	require.Equal(t, snap.GetVersion(resource.ListenerType), dump.Versions[resource.ListenerType])
	require.Equal(t, "spiffe://alpha.mesh/ns/demo/sa/web", dump.SVID.ID)
	vip := dump.Names["echo.demo.svc.clusterset.local"]
	require.True(t, strings.HasPrefix(vip, "240.240."), "VIP %q", vip)

	// The DNS proxy answers from the xDS name table.
	q := new(mdns.Msg)
	q.SetQuestion("echo.demo.svc.clusterset.local.", mdns.TypeA)
	var answer *mdns.Msg
	require.Eventually(t, func() bool {
		answer, err = mdns.Exchange(q, dnsAddr)
		return err == nil && len(answer.Answer) == 1
	}, 10*time.Second, 50*time.Millisecond, "no DNS answer: %v", err)
	require.Equal(t, vip, answer.Answer[0].(*mdns.A).A.String())

	_, stats := get("http://" + health + "/stats/prometheus")
	require.Contains(t, stats, "isthmus_dns_queries", "the DNS proxy's metrics are merged")
	require.Contains(t, stats, "isthmus_sidecar_xds_connected 1")

	cancel()
	select {
	case err := <-errc:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("sidecar run did not return after its context ended")
	}
}
