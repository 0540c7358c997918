package dns

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/isthmus-mesh/isthmus/internal/testlog"
)

// Names the test upstream answers in its own way.
const (
	upstreamName = "www.example." // A 192.0.2.10
	bigName      = "big.example." // bigCount A records: more than 1232 bytes
	bigCount     = 100
	slowName     = "slow.example."    // never answered
	refusedName  = "refused.example." // REFUSED
)

var upstreamAddr = netip.MustParseAddr("192.0.2.10")

// testTable stands for what the sidecar builds from xDS: clusterset
// services, and a ServiceEntry host outside the zone with an IPv6 VIP.
var testTable = map[string]netip.Addr{
	"foo.bar.svc.clusterset.local":  netip.MustParseAddr("240.240.1.1"),
	"Baz.Bar.svc.clusterset.local.": netip.MustParseAddr("240.240.1.2"),
	"api.example.com":               netip.MustParseAddr("240.240.9.9"),
	"v6.example.com":                netip.MustParseAddr("fd00::1"),
}

// upstream is a real DNS server on loopback (UDP and TCP on one port),
// standing for the cluster DNS. It records every query it receives.
type upstream struct {
	addr netip.AddrPort
	// quiet stops the recording, for benchmarks.
	quiet atomic.Bool

	// mu guards seen.
	mu   sync.Mutex
	seen []seenQuery
}

type seenQuery struct {
	proto string
	msg   *mdns.Msg
}

func (s seenQuery) name() string {
	if len(s.msg.Question) == 0 {
		return ""
	}
	return strings.ToLower(s.msg.Question[0].Name)
}

func startUpstream(tb testing.TB) *upstream {
	tb.Helper()
	pc, ln := listenPair(tb)
	u := &upstream{addr: pc.LocalAddr().(*net.UDPAddr).AddrPort()}
	for _, srv := range []*mdns.Server{{PacketConn: pc, Handler: u}, {Listener: ln, Handler: u}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		served := make(chan error, 1)
		go func() { served <- srv.ActivateAndServe() }()
		select {
		case <-started:
		case err := <-served:
			tb.Fatalf("upstream: %v", err)
		}
		tb.Cleanup(func() {
			_ = srv.Shutdown()
			<-served
		})
	}
	return u
}

// listenPair binds UDP and TCP on one free loopback port.
func listenPair(tb testing.TB) (*net.UDPConn, *net.TCPListener) {
	tb.Helper()
	for range 10 {
		pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		require.NoError(tb, err)
		ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: pc.LocalAddr().(*net.UDPAddr).Port})
		if err == nil {
			return pc, ln
		}
		_ = pc.Close()
	}
	tb.Fatal("no free port for UDP and TCP at once")
	return nil, nil
}

// deadAddr is a loopback port where nothing listens (UDP gets ICMP port
// unreachable, TCP a reset).
func deadAddr(tb testing.TB) netip.AddrPort {
	pc, ln := listenPair(tb)
	addr := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	_ = pc.Close()
	_ = ln.Close()
	return addr
}

func (u *upstream) ServeDNS(w mdns.ResponseWriter, req *mdns.Msg) {
	proto := "udp"
	if _, ok := w.RemoteAddr().(*net.TCPAddr); ok {
		proto = "tcp"
	}
	if !u.quiet.Load() {
		u.mu.Lock()
		u.seen = append(u.seen, seenQuery{proto: proto, msg: req.Copy()})
		u.mu.Unlock()
	}

	m := new(mdns.Msg).SetReply(req)
	m.RecursionAvailable = true
	var name string
	if len(req.Question) > 0 {
		name = strings.ToLower(req.Question[0].Name)
	}
	switch {
	case name == slowName:
		return
	case name == refusedName:
		m.Rcode = mdns.RcodeRefused
	case name == bigName && req.Question[0].Qtype == mdns.TypeA:
		for i := range bigCount {
			m.Answer = append(m.Answer, &mdns.A{
				Hdr: mdns.RR_Header{Name: req.Question[0].Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 60},
				A:   net.IPv4(192, 0, 2, byte(i+1)),
			})
		}
	case name == upstreamName && req.Question[0].Qtype == mdns.TypeA:
		m.Answer = append(m.Answer, &mdns.A{
			Hdr: mdns.RR_Header{Name: req.Question[0].Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 60},
			A:   upstreamAddr.AsSlice(),
		})
	case name == upstreamName || name == bigName:
	default:
		m.Rcode = mdns.RcodeNameError
	}
	limit := mdns.MinMsgSize
	if opt := req.IsEdns0(); opt != nil {
		m.SetEdns0(1232, opt.Do())
		limit = max(limit, int(opt.UDPSize()))
	}
	if proto == "udp" {
		m.Truncate(limit)
	}
	_ = w.WriteMsg(m)
}

// queries returns what the upstream has received.
func (u *upstream) queries() []seenQuery {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]seenQuery(nil), u.seen...)
}

// drain returns what the upstream has received and forgets it.
func (u *upstream) drain() []seenQuery {
	u.mu.Lock()
	defer u.mu.Unlock()
	seen := u.seen
	u.seen = nil
	return seen
}

// asked reports how many queries for name (any type) reached the upstream.
func (u *upstream) asked(name string) int {
	n := 0
	for _, q := range u.queries() {
		if q.name() == strings.ToLower(name) {
			n++
		}
	}
	return n
}

// askedOver reports how many queries for name reached the upstream over
// proto.
func (u *upstream) askedOver(name, proto string) int {
	n := 0
	for _, q := range u.queries() {
		if q.name() == strings.ToLower(name) && q.proto == proto {
			n++
		}
	}
	return n
}

// fixture is a running proxy in front of a test upstream.
type fixture struct {
	t       testing.TB
	p       *Proxy
	up      *upstream
	metrics *sdkmetric.ManualReader
}

const testSearch = "search ns1.svc.cluster.local svc.cluster.local cluster.local"

// writeResolvConf writes a pod's resolv.conf; its nameserver is never
// used (the tests set Upstreams), its search list is.
func writeResolvConf(tb testing.TB, lines ...string) string {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "resolv.conf")
	body := "# as the kubelet writes it\nnameserver 10.96.0.10\n" + testSearch + "\noptions ndots:5\n" + strings.Join(lines, "\n")
	require.NoError(tb, os.WriteFile(path, []byte(body), 0o600))
	return path
}

// start runs a proxy with the test table, forwarding to a fresh test
// upstream (unless edit sets other upstreams). Run must end cleanly when
// the test does.
func start(tb testing.TB, edit ...func(*Config)) *fixture {
	tb.Helper()
	f := &fixture{t: tb, up: startUpstream(tb), metrics: sdkmetric.NewManualReader()}
	cfg := DefaultConfig()
	cfg.ListenAddr = "127.0.0.1:0"
	cfg.ResolvConf = writeResolvConf(tb)
	cfg.Upstreams = []string{f.up.addr.String()}
	cfg.UpstreamTimeout = 500 * time.Millisecond
	for _, e := range edit {
		e(&cfg)
	}
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(f.metrics))
	log := testlog.New(tb)
	if _, bench := tb.(*testing.B); bench {
		log = slog.New(slog.DiscardHandler) // lifecycle lines would bury the figures
	}
	p, err := New(cfg, Options{Logger: log, Meter: provider.Meter("test")})
	require.NoError(tb, err)
	f.p = p
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- p.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		select {
		case err := <-ran:
			require.NoError(tb, err)
		case <-time.After(10 * time.Second):
			tb.Error("Run did not return 10 s after its context ended")
		}
	})
	return f
}

// ask sends one query for name and returns the answer.
func (f *fixture) ask(proto, name string, qtype uint16, edit ...func(*mdns.Msg)) *mdns.Msg {
	f.t.Helper()
	r, err := f.exchange(proto, name, qtype, edit...)
	require.NoError(f.t, err, "%s %s over %s", name, mdns.TypeToString[qtype], proto)
	return r
}

func (f *fixture) exchange(proto, name string, qtype uint16, edit ...func(*mdns.Msg)) (*mdns.Msg, error) {
	m := new(mdns.Msg).SetQuestion(name, qtype)
	for _, e := range edit {
		e(m)
	}
	c := mdns.Client{Net: proto, Timeout: 5 * time.Second}
	r, _, err := c.Exchange(m, f.p.Addr().String())
	return r, err
}

// counter sums the data points of an int64 counter whose attributes
// include every attr ("key=value").
func (f *fixture) counter(name string, attrs ...string) int64 {
	f.t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(f.t, f.metrics.Collect(context.Background(), &rm))
	var total int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != name {
				continue
			}
			var points []metricdata.DataPoint[int64]
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				points = d.DataPoints
			case metricdata.Gauge[int64]:
				points = d.DataPoints
			default:
				f.t.Fatalf("%s: unexpected data %T", name, m.Data)
			}
		points:
			for _, dp := range points {
				for _, a := range attrs {
					k, v, _ := strings.Cut(a, "=")
					got, ok := dp.Attributes.Value(attribute.Key(k))
					if !ok || got.String() != v {
						continue points
					}
				}
				total += dp.Value
			}
		}
	}
	return total
}

// readTimeout reports whether err is a read deadline passing.
func readTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
