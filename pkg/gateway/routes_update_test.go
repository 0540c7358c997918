package gateway

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestRoutesUpdate(t *testing.T) {
	ep := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}), 8080)
	}
	sni := func(i int) string { return fmt.Sprintf("outbound_.80_._.svc-%d.demo.svc.cluster.local", i) }
	var all []Route
	for i := range 4 {
		all = append(all, route(sni(i), fmt.Sprintf("c%d", i), ep(i)))
	}
	old, err := NewRoutes(all)
	require.NoError(t, err)

	// svc-1 removed, svc-2 changed (given in upper case), svc-4 added.
	changed := route("OUTBOUND_.80_._.SVC-2.demo.svc.cluster.local", "c2", ep(22))
	added := route(sni(4), "c4", ep(4))
	got, err := old.Update([]string{sni(1), sni(2)}, []Route{changed, added})
	require.NoError(t, err)
	want, err := NewRoutes([]Route{all[0], changed, all[3], added})
	require.NoError(t, err)
	require.Equal(t, want.All(), got.All())
	require.Same(t, old.lookup(sni(0)), got.lookup(sni(0)), "a route kept is shared, cursor included")
	require.Equal(t, all, old.All(), "the old table is not modified")

	_, err = old.Update(nil, []Route{route(sni(3), "c3", ep(3)), {SNI: "bad name", Cluster: "c"}})
	require.ErrorContains(t, err, `route 0 (sni "outbound_.80_._.svc-3.demo.svc.cluster.local"): duplicate sni`)
	require.ErrorContains(t, err, `route 1 (sni "bad name"): server name has byte 0x20`)

	var empty *Routes
	got, err = empty.Update([]string{"x.example"}, []Route{added})
	require.NoError(t, err)
	require.Equal(t, 1, got.Len())
}
