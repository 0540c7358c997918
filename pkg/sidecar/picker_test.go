package sidecar

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/internal/outlier"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// loc is one locality of a test cluster: priority, weight (0: unset) and
// endpoints "ip:port", a "!" prefix for an unhealthy one.
type loc struct {
	priority int
	zone     string
	weight   uint32
	eps      []string
}

func pickerCluster(t testing.TB, locs ...loc) *xdsclient.Cluster {
	t.Helper()
	c := &xdsclient.Cluster{Name: "outbound|80||echo.demo.svc.clusterset.local", Type: xdsclient.EDS}
	for _, l := range locs {
		for len(c.Priorities) <= l.priority {
			c.Priorities = append(c.Priorities, xdsclient.Priority{})
		}
		le := xdsclient.LocalityEndpoints{Locality: xdsclient.Locality{Zone: l.zone}, Weight: l.weight}
		for _, s := range l.eps {
			healthy := s[0] != '!'
			if !healthy {
				s = s[1:]
			}
			ap := netip.MustParseAddrPort(s)
			le.Endpoints = append(le.Endpoints, xdsclient.Endpoint{Addr: ap, Port: ap.Port(), Healthy: healthy, Locality: le.Locality})
		}
		c.Priorities[l.priority].Localities = append(c.Priorities[l.priority].Localities, le)
	}
	return c
}

// picks counts n picks by endpoint.
func picks(t testing.TB, p *Picker, n int) map[string]int {
	t.Helper()
	got := map[string]int{}
	for range n {
		ep, ok := p.Pick()
		require.True(t, ok)
		got[ep.String()]++
	}
	return got
}

func TestPickerPriorities(t *testing.T) {
	for _, tc := range []struct {
		name string
		locs []loc
		want map[string]int // over 6 picks
	}{
		{
			name: "the lowest priority with a healthy endpoint, round robin",
			locs: []loc{
				{priority: 0, zone: "a", weight: 2, eps: []string{"10.0.0.1:80", "10.0.0.2:80", "!10.0.0.3:80"}},
				{priority: 1, zone: "b", weight: 5, eps: []string{"192.0.2.1:15443"}},
			},
			want: map[string]int{"10.0.0.1:80": 3, "10.0.0.2:80": 3},
		},
		{
			name: "priority 0 all unhealthy: fail over to 1",
			locs: []loc{
				{priority: 0, zone: "a", eps: []string{"!10.0.0.1:80", "!10.0.0.2:80"}},
				{priority: 1, zone: "b", weight: 5, eps: []string{"192.0.2.1:15443", "192.0.2.2:15443"}},
				{priority: 2, zone: "c", weight: 5, eps: []string{"198.51.100.1:15443"}},
			},
			want: map[string]int{"192.0.2.1:15443": 3, "192.0.2.2:15443": 3},
		},
		{
			name: "down to the last priority",
			locs: []loc{
				{priority: 0, zone: "a", eps: []string{"!10.0.0.1:80"}},
				{priority: 1, zone: "b", eps: []string{"!192.0.2.1:15443"}},
				{priority: 2, zone: "c", weight: 5, eps: []string{"198.51.100.1:15443"}},
			},
			want: map[string]int{"198.51.100.1:15443": 6},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := NewPicker(pickerCluster(t, tc.locs...), nil)
			require.Equal(t, tc.want, picks(t, p, 6))
		})
	}
}

func TestPickerNoHealthyEndpoint(t *testing.T) {
	for name, c := range map[string]*xdsclient.Cluster{
		"no endpoints":   {Name: "empty", Type: xdsclient.EDS},
		"all unhealthy":  pickerCluster(t, loc{zone: "a", eps: []string{"!10.0.0.1:80"}}, loc{priority: 1, eps: []string{"!192.0.2.1:15443"}}),
		"empty priority": pickerCluster(t, loc{zone: "a", weight: 3}),
	} {
		t.Run(name, func(t *testing.T) {
			_, ok := NewPicker(c, nil).Pick()
			require.False(t, ok)
		})
	}
}

// Localities are chosen in proportion to their weights; an unset weight
// counts the locality's healthy endpoints. The random draw is scripted:
// each value in [0, total) once.
func TestPickerLocalityWeights(t *testing.T) {
	for _, tc := range []struct {
		name string
		locs []loc
		want map[string]int
	}{
		{
			name: "set weights 1:3",
			locs: []loc{
				{zone: "a", weight: 1, eps: []string{"10.0.0.1:80"}},
				{zone: "b", weight: 3, eps: []string{"10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"}},
			},
			want: map[string]int{"10.0.0.1:80": 1, "10.0.1.1:80": 1, "10.0.1.2:80": 1, "10.0.1.3:80": 1},
		},
		{
			name: "unset weights count healthy endpoints",
			locs: []loc{
				{zone: "a", eps: []string{"10.0.0.1:80", "10.0.0.2:80", "!10.0.0.3:80"}},
				{zone: "b", eps: []string{"10.0.1.1:80", "!10.0.1.2:80"}},
			},
			want: map[string]int{"10.0.0.1:80": 1, "10.0.0.2:80": 1, "10.0.1.1:80": 1},
		},
		{
			name: "a locality with no healthy endpoint weighs nothing whatever its weight",
			locs: []loc{
				{zone: "a", weight: 100, eps: []string{"!10.0.0.1:80"}},
				{zone: "b", weight: 2, eps: []string{"10.0.1.1:80", "10.0.1.2:80"}},
			},
			want: map[string]int{"10.0.1.1:80": 1, "10.0.1.2:80": 1},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := NewPicker(pickerCluster(t, tc.locs...), nil)
			var draw uint64
			p.randN = func(n uint64) uint64 { v := draw % n; draw++; return v }
			n := 0
			for _, c := range tc.want {
				n += c
			}
			require.Equal(t, tc.want, picks(t, p, n))
		})
	}
}

// With the real random source the split follows the weights.
func TestPickerLocalityWeightsRandom(t *testing.T) {
	p := NewPicker(pickerCluster(t,
		loc{zone: "a", weight: 1, eps: []string{"10.0.0.1:80"}},
		loc{zone: "b", weight: 4, eps: []string{"10.0.1.1:80"}},
	), nil)
	got := picks(t, p, 10000)
	require.InDelta(t, 2000, got["10.0.0.1:80"], 300)
	require.InDelta(t, 8000, got["10.0.1.1:80"], 300)
}

// Passive health: an ejected endpoint is skipped within its locality, a
// locality whose endpoints are all ejected is skipped, a priority whose
// endpoints are all ejected fails over, and the ejection passes.
func TestPickerPassiveHealth(t *testing.T) {
	health := &outlier.Ejections{EjectFor: time.Hour}
	p := NewPicker(pickerCluster(t,
		loc{zone: "a", weight: 1, eps: []string{"10.0.0.1:80", "10.0.0.2:80"}},
		loc{zone: "b", weight: 1, eps: []string{"10.0.1.1:80"}},
		loc{priority: 1, zone: "c", weight: 1, eps: []string{"192.0.2.1:15443"}},
	), health)
	var draw uint64
	p.randN = func(n uint64) uint64 { v := draw % n; draw++; return v }

	health.Eject(netip.MustParseAddrPort("10.0.0.1:80"))
	require.Equal(t, map[string]int{"10.0.0.2:80": 2, "10.0.1.1:80": 2}, picks(t, p, 4))

	health.Eject(netip.MustParseAddrPort("10.0.0.2:80"))
	require.Equal(t, map[string]int{"10.0.1.1:80": 4}, picks(t, p, 4), "locality a is all ejected")

	health.Eject(netip.MustParseAddrPort("10.0.1.1:80"))
	require.Equal(t, map[string]int{"192.0.2.1:15443": 3}, picks(t, p, 3), "priority 0 is all ejected: fail over")

	health.Eject(netip.MustParseAddrPort("192.0.2.1:15443"))
	got := picks(t, p, 6)
	require.NotContains(t, got, "192.0.2.1:15443", "everything ejected: priority 0 again, ejections ignored")
	require.Equal(t, 6, got["10.0.0.1:80"]+got["10.0.0.2:80"]+got["10.0.1.1:80"])

	health.Restore(netip.MustParseAddrPort("10.0.0.1:80"))
	require.Equal(t, map[string]int{"10.0.0.1:80": 4}, picks(t, p, 4), "the restored endpoint takes priority 0's traffic")
}

// The endpoints left in a locality after an ejection share its turns
// evenly, as in Envoy's round robin; moving on to the next endpoint in
// the list gave that one the ejected one's turns too (10.0.0.2 took two
// thirds here).
func TestPickerEjectedEndpointsTurnsAreShared(t *testing.T) {
	health := &outlier.Ejections{EjectFor: time.Hour}
	p := NewPicker(pickerCluster(t, loc{zone: "a", weight: 1, eps: []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}}), health)
	health.Eject(netip.MustParseAddrPort("10.0.0.1:80"))
	require.Equal(t, map[string]int{"10.0.0.2:80": 15, "10.0.0.3:80": 15}, picks(t, p, 30))
}

// A cluster without priorities (not EDS) is one locality of its endpoints.
func TestPickerFlatCluster(t *testing.T) {
	c := &xdsclient.Cluster{Name: "static", Type: xdsclient.Static, Endpoints: []xdsclient.Endpoint{
		{Addr: netip.MustParseAddrPort("10.0.0.1:80"), Port: 80, Healthy: true},
		{Addr: netip.MustParseAddrPort("10.0.0.2:80"), Port: 80, Healthy: false},
		{Addr: netip.MustParseAddrPort("10.0.0.3:80"), Port: 80, Healthy: true},
	}}
	p := NewPicker(c, nil)
	require.Equal(t, 2, p.Healthy())
	require.Equal(t, map[string]int{"10.0.0.1:80": 2, "10.0.0.3:80": 2}, picks(t, p, 4))
}

func benchPicker(b *testing.B, eject int) {
	var locs []loc
	for pr := range 3 {
		for z := range 3 {
			l := loc{priority: pr, zone: fmt.Sprint(z), weight: uint32(z + 1)}
			for e := range 10 {
				l.eps = append(l.eps, fmt.Sprintf("10.%d.%d.%d:8080", pr, z, e))
			}
			locs = append(locs, l)
		}
	}
	health := &outlier.Ejections{EjectFor: time.Hour}
	for e := range eject {
		health.Eject(netip.MustParseAddrPort(fmt.Sprintf("10.0.0.%d:8080", e)))
	}
	p := NewPicker(pickerCluster(b, locs...), health)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, ok := p.Pick(); !ok {
				b.Fatal("no endpoint")
			}
		}
	})
}

// BenchmarkPick: 3 priorities × 3 localities × 10 endpoints.
func BenchmarkPick(b *testing.B) {
	b.Run("healthy", func(b *testing.B) { benchPicker(b, 0) })
	b.Run("one ejected", func(b *testing.B) { benchPicker(b, 1) })
}
