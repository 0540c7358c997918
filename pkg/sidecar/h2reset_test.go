package sidecar

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"
)

// A client that opens streams and resets them at once ("rapid reset",
// CVE-2023-44487) is cut off with ENHANCE_YOUR_CALM once it opened
// h2PrematureResets streams and reset most of them; one that cancels a
// few of many streams is not.
func TestH2RapidResetClosesTheConnection(t *testing.T) {
	m, _, _ := startLifeMesh(t, nil, netip.AddrPort{})
	r := dialRawH2(t, m.a, h2Svc.host())
	fields := requestFields("GET", h2Svc.host(), "/id")
	id := uint32(1)
	for ; id < 2*(h2PrematureResets+10); id += 2 {
		if r.writeHeaders(id, true, fields) != nil || r.fr.WriteRSTStream(id, http2.ErrCodeCancel) != nil {
			break // the sidecar closed it
		}
	}
	ev := newRawEvents(65535)
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.goAway })
	require.True(t, ev.goAway, "GOAWAY before the connection ended: %v", ev.err)
	require.Equal(t, http2.ErrCodeEnhanceYourCalm, ev.goAwayCode)
	require.LessOrEqual(t, ev.goAwayLast, uint32(2*h2PrematureResets+1), "cut off at the threshold, not later")

	// The sidecar still serves a well-behaved connection.
	c := dialH2(t, m.a, h2Svc.host())
	res := c.get(t, "/id")
	require.NoError(t, res.err)
	require.Equal(t, 200, res.code, res.body)
}

func TestH2SomeResetsAreFine(t *testing.T) {
	m, _, _ := startLifeMesh(t, nil, netip.AddrPort{})
	r := dialRawH2(t, m.a, h2Svc.host())
	fields := requestFields("GET", h2Svc.host(), "/id")
	// 600 streams, one in three reset at once: the rest are answered.
	var answered []uint32
	for i := range 600 {
		id := uint32(2*i + 1)
		require.NoError(t, r.writeHeaders(id, true, fields))
		if i%3 == 0 {
			require.NoError(t, r.fr.WriteRSTStream(id, http2.ErrCodeCancel))
		} else {
			answered = append(answered, id)
		}
		if i%50 == 49 { // keep the open streams under the sidecar's limit
			ev := newRawEvents(65535)
			r.pump(t, ev, func(ev *rawEvents) bool {
				for _, a := range answered {
					if !ev.done(a) {
						return ev.goAway
					}
				}
				return true
			})
			require.False(t, ev.goAway, "no GOAWAY: %v", ev.goAwayCode)
			answered = answered[:0]
		}
	}
}

// Clients that reset their streams soon after opening them, each below
// the rapid-reset threshold of its own connection to a, cost no other
// caller's stream: a stops opening streams on the upstream connection
// the resets went over before b (whose inbound side counts them by the
// same rule) could close it. Here 600 streams reach b's app and are
// reset, on the pool connection that also carries a long /echo stream;
// b would otherwise close that connection and the /echo stream with it.
// The connection is fresh, or has carried requests before: a retirement
// that only looked at the share of resets so far did not protect a
// connection with a history.
func TestH2ResetStormDoesNotCostOtherStreams(t *testing.T) {
	for _, before := range []int{0, 300} {
		t.Run(fmt.Sprintf("after %d requests", before), func(t *testing.T) {
			m, app, _ := startLifeMesh(t, nil, netip.AddrPort{})
			c := dialH2(t, m.a, h2Svc.host())
			for i := range before {
				res := c.get(t, fmt.Sprintf("/id?n=%d", i))
				require.Equal(t, 200, res.code, res.body)
			}
			pr, pw := io.Pipe()
			t.Cleanup(func() { _ = pw.Close() })
			go func() { _, _ = io.WriteString(pw, "before\n") }()
			resp, err := c.cc.RoundTrip(c.request(t, http.MethodPost, "/echo", pr))
			require.NoError(t, err)
			defer resp.Body.Close()
			echo := bufio.NewReader(resp.Body)
			line, err := echo.ReadString('\n')
			require.NoError(t, err)
			require.Equal(t, "before\n", line)

			storm := app.req("storm")
			fields := requestFields("GET", h2Svc.host(), "/hold?tag=storm")
			const batch, batches = 100, 3
			var sent int64
			for range 2 {
				r := dialRawH2(t, m.a, h2Svc.host())
				id := uint32(1)
				for range batches {
					first := id
					for range batch {
						require.NoError(t, r.writeHeaders(id, true, fields))
						id += 2
					}
					sent += batch
					require.Eventually(t, func() bool { return storm.arrived.Load() == sent }, waitFor, 5*time.Millisecond,
						"%d of %d held requests reached b's app", storm.arrived.Load(), sent)
					for id := first; id < first+2*batch; id += 2 {
						require.NoError(t, r.fr.WriteRSTStream(id, http2.ErrCodeCancel))
					}
				}
			}
			// Time for b to act on the last resets, were it to.
			time.Sleep(200 * time.Millisecond)

			_, err = io.WriteString(pw, "after\n")
			require.NoError(t, err)
			line, err = echo.ReadString('\n')
			require.NoError(t, err, "the /echo stream outlived the resets")
			require.Equal(t, "after\n", line)
			require.NoError(t, pw.Close())
			rest, err := io.ReadAll(echo)
			require.NoError(t, err)
			require.Empty(t, rest)

			res := dialH2(t, m.a, h2Svc.host()).get(t, "/id?n=7")
			require.NoError(t, res.err)
			require.Equal(t, 200, res.code, res.body)
		})
	}
}
