// Package table is the results table of the benchmarks that measure
// latency against a target (make bench-federation, make
// bench-propagation): latency samples and their percentiles, rows that
// print our figure beside a reference measured in the same run (the
// peer) and beside the target with the ratio to each, and the
// notes under the table, in Markdown so the output pastes into an issue.
//
// A missed target prints MISSED; it never fails a benchmark.
package table

import (
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strings"
	"time"
)

// Samples are latencies in the order they were measured.
type Samples []time.Duration

// Pct is the p-th percentile by nearest rank: the smallest sample that at
// least p% of the samples do not exceed. Zero for no samples.
func (s Samples) Pct(p float64) time.Duration {
	if len(s) == 0 {
		return 0
	}
	sorted := slices.Clone(s)
	slices.Sort(sorted)
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// Max is the largest sample.
func (s Samples) Max() time.Duration { return s.Pct(100) }

// Minus gives s[i] - t[i] for each change both measured.
func (s Samples) Minus(t Samples) Samples {
	out := make(Samples, 0, min(len(s), len(t)))
	for i := range min(len(s), len(t)) {
		out = append(out, s[i]-t[i])
	}
	return out
}

// Unit says how a row's values print and compare.
type Unit int

// Units of rows.
const (
	Millis  Unit = iota // durations in seconds, printed in ms
	Seconds             // durations in seconds, printed in s
	MB                  // bytes, printed in MB (10^6)
	Rate                // per second; higher is better
	Count
)

func (u Unit) format(v float64) string {
	if math.IsNaN(v) {
		return "—"
	}
	switch u {
	case Millis:
		return fmt.Sprintf("%.1f ms", v*1e3)
	case Seconds:
		return fmt.Sprintf("%.2f s", v)
	case MB:
		return fmt.Sprintf("%.0f MB", v/1e6)
	case Rate:
		return fmt.Sprintf("%.1f /s", v)
	default:
		return fmt.Sprintf("%.0f", v)
	}
}

// None marks a value as not applicable.
var None = math.NaN()

// Row is one line of the results table. Durations are in seconds, sizes
// in bytes. NaN (None) means "not applicable".
type Row struct {
	Measure string
	Unit    Unit
	Ours    float64
	// Peer is the same-run reference (the section says what it is);
	// PeerWhat says what it is when it differs from the section's.
	Peer     float64
	PeerWhat string
	// Target is the bound: Ours must stay under it (above it for
	// rates).
	Target float64
	// Note is printed instead of the verdict when there is no target.
	Note string
}

// Secs is d in seconds, the unit of durations in rows.
func Secs(d time.Duration) float64 { return d.Seconds() }

// Section is a titled group of rows and what their peer is.
type Section struct {
	Title string
	Peer  string
	Rows  []Row
}

// Report collects the sections and the notes printed under the table.
type Report struct {
	sections []Section
	notes    []string
}

// Add appends a section.
func (r *Report) Add(s Section) { r.sections = append(r.sections, s) }

// Note adds a line under the table.
func (r *Report) Note(format string, args ...any) {
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}

func ratio(a, b float64) string {
	if math.IsNaN(a) || math.IsNaN(b) || b == 0 {
		return "—"
	}
	return fmt.Sprintf("%.2f", a/b)
}

func (rw Row) verdict() string {
	if math.IsNaN(rw.Target) {
		return rw.Note
	}
	if math.IsNaN(rw.Ours) {
		return "NOT MEASURED"
	}
	ok := rw.Ours <= rw.Target
	if rw.Unit == Rate {
		ok = rw.Ours >= rw.Target
	}
	if ok {
		return "ok"
	}
	return "MISSED"
}

// Write prints the table in Markdown, then the notes.
func (r *Report) Write(w io.Writer) {
	fmt.Fprintln(w, "| measure | ours | peer | ours/peer | target | ours/target | result |")
	fmt.Fprintln(w, "| --- | ---: | ---: | ---: | ---: | ---: | --- |")
	for _, s := range r.sections {
		title := "**" + s.Title + "**"
		if s.Peer != "" {
			title += " — peer: " + s.Peer
		}
		fmt.Fprintf(w, "| %s | | | | | | |\n", title)
		for _, rw := range s.Rows {
			peer := rw.Unit.format(rw.Peer)
			if rw.PeerWhat != "" && !math.IsNaN(rw.Peer) {
				peer += " (" + rw.PeerWhat + ")"
			}
			fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s |\n",
				rw.Measure, rw.Unit.format(rw.Ours), peer, ratio(rw.Ours, rw.Peer),
				rw.Unit.format(rw.Target), ratio(rw.Ours, rw.Target), rw.verdict())
		}
	}
	if len(r.notes) > 0 {
		fmt.Fprintln(w)
		for _, n := range r.notes {
			fmt.Fprintln(w, "- "+strings.TrimSpace(n))
		}
	}
}

// quantiles are the rows of a latency: name and percentile.
var quantiles = []struct {
	name string
	p    float64
}{{"p50", 50}, {"p90", 90}, {"p99", 99}, {"max", 100}}

// LatencyRows gives p50, p90, p99 and max of ours beside the peer's, with
// the target applied to p99 only: a bound on the tail.
func LatencyRows(what string, ours, peer Samples, p99Target float64, note string) []Row {
	return latencyRows(what, ours, peer, note, func(q string) float64 {
		if q == "p99" {
			return p99Target
		}
		return None
	})
}

// BoundRows gives p50, p90, p99 and max of ours beside the peer's, with
// the target applied to every row: a bound every change must keep, so
// each row shows its ratio to it.
func BoundRows(what string, ours, peer Samples, target float64, note string) []Row {
	return latencyRows(what, ours, peer, note, func(string) float64 { return target })
}

func latencyRows(what string, ours, peer Samples, note string, target func(quantile string) float64) []Row {
	out := make([]Row, 0, len(quantiles))
	for _, q := range quantiles {
		rw := Row{Measure: fmt.Sprintf("%s, %s (n=%d)", what, q.name, len(ours)), Unit: Millis,
			Ours: Secs(ours.Pct(q.p)), Peer: None, Target: target(q.name), Note: note}
		if len(ours) == 0 {
			rw.Ours = None
		}
		if len(peer) > 0 {
			rw.Peer = Secs(peer.Pct(q.p))
		}
		out = append(out, rw)
	}
	return out
}

// LoadAverage is the first three fields of /proc/loadavg, for the notes:
// the machine is shared and figures move with what else runs.
func LoadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
