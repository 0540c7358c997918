package main

import (
	"fmt"
	"slices"
	"strings"

	"github.com/isthmus-mesh/isthmus/test/bench/internal/table"
)

// key names a series of windows: protocol, load kind, target.
type key struct{ proto, mode, target string }

// results are the windows of every run, in run order.
type results struct {
	windows map[key][]window
}

func newResults() *results { return &results{windows: map[key][]window{}} }

func (r *results) add(k key, w window) { r.windows[k] = append(r.windows[k], w) }

func (w window) describe(mode string) string {
	var s string
	if mode == modeFixed {
		s = fmt.Sprintf("p50 %.3f ms  p99 %.3f ms  %6.0f req/s", w.p50*1e3, w.p99*1e3, w.rps)
	} else {
		s = fmt.Sprintf("%8.0f req/s", w.rps)
	}
	if w.cpu > 0 {
		s += fmt.Sprintf("  proxy CPU %.2f cores", w.cores())
		if mode == modeMax {
			s += fmt.Sprintf(" (%.0f req/s per core)", w.perCore())
		}
		s += fmt.Sprintf(", %.1f read/write calls per request", w.callsPerRequest())
	}
	if w.errors > 0 {
		s += fmt.Sprintf("  %d errors of %d", w.errors, w.requests)
	}
	return s
}

// stat is a median with its range over runs.
type stat struct {
	med, lo, hi float64
	ok          bool
}

func statOf(vs []float64) stat {
	if len(vs) == 0 {
		return stat{}
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return stat{med: med, lo: s[0], hi: s[len(s)-1], ok: true}
}

// series applies f to each run's window of k.
func (r *results) series(k key, f func(window) float64) stat {
	var vs []float64
	for _, w := range r.windows[k] {
		vs = append(vs, f(w))
	}
	return statOf(vs)
}

// added is f of target minus f of direct in the same run: the latency
// the proxies add.
func (r *results) added(proto, target string, f func(window) float64) stat {
	ws, ds := r.windows[key{proto, modeFixed, target}], r.windows[key{proto, modeFixed, "direct"}]
	var vs []float64
	for i := range min(len(ws), len(ds)) {
		vs = append(vs, f(ws[i])-f(ds[i]))
	}
	return statOf(vs)
}

var protoNames = map[string]string{"h1": "HTTP/1.1", "h2": "HTTP/2"}

// peers pair each protocol's isthmus targets with the nginx target doing
// the same job, with the label that tells their rows apart. For HTTP/2,
// nginx's proxy_pass speaks HTTP/1.1 to upstreams, converting at the
// front, as the sidecars do for a port declared http; its grpc_pass
// carries HTTP/2 end to end (one stream per upstream connection at a
// time), as the sidecars do for a port declared http2.
var peers = map[string][]struct{ ours, target, label string }{
	"h1": {{"isthmus", "nginx", ""}},
	"h2": {
		{"isthmus", "nginx", " → HTTP/1.1"},
		{"isthmus-h2", "nginx-h2", " → HTTP/2"},
	},
}

func (r *results) table(e *env, o options) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\n| protocol | measure | isthmus | nginx | direct | isthmus/nginx |\n|---|---|---|---|---|---|\n")
	cell := func(s stat, scale float64, prec int) string {
		if !s.ok {
			return "–"
		}
		if s.lo == s.hi {
			return fmt.Sprintf("%.*f", prec, s.med*scale)
		}
		return fmt.Sprintf("%.*f [%.*f–%.*f]", prec, s.med*scale, prec, s.lo*scale, prec, s.hi*scale)
	}
	ratio := func(a, c stat) string {
		if !a.ok || !c.ok || c.med == 0 {
			return "–"
		}
		return fmt.Sprintf("%.2f×", a.med/c.med)
	}
	type row struct {
		measure    string
		scale      float64
		prec       int
		withDirect bool
		get        func(target string) stat
	}
	line := func(proto, ours, peer string, rw row) (is, ng stat) {
		is, ng = rw.get(ours), rw.get(peer)
		di := stat{}
		if rw.withDirect {
			di = rw.get("direct")
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", proto, rw.measure,
			cell(is, rw.scale, rw.prec), cell(ng, rw.scale, rw.prec), cell(di, rw.scale, rw.prec), ratio(is, ng))
		return is, ng
	}
	p50 := func(w window) float64 { return w.p50 }
	p99 := func(w window) float64 { return w.p99 }
	rps := func(w window) float64 { return w.rps }
	cores := func(w window) float64 { return w.cores() }
	perCore := func(w window) float64 { return w.perCore() }
	calls := func(w window) float64 { return w.callsPerRequest() }
	type verdict struct {
		what  string
		is    stat
		ng    stat
		lower bool // lower is better: met when is ≤ ng
	}
	var verdicts []verdict
	rate := fmt.Sprintf("%.0f req/s", o.rate)
	for _, proto := range o.protocols {
		measured := func(mode string, f func(window) float64) func(string) stat {
			return func(t string) stat { return r.series(key{proto, mode, t}, f) }
		}
		added := func(f func(window) float64) func(string) stat {
			return func(t string) stat { return r.added(proto, t, f) }
		}
		conns := fmt.Sprintf("%d connections", o.maxConnsH1)
		if proto == "h2" {
			conns = fmt.Sprintf("%d connections × %d streams", o.maxConnsH2, o.maxStreams)
		}
		for _, peer := range peers[proto] {
			name := protoNames[proto] + peer.label
			line(name, peer.ours, peer.target, row{"p50 latency at " + rate + " (ms)", 1e3, 3, true, measured(modeFixed, p50)})
			line(name, peer.ours, peer.target, row{"p99 latency at " + rate + " (ms)", 1e3, 3, true, measured(modeFixed, p99)})
			a50, n50 := line(name, peer.ours, peer.target, row{"added p50 latency over direct (ms)", 1e3, 3, false, added(p50)})
			a99, n99 := line(name, peer.ours, peer.target, row{"added p99 latency over direct (ms)", 1e3, 3, false, added(p99)})
			line(name, peer.ours, peer.target, row{"proxy CPU at " + rate + " (cores, both proxies)", 1, 3, false, measured(modeFixed, cores)})
			line(name, peer.ours, peer.target, row{"maximum rate, " + conns + " (req/s)", 1, 0, true, measured(modeMax, rps)})
			line(name, peer.ours, peer.target, row{"proxy CPU at maximum rate (cores, both proxies)", 1, 2, false, measured(modeMax, cores)})
			ic, nc := line(name, peer.ours, peer.target, row{"maximum req/s per proxy core", 1, 0, false, measured(modeMax, perCore)})
			line(name, peer.ours, peer.target, row{"proxy read+write system calls per request at maximum rate (both proxies)", 1, 1, false, measured(modeMax, calls)})
			verdicts = append(verdicts,
				verdict{name + ": added p50 latency ≤ nginx's", a50, n50, true},
				verdict{name + ": added p99 latency ≤ nginx's", a99, n99, true},
				verdict{name + ": requests/s per proxy core ≥ 1.0× nginx", ic, nc, false})
		}
	}
	fixedMem := func(m map[string]float64) func(string) stat {
		return func(t string) stat {
			v, ok := m[t]
			return stat{med: v, lo: v, hi: v, ok: ok}
		}
	}
	line("both", "isthmus", "nginx", row{"proxy resident set, idle (MB, both proxies)", 1, 1, false, fixedMem(e.idle)})
	line("both", "isthmus", "nginx", row{"proxy peak resident set, after all runs (MB, both proxies)", 1, 1, false, fixedMem(e.peak)})

	var errs []string
	for k, ws := range r.windows {
		var n, of int64
		for _, w := range ws {
			n, of = n+w.errors, of+w.requests
		}
		if n > 0 {
			errs = append(errs, fmt.Sprintf("%s %s %s: %d of %d", protoNames[k.proto], k.mode, k.target, n, of))
		}
	}
	slices.Sort(errs)
	fmt.Fprintf(&b, "\nMedian of %d runs [range]. Fixed rate: fortio, %d connections, each run's window cut into %d slices taken in turn across the targets, "+
		"latency from the slices' histograms pooled per target (10 µs buckets at the bottom, interpolated). "+
		"Maximum rate: h2load, one thread. Proxy CPU is user+system of both proxies' processes (nginx: masters and workers) from /proc over the window; "+
		"resident sets are summed the same way (nginx's shared pages counted in each process). "+
		"In the HTTP/2 rows the client speaks h2c to the first proxy; \"HTTP/2 → HTTP/1.1\" is HTTP/1.1 between the proxies and to the backend (the sidecars for a port declared http, nginx proxy_pass), \"HTTP/2 → HTTP/2\" is HTTP/2 all the way (a port declared http2, nginx grpc_pass). "+
		"Load average at the end: %s.\n", o.runs, o.rateConns, o.slices, table.LoadAverage())
	if len(errs) > 0 {
		fmt.Fprintf(&b, "\nFailed requests in the measured windows: %s.\n", strings.Join(errs, ", "))
	}
	if e.nginxNote != "" {
		fmt.Fprintf(&b, "\nnginx column empty: %s.\n", e.nginxNote)
	}
	fmt.Fprintf(&b, "\nTargets (from the issue; a miss is reported, never fatal):\n")
	for _, v := range verdicts {
		if !v.is.ok || !v.ng.ok {
			fmt.Fprintf(&b, "- %s: not measured\n", v.what)
			continue
		}
		ok := v.is.med <= v.ng.med
		detail := fmt.Sprintf("%.3f ms vs %.3f ms", v.is.med*1e3, v.ng.med*1e3)
		if !v.lower {
			ok = v.is.med >= v.ng.med
			detail = fmt.Sprintf("%.0f vs %.0f, %.2f×", v.is.med, v.ng.med, v.is.med/v.ng.med)
		}
		verdictWord := "met"
		if !ok {
			verdictWord = "MISSED"
		}
		fmt.Fprintf(&b, "- %s: %s (%s)\n", v.what, verdictWord, detail)
	}
	return b.String()
}
