package main

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestParseFortio(t *testing.T) {
	w, err := parseFortio([]byte(`{"ActualQPS": 996.5, "RetCodes": {"200": 4980, "503": 3, "-1": 2},
		"DurationHistogram": {"Count": 4985, "Percentiles": [{"Percentile": 50, "Value": 0.000412}, {"Percentile": 99, "Value": 0.0021}]}}`))
	require.NoError(t, err)
	require.Equal(t, window{p50: 0.000412, p99: 0.0021, rps: 996.5, requests: 4985, errors: 5}, w)

	_, err = parseFortio([]byte(`{"ActualQPS": 0, "DurationHistogram": {"Count": 0}}`))
	require.ErrorContains(t, err, "no p50/p99")
	_, err = parseFortio([]byte(`not json`))
	require.Error(t, err)
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
	f := strings.Join(fortioArgs(s, 1000, 8, 5*time.Second, "/tmp/f.json"), " ")
	require.Contains(t, f, "-qps 1000 -c 8 -t 5s")
	require.Contains(t, f, "-H Host: "+serviceHost)
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

// HTTP/2 is judged against both nginx: proxy_pass (HTTP/1.1 upstream)
// and grpc_pass (HTTP/2 upstream), each row block with its own ratio.
func TestTableHTTP2Peers(t *testing.T) {
	r := newResults()
	for target, p50 := range map[string]float64{"isthmus": 0.4e-3, "nginx": 0.3e-3, "nginx-h2": 0.5e-3, "direct": 0.1e-3} {
		r.add(key{"h2", modeFixed, target}, window{p50: p50, p99: 2 * p50, rps: 1000, cpu: 1, wall: 5})
		r.add(key{"h2", modeMax, target}, window{rps: 10000, cpu: 5, wall: 5})
	}
	e := &env{idle: map[string]float64{}, peak: map[string]float64{}}
	out := r.table(e, options{protocols: []string{"h2"}, rate: 1000, rateConns: 8, maxConnsH2: 4, maxStreams: 16, runs: 1})
	for _, want := range []string{
		"| HTTP/2, nginx proxy_pass (HTTP/1.1 upstream) | added p50 latency over direct (ms) | 0.300 | 0.200 | – | 1.50× |",
		"| HTTP/2, nginx grpc_pass (HTTP/2 upstream) | added p50 latency over direct (ms) | 0.300 | 0.400 | – | 0.75× |",
		"- HTTP/2, nginx proxy_pass (HTTP/1.1 upstream): added p50 latency ≤ nginx's: MISSED (0.300 ms vs 0.200 ms)",
		"- HTTP/2, nginx grpc_pass (HTTP/2 upstream): added p50 latency ≤ nginx's: met (0.300 ms vs 0.400 ms)",
	} {
		require.Contains(t, out, want)
	}
}
