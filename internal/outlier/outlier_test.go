package outlier

import (
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestEjections(t *testing.T) {
	e := Ejections{EjectFor: time.Minute}
	a := netip.MustParseAddrPort("10.0.0.1:80")
	b := netip.MustParseAddrPort("10.0.0.2:80")
	now := time.Now().UnixNano()
	require.False(t, e.Any())
	require.False(t, e.Ejected(a, now))

	e.Eject(a)
	require.True(t, e.Any())
	require.True(t, e.Ejected(a, now))
	require.False(t, e.Ejected(b, now))
	require.False(t, e.Ejected(a, time.Now().Add(2*time.Minute).UnixNano()), "the ejection passed")
	require.Equal(t, 0, e.Len(), "and was forgotten")

	e.Eject(b)
	e.Restore(b)
	require.False(t, e.Ejected(b, now))
	require.False(t, e.Any())
}

// Ejections that have passed are dropped when the set changes, though
// nothing asks about their endpoints again (they left the routes): the
// set does not grow with pod churn.
func TestEjectionsForgetPassed(t *testing.T) {
	e := Ejections{EjectFor: time.Millisecond}
	for i := range 200 {
		e.Eject(netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 80))
	}
	time.Sleep(20 * time.Millisecond) // every one of them has passed
	e.EjectFor = time.Minute
	fresh := netip.MustParseAddrPort("10.2.0.1:80")
	e.Eject(fresh)
	require.Equal(t, 1, e.Len(), "only the ejection still running is kept")
	require.True(t, e.Ejected(fresh, time.Now().UnixNano()))
}
