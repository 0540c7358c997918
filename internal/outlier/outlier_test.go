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
