package table

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func ms(v ...int) Samples {
	out := make(Samples, len(v))
	for i, x := range v {
		out[i] = time.Duration(x) * time.Millisecond
	}
	return out
}

func TestPct(t *testing.T) {
	for _, tc := range []struct {
		name string
		s    Samples
		p    float64
		want time.Duration
	}{
		{"empty", nil, 50, 0},
		{"one", ms(7), 99, 7 * time.Millisecond},
		{"median of four is the second by nearest rank", ms(40, 10, 30, 20), 50, 20 * time.Millisecond},
		{"p99 of ten is the largest", ms(1, 2, 3, 4, 5, 6, 7, 8, 9, 10), 99, 10 * time.Millisecond},
		{"p90 of ten is the ninth", ms(10, 9, 8, 7, 6, 5, 4, 3, 2, 1), 90, 9 * time.Millisecond},
		{"p0 is the smallest", ms(3, 1, 2), 0, time.Millisecond},
		{"negative samples sort first", ms(-2, 5, 1), 50, time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, tc.s.Pct(tc.p))
		})
	}
	s := ms(3, 1, 2)
	_ = s.Pct(50)
	require.Equal(t, ms(3, 1, 2), s, "Pct must not reorder the samples")
	require.Equal(t, ms(2, -1), ms(5, 1, 9).Minus(ms(3, 2)), "Minus pairs changes by index, as many as both have")
}

func TestWrite(t *testing.T) {
	var r Report
	r.Add(Section{Title: "Export", Peer: "the Create call", Rows: BoundRows("→ routable", ms(100, 200, 1500), ms(5, 5, 6), 1, "")})
	r.Add(Section{Title: "Other", Rows: append(LatencyRows("stage", ms(10), nil, None, "no bound"),
		Row{Measure: "rate", Unit: Rate, Ours: 12, Peer: None, Target: 10})})
	r.Note("  a note  ")
	var b strings.Builder
	r.Write(&b)
	out := b.String()
	for _, want := range []string{
		"| **Export** — peer: the Create call | | | | | | |\n",
		"| → routable, p50 (n=3) | 200.0 ms | 5.0 ms | 40.00 | 1000.0 ms | 0.20 | ok |\n",
		"| → routable, max (n=3) | 1500.0 ms | 6.0 ms | 250.00 | 1000.0 ms | 1.50 | MISSED |\n",
		"| **Other** | | | | | | |\n",
		"| stage, p99 (n=1) | 10.0 ms | — | — | — | — | no bound |\n",
		"| rate | 12.0 /s | — | — | 10.0 /s | 1.20 | ok |\n",
		"\n- a note\n",
	} {
		require.Contains(t, out, want)
	}
	// LatencyRows bounds p99 only.
	rows := LatencyRows("x", ms(1, 2), nil, 0.5, "")
	require.Len(t, rows, 4)
	for _, rw := range rows {
		require.Equal(t, strings.Contains(rw.Measure, "p99"), rw.Target == 0.5, rw.Measure)
	}
}
