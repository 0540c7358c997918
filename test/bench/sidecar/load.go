package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/test/netns"
)

// window is one measured load against one target.
type window struct {
	// p50 and p99 are the latency percentiles (s) at the fixed rate.
	p50, p99 float64
	// rps is the rate the load generator achieved (requests/s).
	rps float64
	// cpu is the proxies' CPU seconds over wall seconds (0 for direct).
	cpu, wall float64
	// ioCalls is the proxies' read and write system calls.
	ioCalls float64
	// requests and errors are the load generator's counts: errors are
	// requests that failed or answered other than 2xx.
	requests, errors int64
	// hist is fortio's latency histogram (fixed rate only), kept so that
	// the slices of one window can be pooled (see pool).
	hist []bucket
	// measured is how long the load ran (s), as fortio reports it.
	measured float64
}

// bucket is one bar of fortio's latency histogram: count requests took
// between start and end seconds.
type bucket struct {
	Start, End float64
	Count      int64
}

// pool is one window made of slices of the same load, taken in turn with
// other targets' (see --slices): requests, errors, CPU and system calls
// add up, the rate is requests over the time the slices ran, and p50 and
// p99 are those of the slices' histograms together.
func pool(slices []window) window {
	var w window
	for _, s := range slices {
		w.requests += s.requests
		w.errors += s.errors
		w.cpu += s.cpu
		w.wall += s.wall
		w.ioCalls += s.ioCalls
		w.measured += s.measured
		w.hist = append(w.hist, s.hist...)
	}
	if w.measured > 0 {
		w.rps = float64(w.requests) / w.measured
	}
	w.p50, w.p99 = quantile(w.hist, 0.50), quantile(w.hist, 0.99)
	return w
}

// quantile is the latency below which a fraction q of the histogram's
// requests fall, with each bucket's requests spread evenly over its span,
// as fortio interpolates. Buckets may overlap (slices' first and last
// buckets end at their own minimum and maximum), so it searches for the
// latency at which the spread-out count reaches q.
func quantile(hist []bucket, q float64) float64 {
	var total float64
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, b := range hist {
		total += float64(b.Count)
		lo, hi = min(lo, b.Start), max(hi, b.End)
	}
	if total == 0 {
		return 0
	}
	below := func(x float64) float64 {
		var n float64
		for _, b := range hist {
			switch {
			case x >= b.End:
				n += float64(b.Count)
			case x > b.Start:
				n += float64(b.Count) * (x - b.Start) / (b.End - b.Start)
			}
		}
		return n
	}
	for range 64 { // bisection to well under a nanosecond
		mid := (lo + hi) / 2
		if below(mid) < q*total {
			lo = mid
		} else {
			hi = mid
		}
	}
	return hi
}

// cores is the proxies' CPU use in cores over the window.
func (w window) cores() float64 {
	if w.wall <= 0 {
		return 0
	}
	return w.cpu / w.wall
}

// perCore is requests per second per core of proxy CPU: requests per
// proxy CPU second.
func (w window) perCore() float64 {
	if w.cpu <= 0 {
		return 0
	}
	return w.rps / w.cores()
}

// callsPerRequest is the proxies' read and write system calls per
// request.
func (w window) callsPerRequest() float64 {
	if w.requests == 0 {
		return 0
	}
	return w.ioCalls / float64(w.requests)
}

// usage is what the proxies have used so far: CPU seconds, and read and
// write system calls.
type usage struct{ cpu, ioCalls float64 }

// loadSpec is what the load generator sends: where, as which protocol,
// with which authority.
type loadSpec struct {
	url       string
	h2        bool
	authority string
}

// fortioArgs is a fixed-rate fortio run of dur writing its result to
// jsonFile: rate requests/s spread evenly over conns connections (uniform,
// no catch-up bursts after a stall), latency histogram buckets of 10 µs
// at the bottom (fortio's default 1 ms is too coarse for a proxy hop).
// HTTP/2 uses fortio's standard client (h2c with prior knowledge). With
// accessLog, fortio also writes every request there, a JSON line each
// (start in Unix ns, latency in s).
func fortioArgs(s loadSpec, rate float64, conns int, dur time.Duration, jsonFile, accessLog string) []string {
	args := []string{"load", "-quiet", "-qps", strconv.FormatFloat(rate, 'f', -1, 64), "-c", strconv.Itoa(conns),
		"-t", dur.String(), "-uniform", "-nocatchup", "-r", "0.00001", "-p", "50,99", "-timeout", "5s",
		"-H", "Host: " + s.authority, "-json", jsonFile}
	if accessLog != "" {
		args = append(args, "-access-log-file", accessLog)
	}
	if s.h2 {
		args = append(args, "-h2")
	}
	return append(args, s.url)
}

// fortioResult is the part of fortio's JSON result read here.
type fortioResult struct {
	ActualQPS         float64
	ActualDuration    int64 // nanoseconds
	RetCodes          map[string]int64
	DurationHistogram struct {
		Count int64
		Data  []bucket
	}
}

// parseFortio reads one slice's fortio JSON result: its latency
// histogram, requests, time, and requests that did not answer 2xx as
// errors. The percentiles and the rate are pool's to work out, from all
// the slices of a window.
func parseFortio(data []byte) (window, error) {
	var r fortioResult
	if err := json.Unmarshal(data, &r); err != nil {
		return window{}, fmt.Errorf("fortio result: %w", err)
	}
	w := window{requests: r.DurationHistogram.Count, hist: r.DurationHistogram.Data,
		measured: float64(r.ActualDuration) / 1e9}
	var ok2xx int64
	for code, n := range r.RetCodes {
		if strings.HasPrefix(code, "2") && len(code) == 3 {
			ok2xx += n
		}
	}
	w.errors = w.requests - ok2xx
	if w.requests == 0 || len(w.hist) == 0 || w.measured <= 0 {
		return window{}, fmt.Errorf("fortio result: no latency histogram (%d requests)", w.requests)
	}
	return w, nil
}

// h2loadArgs is an h2load run of dur at the maximum rate: conns
// connections, each with streams requests in flight (HTTP/2) or one
// (HTTP/1.1, --h1), on one thread.
func h2loadArgs(s loadSpec, conns, streams int, dur time.Duration) []string {
	args := []string{"-t", "1", "-c", strconv.Itoa(conns), "-D", strconv.FormatInt(max(dur.Milliseconds(), 1), 10) + "ms",
		"-H", ":authority: " + s.authority}
	if s.h2 {
		args = append(args, "-m", strconv.Itoa(streams))
	} else {
		args = append(args, "--h1", "-m", "1")
	}
	return append(args, s.url)
}

var (
	h2loadFinished = regexp.MustCompile(`(?m)^finished in [^,]+, ([0-9.]+) req/s`)
	h2loadRequests = regexp.MustCompile(`(?m)^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout`)
	h2loadCodes    = regexp.MustCompile(`(?m)^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx`)
)

// parseH2load reads h2load's summary: the rate, and the requests that
// failed as errors (h2load's "failed" counts those that errored and
// those answered other than 2xx).
func parseH2load(out string) (window, error) {
	m := h2loadFinished.FindStringSubmatch(out)
	r := h2loadRequests.FindStringSubmatch(out)
	if m == nil || r == nil || h2loadCodes.FindString(out) == "" {
		return window{}, fmt.Errorf("h2load output without its summary: %q", out)
	}
	atoi := func(s string) int64 { n, _ := strconv.ParseInt(s, 10, 64); return n }
	rps, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return window{}, err
	}
	return window{rps: rps, requests: atoi(r[3]), errors: atoi(r[5])}, nil
}

// loader runs the load generators in the client's namespace.
type loader struct {
	ns     *netns.NS
	fortio string
	dir    string
	// accessLogs has fortio log every request of the measured runs.
	accessLogs bool
}

// fixed warms the target up for warmup, then measures dur at rate over
// conns connections, reading the proxies' CPU around the measured run.
// fortio's result of the measured run is left in the work directory as
// fortio-<name>.json, histogram and all, for a look at the whole tail
// (--keep).
func (l loader) fixed(ctx context.Context, name string, s loadSpec, rate float64, conns int, warmup, dur time.Duration, meter func() usage) (window, error) {
	file := filepath.Join(l.dir, "fortio-"+name+".json")
	if warmup > 0 {
		if _, err := l.run(ctx, dur, l.fortio, fortioArgs(s, rate, conns, warmup, file, "")...); err != nil {
			return window{}, fmt.Errorf("warm-up: %w", err)
		}
	}
	_ = os.Remove(file)
	u0, t0 := meter(), time.Now()
	accessLog := ""
	if l.accessLogs {
		accessLog = filepath.Join(l.dir, "fortio-"+name+".access")
	}
	if _, err := l.run(ctx, dur, l.fortio, fortioArgs(s, rate, conns, dur, file, accessLog)...); err != nil {
		return window{}, err
	}
	u1, t1 := meter(), time.Now()
	data, err := os.ReadFile(file)
	if err != nil {
		return window{}, err
	}
	w, err := parseFortio(data)
	if err != nil {
		return window{}, err
	}
	w.cpu, w.ioCalls, w.wall = u1.cpu-u0.cpu, u1.ioCalls-u0.ioCalls, t1.Sub(t0).Seconds()
	return w, nil
}

// max warms the target up for warmup, then measures dur at the highest
// rate h2load reaches, reading the proxies' CPU around the measured run.
func (l loader) max(ctx context.Context, s loadSpec, conns, streams int, warmup, dur time.Duration, meter func() usage) (window, error) {
	if warmup > 0 {
		if _, err := l.run(ctx, dur, "h2load", h2loadArgs(s, conns, streams, warmup)...); err != nil {
			return window{}, fmt.Errorf("warm-up: %w", err)
		}
	}
	u0, t0 := meter(), time.Now()
	out, err := l.run(ctx, dur, "h2load", h2loadArgs(s, conns, streams, dur)...)
	if err != nil {
		return window{}, err
	}
	u1, t1 := meter(), time.Now()
	w, err := parseH2load(out)
	if err != nil {
		return window{}, err
	}
	w.cpu, w.ioCalls, w.wall = u1.cpu-u0.cpu, u1.ioCalls-u0.ioCalls, t1.Sub(t0).Seconds()
	return w, nil
}

// run runs a load generator in the client's namespace, bounded by its
// duration plus a minute.
func (l loader) run(ctx context.Context, dur time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, dur+time.Minute)
	defer cancel()
	return l.ns.Run(ctx, name, args...)
}
