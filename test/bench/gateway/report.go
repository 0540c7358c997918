package main

import (
	"fmt"
	"slices"
	"strings"
)

type results struct {
	windows map[string]map[string][]window // measure → target → runs
}

func newResults() *results { return &results{windows: map[string]map[string][]window{}} }

func (r *results) add(measure, target string, w window) {
	if r.windows[measure] == nil {
		r.windows[measure] = map[string][]window{}
	}
	r.windows[measure][target] = append(r.windows[measure][target], w)
}

func (w window) describe(bulk bool) string {
	s := ""
	if bulk {
		s = fmt.Sprintf("%6.2f Gbit/s", w.count*8/w.seconds/1e9)
		if w.cpu > 0 {
			s += fmt.Sprintf("  proxy CPU %.2f s (%.3f s/GB)", w.cpu, w.cpu/(w.count/1e9))
		}
	} else {
		s = fmt.Sprintf("%7.0f conn/s", w.count/w.seconds)
		if w.cpu > 0 {
			s += fmt.Sprintf("  proxy CPU %.2f s (%.3f s per 1,000)", w.cpu, w.cpu/(w.count/1000))
		}
	}
	if w.errors > 0 {
		s += fmt.Sprintf("  %d errors", w.errors)
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

func (r *results) stat(measure, target string, f func(window) float64) stat {
	var vs []float64
	for _, w := range r.windows[measure][target] {
		vs = append(vs, f(w))
	}
	return statOf(vs)
}

func (r *results) table(targets []target, nginxNote string, idle, peak map[string]float64, nRoutes, hsConc int) string {
	has := map[string]bool{}
	for _, t := range targets {
		has[t.name] = true
	}
	gbps := func(w window) float64 { return w.count * 8 / w.seconds / 1e9 }
	rate := func(w window) float64 { return w.count / w.seconds }
	perGB := func(w window) float64 { return w.cpu / (w.count / 1e9) }
	per1k := func(w window) float64 { return w.cpu / (w.count / 1000) }

	var b strings.Builder
	fmt.Fprintf(&b, "\n| measure | isthmus | nginx | direct | isthmus/nginx | isthmus/direct |\n|---|---|---|---|---|---|\n")
	cell := func(s stat, prec int) string {
		if !s.ok {
			return "–"
		}
		if s.lo == s.hi {
			return fmt.Sprintf("%.*f", prec, s.med)
		}
		return fmt.Sprintf("%.*f [%.*f–%.*f]", prec, s.med, prec, s.lo, prec, s.hi)
	}
	ratio := func(a, c stat) string {
		if !a.ok || !c.ok || c.med == 0 {
			return "–"
		}
		return fmt.Sprintf("%.2f×", a.med/c.med)
	}
	measured := func(measure string, f func(window) float64) func(string) stat {
		return func(t string) stat { return r.stat(measure, t, f) }
	}
	fixed := func(m map[string]float64) func(string) stat {
		return func(t string) stat {
			v, ok := m[t]
			return stat{med: v, lo: v, hi: v, ok: ok}
		}
	}
	// The rows of both tables; direct has a column only where it moves
	// bytes or connections.
	type row struct {
		name   string
		prec   int
		direct bool
		get    func(target string) stat
	}
	bulk1 := row{"bulk throughput, 1 connection (Gbit/s)", 2, true, measured("bulk1", gbps)}
	bulk64 := row{"bulk throughput, 64 connections (Gbit/s)", 2, true, measured("bulk64", gbps)}
	conns := row{fmt.Sprintf("new connections, %d clients (full mTLS handshakes/s)", hsConc), 0, true, measured("conns", rate)}
	memIdle := row{fmt.Sprintf("proxy resident set, idle with %d routes (MB)", nRoutes), 1, false, fixed(idle)}
	memPeak := row{"proxy peak resident set, after all runs (MB)", 1, false, fixed(peak)}
	rows := []row{
		bulk1, bulk64, conns,
		{"proxy CPU per GB, 1 connection (s, lower is better)", 3, false, measured("bulk1", perGB)},
		{"proxy CPU per GB, 64 connections (s, lower is better)", 3, false, measured("bulk64", perGB)},
		{"proxy CPU per 1,000 connections (s, lower is better)", 3, false, measured("conns", per1k)},
		memIdle, memPeak,
	}
	for _, rw := range rows {
		is, ng := rw.get("isthmus"), rw.get("nginx")
		var di stat
		if rw.direct {
			di = rw.get("direct")
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", rw.name, cell(is, rw.prec), cell(ng, rw.prec), cell(di, rw.prec), ratio(is, ng), ratio(is, di))
	}
	if has["candidate"] {
		fmt.Fprintf(&b, "\n| measure | isthmus | candidate | candidate/isthmus |\n|---|---|---|---|\n")
		for _, rw := range rows {
			is, c := rw.get("isthmus"), rw.get("candidate")
			fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", rw.name, cell(is, rw.prec), cell(c, rw.prec), ratio(c, is))
		}
	}
	var errs []string
	for _, m := range []string{"bulk1", "bulk64", "conns"} {
		for _, t := range targets {
			n := int64(0)
			for _, w := range r.windows[m][t.name] {
				n += w.errors
			}
			if n > 0 {
				errs = append(errs, fmt.Sprintf("%s %s: %d", m, t.name, n))
			}
		}
	}
	if len(errs) > 0 {
		fmt.Fprintf(&b, "\nClient errors in the measured windows: %s.\n", strings.Join(errs, ", "))
	}
	if nginxNote != "" {
		fmt.Fprintf(&b, "\nnginx column empty: %s.\n", nginxNote)
	}
	fmt.Fprintf(&b, "\nnginx's figures sum its master and worker processes (shared pages counted in each).\n\nTargets (from the issue; a miss is reported, never fatal):\n")
	check := func(what string, ok bool, detail string) {
		verdict := "met"
		if !ok {
			verdict = "MISSED"
		}
		fmt.Fprintf(&b, "- %s: %s (%s)\n", what, verdict, detail)
	}
	vs := func(rw row, min float64, peer, what string) {
		a, c := rw.get("isthmus"), rw.get(peer)
		if !a.ok || !c.ok {
			fmt.Fprintf(&b, "- %s: not measured\n", what)
			return
		}
		check(what, a.med >= min*c.med, fmt.Sprintf("%.2f×", a.med/c.med))
	}
	vs(bulk1, 1.0, "nginx", "throughput, 1 connection ≥ 1.0× nginx")
	vs(bulk64, 1.0, "nginx", "throughput, 64 connections ≥ 1.0× nginx")
	vs(bulk1, 0.8, "direct", "throughput, 1 connection ≥ 0.8× direct")
	vs(bulk64, 0.8, "direct", "throughput, 64 connections ≥ 0.8× direct")
	vs(conns, 1.0, "nginx", "connection rate ≥ 1.0× nginx")
	if mi := memIdle.get("isthmus"); mi.ok {
		check(fmt.Sprintf("gateway memory < 30 MB with %d routes, idle", nRoutes), mi.med < 30, fmt.Sprintf("%.1f MB", mi.med))
	}
	if mp := memPeak.get("isthmus"); mp.ok {
		check("gateway memory < 30 MB, peak under this load", mp.med < 30, fmt.Sprintf("%.1f MB", mp.med))
	}
	return b.String()
}
