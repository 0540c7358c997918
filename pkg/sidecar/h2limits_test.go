package sidecar

import (
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2/hpack"
)

// A request whose header block is over the 64 KiB the sidecar advertises
// (in several CONTINUATION frames) is answered 431 on its own stream, and
// the connection's other streams go on; net/http's server did the same up
// to its own limit.
func TestH2OversizedHeadersAre431(t *testing.T) {
	m, _, _ := startLifeMesh(t, nil, netip.AddrPort{})
	host := h2Svc.host()
	r := dialRawH2(t, m.a, host)
	require.EqualValues(t, h2MaxHeaderList, r.peer[0x6], "SETTINGS_MAX_HEADER_LIST_SIZE")
	fields := append(requestFields(http.MethodGet, host, "/id?n=big"),
		hpack.HeaderField{Name: "x-big-1", Value: strings.Repeat("a", 40<<10)},
		hpack.HeaderField{Name: "x-big-2", Value: strings.Repeat("b", 40<<10)})
	require.NoError(t, r.writeHeaders(1, true, fields))
	require.NoError(t, r.writeHeaders(3, true, requestFields(http.MethodGet, host, "/id?n=after")))
	ev := newRawEvents(65535)
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.done(1) && ev.done(3) })
	require.NoError(t, ev.err)
	require.False(t, ev.goAway, "the connection stays")
	require.Equal(t, "431", ev.status[1], string(ev.body[1]))
	require.Contains(t, string(ev.body[1]), "request headers exceed")
	require.Equal(t, "200", ev.status[3])
	require.Equal(t, "id=after proto=HTTP/2.0", string(ev.body[3]))
}
