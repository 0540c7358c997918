package main

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// The candidate's table repeats every row of the main one, as
// candidate/isthmus, and only when a candidate ran; the targets are
// judged on isthmus alone.
func TestTableCandidate(t *testing.T) {
	r := newResults()
	for _, w := range []struct {
		target         string
		gbit, conns, s float64
	}{
		{"isthmus", 10, 1500, 3}, {"nginx", 9, 1600, 2}, {"direct", 12, 2000, 0}, {"candidate", 11, 1650, 3},
	} {
		r.add("bulk1", w.target, window{count: w.gbit * 1e9 / 8 * 10, seconds: 10, cpu: w.s})
		r.add("bulk64", w.target, window{count: w.gbit * 1e9 / 8 * 10, seconds: 10, cpu: w.s})
		r.add("conns", w.target, window{count: w.conns * 10, seconds: 10, cpu: w.s})
	}
	idle := map[string]float64{"isthmus": 23.4, "nginx": 28, "candidate": 24}
	peak := map[string]float64{"isthmus": 28, "nginx": 33, "candidate": 29}
	all := []target{{name: "isthmus"}, {name: "candidate"}, {name: "nginx"}, {name: "direct"}}

	out := r.table(all, "", idle, peak, 1000, 16)
	main, cand, ok := strings.Cut(out, "| measure | isthmus | candidate | candidate/isthmus |")
	require.True(t, ok, "no candidate table:\n%s", out)
	var rows []string // the main table's measures
	for _, line := range strings.Split(main, "\n") {
		if strings.HasPrefix(line, "| ") && !strings.HasPrefix(line, "| measure |") {
			name, _, _ := strings.Cut(line[2:], " | ")
			rows = append(rows, name)
		}
	}
	require.Len(t, rows, 8)
	for _, name := range rows {
		require.Contains(t, cand, "| "+name+" |")
	}
	require.Contains(t, cand, "| bulk throughput, 1 connection (Gbit/s) | 10.00 | 11.00 | 1.10× |")
	require.Contains(t, cand, "| new connections, 16 clients (full mTLS handshakes/s) | 1500 | 1650 | 1.10× |")
	require.Contains(t, cand, "- connection rate ≥ 1.0× nginx: MISSED (0.94×)")
	require.Contains(t, cand, "- throughput, 1 connection ≥ 1.0× nginx: met (1.11×)")

	require.NotContains(t, r.table(all[:1], "", idle, peak, 1000, 16), "candidate")
}
