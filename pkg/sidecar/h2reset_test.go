package sidecar

import (
	"net/netip"
	"testing"

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
