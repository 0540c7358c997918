package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"
)

// samples are latencies in the order they were measured.
type samples []time.Duration

// pct is the p-th percentile by nearest rank: the smallest sample that at
// least p% of the samples do not exceed.
func (s samples) pct(p float64) time.Duration {
	if len(s) == 0 {
		return 0
	}
	sorted := slices.Clone(s)
	slices.Sort(sorted)
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func (s samples) max() time.Duration { return s.pct(100) }

// minus gives s[i] - t[i] for each change both measured.
func (s samples) minus(t samples) samples {
	out := make(samples, 0, min(len(s), len(t)))
	for i := range min(len(s), len(t)) {
		out = append(out, s[i]-t[i])
	}
	return out
}

// unit says how a row's values print and compare.
type unit int

const (
	unitMillis unit = iota // durations, printed in ms
	unitSeconds
	unitMB   // bytes, printed in MB (10^6)
	unitRate // per second; higher is better
	unitCount
)

func (u unit) format(v float64) string {
	if math.IsNaN(v) {
		return "—"
	}
	switch u {
	case unitMillis:
		return fmt.Sprintf("%.1f ms", v*1e3)
	case unitSeconds:
		return fmt.Sprintf("%.2f s", v)
	case unitMB:
		return fmt.Sprintf("%.0f MB", v/1e6)
	case unitRate:
		return fmt.Sprintf("%.1f /s", v)
	default:
		return fmt.Sprintf("%.0f", v)
	}
}

var none = math.NaN()

// row is one line of the results table. Durations are in seconds, sizes
// in bytes. NaN means "not applicable".
type row struct {
	measure string
	unit    unit
	ours    float64
	// peer is the same-run reference (see the package documentation);
	// peerWhat says what it is when it differs from the section's.
	peer     float64
	peerWhat string
	// target is the bound: ours must stay under it (above it for
	// rates).
	target float64
	// note is printed instead of the verdict when there is no target.
	note string
}

func secs(d time.Duration) float64 { return d.Seconds() }

// section is a titled group of rows with the peer's meaning.
type section struct {
	title string
	peer  string
	rows  []row
}

// report collects the sections and the notes printed under the table.
type report struct {
	sections []section
	notes    []string
}

func (r *report) add(s section) { r.sections = append(r.sections, s) }

func (r *report) note(format string, args ...any) {
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}

func ratio(a, b float64) string {
	if math.IsNaN(a) || math.IsNaN(b) || b == 0 {
		return "—"
	}
	return fmt.Sprintf("%.2f", a/b)
}

func (rw row) verdict() string {
	if math.IsNaN(rw.target) {
		return rw.note
	}
	if math.IsNaN(rw.ours) {
		return "NOT MEASURED"
	}
	ok := rw.ours <= rw.target
	if rw.unit == unitRate {
		ok = rw.ours >= rw.target
	}
	if ok {
		return "ok"
	}
	return "MISSED"
}

// write prints the table in Markdown, so it pastes into an issue as is.
func (r *report) write(w io.Writer) {
	fmt.Fprintln(w, "| measure | ours | peer | ours/peer | target | ours/target | result |")
	fmt.Fprintln(w, "| --- | ---: | ---: | ---: | ---: | ---: | --- |")
	for _, s := range r.sections {
		title := "**" + s.title + "**"
		if s.peer != "" {
			title += " — peer: " + s.peer
		}
		fmt.Fprintf(w, "| %s | | | | | | |\n", title)
		for _, rw := range s.rows {
			peer := rw.unit.format(rw.peer)
			if rw.peerWhat != "" && !math.IsNaN(rw.peer) {
				peer += " (" + rw.peerWhat + ")"
			}
			fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s |\n",
				rw.measure, rw.unit.format(rw.ours), peer, ratio(rw.ours, rw.peer),
				rw.unit.format(rw.target), ratio(rw.ours, rw.target), rw.verdict())
		}
	}
	if len(r.notes) > 0 {
		fmt.Fprintln(w)
		for _, n := range r.notes {
			fmt.Fprintln(w, "- "+strings.TrimSpace(n))
		}
	}
}

// latencyRows gives p50, p90, p99 and max of ours beside the peer's, with
// the target applied to p99 only.
func latencyRows(what string, ours, peer samples, p99Target float64, note string) []row {
	var out []row
	for _, q := range []struct {
		name string
		p    float64
	}{{"p50", 50}, {"p90", 90}, {"p99", 99}, {"max", 100}} {
		rw := row{measure: fmt.Sprintf("%s, %s (n=%d)", what, q.name, len(ours)), unit: unitMillis,
			ours: secs(ours.pct(q.p)), peer: none, target: none, note: note}
		if len(ours) == 0 {
			rw.ours = none
		}
		if len(peer) > 0 {
			rw.peer = secs(peer.pct(q.p))
		}
		if q.name == "p99" {
			rw.target = p99Target
		}
		out = append(out, rw)
	}
	return out
}
