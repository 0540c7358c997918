package catalog

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func echo() Service {
	return Service{
		Namespace: "demo", Name: "echo", Cluster: "a",
		Ports: []Port{{Name: "http", Port: 8080, AppProtocol: "http"}, {Name: "grpc", Port: 7070, Protocol: ProtocolTCP}},
		Endpoints: []LocalityEndpoints{
			{Locality: Locality{Region: "r1", Zone: "z2"}, Ready: 1},
			{Locality: Locality{Region: "r1", Zone: "z1"}, Ready: 2, NotReady: 1},
			{Locality: Locality{Region: "r1", Zone: "z2"}, Ready: 3},
			{Locality: Locality{Region: "r9"}},
		},
	}
}

func TestPutNormalizes(t *testing.T) {
	snap, err := NewSnapshot(LocalSource, []Service{echo()})
	require.NoError(t, err)
	got, ok := snap.Get(ServiceKey{Namespace: "demo", Name: "echo"})
	require.True(t, ok)
	require.Equal(t, []Port{
		{Name: "grpc", Port: 7070, Protocol: ProtocolTCP},
		{Name: "http", Port: 8080, Protocol: ProtocolTCP, AppProtocol: "http"},
	}, got.Ports)
	require.Equal(t, []LocalityEndpoints{
		{Locality: Locality{Region: "r1", Zone: "z1"}, Ready: 2, NotReady: 1},
		{Locality: Locality{Region: "r1", Zone: "z2"}, Ready: 4},
	}, got.Endpoints, "localities sorted, duplicates merged, empty ones dropped")
	require.Equal(t, 6, got.ReadyEndpoints())
	require.Equal(t, "r1/z1", got.Endpoints[0].Locality.String())
}

func TestVersionIsContent(t *testing.T) {
	a := echo()
	b := echo()
	// Same content in another order: same version.
	b.Ports[0], b.Ports[1] = b.Ports[1], b.Ports[0]
	b.Endpoints[0], b.Endpoints[2] = b.Endpoints[2], b.Endpoints[0]
	s1, err := NewSnapshot(LocalSource, []Service{a})
	require.NoError(t, err)
	s2, err := NewSnapshot(LocalSource, []Service{b})
	require.NoError(t, err)
	require.Equal(t, s1.Version(), s2.Version())

	// One more ready endpoint: a new version.
	bld := s1.Builder()
	c := echo()
	c.Endpoints[0].Ready++
	require.NoError(t, bld.Put(c))
	s3 := bld.Build()
	require.NotEqual(t, s1.Version(), s3.Version())

	// The old snapshot is untouched.
	old, _ := s1.Get(a.Key())
	require.Equal(t, 6, old.ReadyEndpoints())
	now, _ := s3.Get(a.Key())
	require.Equal(t, 7, now.ReadyEndpoints())

	// Another source with equal services: another version.
	s4, err := NewSnapshot("peer-b", []Service{a})
	require.NoError(t, err)
	require.NotEqual(t, s1.Version(), s4.Version())
}

func TestBuilderNoChangeReturnsBase(t *testing.T) {
	s1, err := NewSnapshot(LocalSource, []Service{echo()})
	require.NoError(t, err)
	b := s1.Builder()
	require.NoError(t, b.Put(echo()))
	b.Delete(ServiceKey{Namespace: "demo", Name: "absent"})
	require.Same(t, s1, b.Build())

	b.Delete(echo().Key())
	s2 := b.Build()
	require.Equal(t, 0, s2.Len())
	require.Equal(t, 1, s1.Len())
}

func TestInvalidServicesRefused(t *testing.T) {
	tests := []struct {
		name string
		mut  func(*Service)
		want string
	}{
		{"no namespace", func(s *Service) { s.Namespace = "" }, "namespace is empty"},
		{"no name", func(s *Service) { s.Name = "" }, "name is empty"},
		{"no ports", func(s *Service) { s.Ports = nil }, "no ports"},
		{"port zero", func(s *Service) { s.Ports[0].Port = 0 }, "port 0 out of range"},
		{"port too big", func(s *Service) { s.Ports[0].Port = 70000 }, "port 70000 out of range"},
		{"bad protocol", func(s *Service) { s.Ports[0].Protocol = "ICMP" }, `unknown protocol "ICMP"`},
		{"duplicate port", func(s *Service) { s.Ports[1].Port = s.Ports[0].Port; s.Ports[1].Protocol = "" }, "duplicate port"},
		{"negative count", func(s *Service) { s.Endpoints[0].Ready = -1 }, "negative count"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := echo()
			tc.mut(&s)
			b := NewBuilder(LocalSource)
			err := b.Put(s)
			require.ErrorContains(t, err, tc.want)
			require.Equal(t, 0, b.Build().Len(), "nothing half-applied")
		})
	}
	_, err := NewSnapshot(LocalSource, []Service{echo(), echo()})
	require.ErrorContains(t, err, "demo/echo: listed twice")
}

func TestCallerCannotMutateSnapshot(t *testing.T) {
	in := echo()
	snap, err := NewSnapshot(LocalSource, []Service{in})
	require.NoError(t, err)
	in.Ports[0].Port = 1
	in.Endpoints[0].Ready = 100
	got, _ := snap.Get(in.Key())
	require.Equal(t, int32(7070), got.Ports[0].Port)
	out := snap.Services()
	out[0].Ports[0].Port = 2
	got, _ = snap.Get(in.Key())
	require.Equal(t, int32(7070), got.Ports[0].Port)
}

func TestExportedTo(t *testing.T) {
	s := echo()
	require.True(t, s.ExportedTo("b"))
	s.Peers = []string{"c", "b", "c"}
	snap, err := NewSnapshot(LocalSource, []Service{s})
	require.NoError(t, err)
	got, _ := snap.Get(s.Key())
	require.Equal(t, []string{"b", "c"}, got.Peers)
	require.True(t, got.ExportedTo("b"))
	require.False(t, got.ExportedTo("d"))
}

func TestStoreCoalescesNotifications(t *testing.T) {
	st := NewStore()
	ch, cancel := st.Subscribe()
	defer cancel()
	<-ch // initial signal

	require.Equal(t, 0, st.Get(LocalSource).Len())
	s1, err := NewSnapshot(LocalSource, []Service{echo()})
	require.NoError(t, err)
	require.True(t, st.Set(s1))
	require.False(t, st.Set(s1), "same version is not a change")
	b := s1.Builder()
	b.Delete(echo().Key())
	require.True(t, st.Set(b.Build()))

	select {
	case <-ch:
	default:
		t.Fatal("no notification after changes")
	}
	select {
	case <-ch:
		t.Fatal("two changes were not coalesced into one signal")
	default:
	}
	require.Equal(t, 0, st.Get(LocalSource).Len())
	require.Equal(t, []string{LocalSource}, st.Sources())

	st.Delete(LocalSource)
	<-ch
	require.Empty(t, st.Sources())
}
