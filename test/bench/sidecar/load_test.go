package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestParseFortio(t *testing.T) {
	w, err := parseFortio([]byte(`{"ActualQPS": 996.5, "ActualDuration": 5000000000, "RetCodes": {"200": 4980, "503": 3, "-1": 2},
		"DurationHistogram": {"Count": 4985, "Data": [{"Start": 0.0003, "End": 0.0004, "Count": 4900}, {"Start": 0.002, "End": 0.0025, "Count": 85}]}}`))
	require.NoError(t, err)
	require.Equal(t, window{requests: 4985, errors: 5, measured: 5,
		hist: []bucket{{Start: 0.0003, End: 0.0004, Count: 4900}, {Start: 0.002, End: 0.0025, Count: 85}}}, w)

	_, err = parseFortio([]byte(`{"ActualQPS": 0, "DurationHistogram": {"Count": 0}}`))
	require.ErrorContains(t, err, "no latency histogram")
	_, err = parseFortio([]byte(`not json`))
	require.Error(t, err)
}

// A fortio 1.69 result of a 20 s window through the two nginx (HTTP/2,
// proxy_pass), trimmed to what is read.
const fortioWindow = `{"ActualQPS": 999.4786961131168, "ActualDuration": 20007429951, "RetCodes": {"200": 19997}, "DurationHistogram": {"Count": 19997, "Data": [{"Start": 0.000177446, "End": 0.00018, "Count": 2}, {"Start": 0.00018, "End": 0.0002, "Count": 2}, {"Start": 0.0002, "End": 0.00025, "Count": 31}, {"Start": 0.00025, "End": 0.00030000000000000003, "Count": 467}, {"Start": 0.00030000000000000003, "End": 0.00035000000000000005, "Count": 2058}, {"Start": 0.00035000000000000005, "End": 0.0004, "Count": 4188}, {"Start": 0.0004, "End": 0.00045000000000000004, "Count": 4963}, {"Start": 0.00045000000000000004, "End": 0.0005, "Count": 3879}, {"Start": 0.0005, "End": 0.0006000000000000001, "Count": 3176}, {"Start": 0.0006000000000000001, "End": 0.0007000000000000001, "Count": 739}, {"Start": 0.0007000000000000001, "End": 0.0008, "Count": 189}, {"Start": 0.0008, "End": 0.0009000000000000001, "Count": 69}, {"Start": 0.0009000000000000001, "End": 0.001, "Count": 34}, {"Start": 0.001, "End": 0.0012000000000000001, "Count": 34}, {"Start": 0.0012000000000000001, "End": 0.0014000000000000002, "Count": 33}, {"Start": 0.0014000000000000002, "End": 0.0016, "Count": 19}, {"Start": 0.0016, "End": 0.0018000000000000002, "Count": 16}, {"Start": 0.0018000000000000002, "End": 0.002, "Count": 13}, {"Start": 0.002, "End": 0.0025, "Count": 26}, {"Start": 0.0025, "End": 0.003, "Count": 26}, {"Start": 0.003, "End": 0.0035, "Count": 7}, {"Start": 0.0035, "End": 0.004, "Count": 7}, {"Start": 0.004, "End": 0.0045000000000000005, "Count": 2}, {"Start": 0.0045000000000000005, "End": 0.005, "Count": 4}, {"Start": 0.005, "End": 0.006, "Count": 7}, {"Start": 0.006, "End": 0.007, "Count": 2}, {"Start": 0.007, "End": 0.008, "Count": 2}, {"Start": 0.008, "End": 0.008674852, "Count": 2}], "Percentiles": [{"Percentile": 50, "Value": 0.0004327473302438042}, {"Percentile": 99, "Value": 0.0010001764705882365}]}}`

// The histogram's quantiles are fortio's own percentiles; a window pooled
// from slices has the slices' counts and time, and the percentiles of all
// their requests together.
func TestPool(t *testing.T) {
	w, err := parseFortio([]byte(fortioWindow))
	require.NoError(t, err)
	require.Len(t, w.hist, 28)
	var fortio struct { // what fortio itself made of the same requests
		ActualQPS         float64
		DurationHistogram struct{ Percentiles []struct{ Value float64 } }
	}
	require.NoError(t, json.Unmarshal([]byte(fortioWindow), &fortio))
	p50, p99 := fortio.DurationHistogram.Percentiles[0].Value, fortio.DurationHistogram.Percentiles[1].Value

	// One slice pooled has fortio's percentiles and rate; two alike, the
	// same percentiles.
	one := pool([]window{w})
	require.InDelta(t, p50, one.p50, 1e-12)
	require.InDelta(t, p99, one.p99, 1e-12)
	require.InDelta(t, fortio.ActualQPS, one.rps, 1e-9)
	w.cpu, w.wall, w.ioCalls = 3, 20, 1000
	two := pool([]window{w, w})
	require.InDelta(t, p50, two.p50, 1e-12)
	require.InDelta(t, p99, two.p99, 1e-12)
	require.Equal(t, int64(2*19997), two.requests)
	require.InDelta(t, 40.0148599, two.measured, 1e-6)
	require.Equal(t, window{}.errors, two.errors)
	require.Equal(t, [3]float64{6, 40, 2000}, [3]float64{two.cpu, two.wall, two.ioCalls})

	// A quiet slice and a noisy one: the pooled p99 is the 1% slowest of
	// both, not either slice's own.
	quiet := window{requests: 990, measured: 1, hist: []bucket{{Start: 1e-3, End: 2e-3, Count: 990}}}
	noisy := window{requests: 10, measured: 1, hist: []bucket{{Start: 5e-3, End: 6e-3, Count: 10}}}
	p := pool([]window{quiet, noisy})
	require.InDelta(t, 1.5050505e-3, p.p50, 1e-9) // the middle of all 1000, in quiet's bucket
	require.InDelta(t, 2e-3, p.p99, 1e-9)         // the 990th: the top of quiet's bucket
	require.InDelta(t, 500.0, p.rps, 1e-9)
	require.Zero(t, quantile(nil, 0.99))
}

// h2load's summary, as nghttp2 1.52 prints it.
const h2loadOut = `starting benchmark...
spawning thread #0: 64 total client(s). Timing-based test with 0s of warm-up time and 5s of main duration for measurements.
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 5.00s, 13903.40 req/s, 1.51MB/s
requests: 69517 total, 69581 started, 69517 done, 69510 succeeded, 7 failed, 2 errored, 0 timeout
status codes: 69510 2xx, 0 3xx, 0 4xx, 5 5xx
traffic: 7.55MB (7918080) total, 3.05MB (3198600) headers (space savings 0.00%), 4.24MB (4449088) data
`

func TestParseH2load(t *testing.T) {
	w, err := parseH2load(h2loadOut)
	require.NoError(t, err)
	require.Equal(t, window{rps: 13903.40, requests: 69517, errors: 7}, w)
	_, err = parseH2load("h2load: connection refused\n")
	require.ErrorContains(t, err, "without its summary")
}

func TestArgs(t *testing.T) {
	s := loadSpec{url: "http://127.0.0.1:15001/", h2: true, authority: serviceHost}
	f := strings.Join(fortioArgs(s, 1000, 8, 5*time.Second, "/tmp/f.json", ""), " ")
	require.Contains(t, f, "-qps 1000 -c 8 -t 5s")
	require.Contains(t, f, "-H Host: "+serviceHost)
	require.True(t, strings.HasSuffix(f, "-h2 http://127.0.0.1:15001/"), f)
	require.NotContains(t, f, "-access-log-file")
	f = strings.Join(fortioArgs(s, 1000, 8, 5*time.Second, "/tmp/f.json", "/tmp/f.access"), " ")
	require.Contains(t, f, "-access-log-file /tmp/f.access")
	require.True(t, strings.HasSuffix(f, "-h2 http://127.0.0.1:15001/"), f)
	h := strings.Join(h2loadArgs(s, 4, 16, 1500*time.Millisecond), " ")
	require.Equal(t, "-t 1 -c 4 -D 1500ms -H :authority: "+serviceHost+" -m 16 http://127.0.0.1:15001/", h)
	s.h2 = false
	require.Contains(t, strings.Join(h2loadArgs(s, 64, 16, time.Second), " "), "--h1 -m 1")
}

// The table pairs each run's target with that run's direct call, and
// judges the targets on the medians.
func TestTable(t *testing.T) {
	r := newResults()
	for _, run := range []struct{ is, ng, di float64 }{{0.5e-3, 0.4e-3, 0.1e-3}, {0.6e-3, 0.3e-3, 0.2e-3}, {0.7e-3, 0.5e-3, 0.1e-3}} {
		r.add(key{"h1", modeFixed, "isthmus"}, window{p50: run.is, p99: 2 * run.is, rps: 1000, cpu: 1, wall: 5})
		r.add(key{"h1", modeFixed, "nginx"}, window{p50: run.ng, p99: 2 * run.ng, rps: 1000, cpu: 0.5, wall: 5})
		r.add(key{"h1", modeFixed, "direct"}, window{p50: run.di, p99: 2 * run.di, rps: 1000})
		r.add(key{"h1", modeMax, "isthmus"}, window{rps: 10000, cpu: 5, wall: 5})
		r.add(key{"h1", modeMax, "nginx"}, window{rps: 12000, cpu: 10, wall: 5, errors: 1, requests: 60000})
		r.add(key{"h1", modeMax, "direct"}, window{rps: 40000})
	}
	e := &env{idle: map[string]float64{"isthmus": 30, "nginx": 40}, peak: map[string]float64{"isthmus": 50, "nginx": 45}}
	out := r.table(e, options{protocols: []string{"h1"}, rate: 1000, rateConns: 8, maxConnsH1: 64, runs: 3})
	for _, want := range []string{
		"| HTTP/1.1 | p50 latency at 1000 req/s (ms) | 0.600 [0.500–0.700] | 0.400 [0.300–0.500] | 0.100 [0.100–0.200] | 1.50× |",
		"| HTTP/1.1 | added p50 latency over direct (ms) | 0.400 [0.400–0.600] | 0.300 [0.100–0.400] | – | 1.33× |",
		"| HTTP/1.1 | maximum req/s per proxy core | 10000 | 6000 | – | 1.67× |",
		"| both | proxy peak resident set, after all runs (MB, both proxies) | 50.0 | 45.0 | – | 1.11× |",
		"Failed requests in the measured windows: HTTP/1.1 max nginx: 3 of 180000.",
		"- HTTP/1.1: added p50 latency ≤ nginx's: MISSED (0.400 ms vs 0.300 ms)",
		"- HTTP/1.1: requests/s per proxy core ≥ 1.0× nginx: met (10000 vs 6000, 1.67×)",
	} {
		require.Contains(t, out, want)
	}
}

// HTTP/2 is judged both ways: the sidecars' port declared http against
// nginx's proxy_pass (HTTP/1.1 between the proxies), their port declared
// http2 against grpc_pass (HTTP/2), each row block with its own ratio.
func TestTableHTTP2Peers(t *testing.T) {
	r := newResults()
	for target, p50 := range map[string]float64{"isthmus": 0.4e-3, "isthmus-h2": 0.45e-3, "nginx": 0.3e-3, "nginx-h2": 0.5e-3, "direct": 0.1e-3} {
		r.add(key{"h2", modeFixed, target}, window{p50: p50, p99: 2 * p50, rps: 1000, cpu: 1, wall: 5})
		r.add(key{"h2", modeMax, target}, window{rps: 10000, cpu: 5, wall: 5})
	}
	e := &env{idle: map[string]float64{}, peak: map[string]float64{}}
	out := r.table(e, options{protocols: []string{"h2"}, rate: 1000, rateConns: 8, maxConnsH2: 4, maxStreams: 16, runs: 1})
	for _, want := range []string{
		"| HTTP/2 → HTTP/1.1 | added p50 latency over direct (ms) | 0.300 | 0.200 | – | 1.50× |",
		"| HTTP/2 → HTTP/2 | added p50 latency over direct (ms) | 0.350 | 0.400 | – | 0.88× |",
		"- HTTP/2 → HTTP/1.1: added p50 latency ≤ nginx's: MISSED (0.300 ms vs 0.200 ms)",
		"- HTTP/2 → HTTP/2: added p50 latency ≤ nginx's: met (0.350 ms vs 0.400 ms)",
	} {
		require.Contains(t, out, want)
	}
}
