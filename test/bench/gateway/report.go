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
	row := func(name string, prec int, withDirect bool, get func(target string) stat) (is, ng, di stat) {
		is, ng = get("isthmus"), get("nginx")
		if withDirect {
			di = get("direct")
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", name, cell(is, prec), cell(ng, prec), cell(di, prec), ratio(is, ng), ratio(is, di))
		return is, ng, di
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
	t1, n1, d1 := row("bulk throughput, 1 connection (Gbit/s)", 2, true, measured("bulk1", gbps))
	t64, n64, d64 := row("bulk throughput, 64 connections (Gbit/s)", 2, true, measured("bulk64", gbps))
	tc, nc, _ := row(fmt.Sprintf("new connections, %d clients (full mTLS handshakes/s)", hsConc), 0, true, measured("conns", rate))
	row("proxy CPU per GB, 1 connection (s, lower is better)", 3, false, measured("bulk1", perGB))
	row("proxy CPU per GB, 64 connections (s, lower is better)", 3, false, measured("bulk64", perGB))
	row("proxy CPU per 1,000 connections (s, lower is better)", 3, false, measured("conns", per1k))
	mi, _, _ := row(fmt.Sprintf("proxy resident set, idle with %d routes (MB)", nRoutes), 1, false, fixed(idle))
	mp, _, _ := row("proxy peak resident set, after all runs (MB)", 1, false, fixed(peak))
	if has["candidate"] {
		fmt.Fprintf(&b, "\n| measure | isthmus | candidate | candidate/isthmus |\n|---|---|---|---|\n")
		vsCandidate := func(name string, prec int, get func(target string) stat) {
			is, c := get("isthmus"), get("candidate")
			fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", name, cell(is, prec), cell(c, prec), ratio(c, is))
		}
		vsCandidate("bulk throughput, 1 connection (Gbit/s)", 2, measured("bulk1", gbps))
		vsCandidate("bulk throughput, 64 connections (Gbit/s)", 2, measured("bulk64", gbps))
		vsCandidate("new connections (full mTLS handshakes/s)", 0, measured("conns", rate))
		vsCandidate("proxy CPU per GB, 1 connection (s)", 3, measured("bulk1", perGB))
		vsCandidate("proxy CPU per GB, 64 connections (s)", 3, measured("bulk64", perGB))
		vsCandidate("proxy CPU per 1,000 connections (s)", 3, measured("conns", per1k))
		vsCandidate("proxy resident set, idle (MB)", 1, fixed(idle))
		vsCandidate("proxy peak resident set (MB)", 1, fixed(peak))
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
	vs := func(a, c stat, min float64, what string) {
		if !a.ok || !c.ok {
			fmt.Fprintf(&b, "- %s: not measured\n", what)
			return
		}
		check(what, a.med >= min*c.med, fmt.Sprintf("%.2f×", a.med/c.med))
	}
	vs(t1, n1, 1.0, "throughput, 1 connection ≥ 1.0× nginx")
	vs(t64, n64, 1.0, "throughput, 64 connections ≥ 1.0× nginx")
	vs(t1, d1, 0.8, "throughput, 1 connection ≥ 0.8× direct")
	vs(t64, d64, 0.8, "throughput, 64 connections ≥ 0.8× direct")
	vs(tc, nc, 1.0, "connection rate ≥ 1.0× nginx")
	if mi.ok {
		check(fmt.Sprintf("gateway memory < 30 MB with %d routes, idle", nRoutes), mi.med < 30, fmt.Sprintf("%.1f MB", mi.med))
	}
	if mp.ok {
		check("gateway memory < 30 MB, peak under this load", mp.med < 30, fmt.Sprintf("%.1f MB", mp.med))
	}
	return b.String()
}
