package xdsclient

import (
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// FuzzDecodeResources feeds arbitrary bytes as the Any-wrapped listener,
// cluster and assignment of a response: what a broken or hostile server
// could send. Decode must never panic, and what it accepts must keep the
// promises a published Config makes.
func FuzzDecodeResources(f *testing.F) {
	seed := func(m *mutable) {
		l, err := proto.Marshal(m.l)
		require.NoError(f, err)
		c, err := proto.Marshal(m.eds)
		require.NoError(f, err)
		e, err := proto.Marshal(m.cla)
		require.NoError(f, err)
		f.Add(l, c, e)
	}
	seed(newMutable(f))
	m := newMutable(f)
	m.fed = fedClusterFor("federator.example", 15012)
	m.eds = m.fed
	m.l.FilterChains = m.l.FilterChains[:1]
	seed(m)
	m = newMutable(f)
	m.echoChain().Filters = append(m.echoChain().Filters, m.echoChain().Filters[0])
	m.echoChain().FilterChainMatch.DestinationPort = wrapperspb.UInt32(1)
	seed(m)
	f.Add([]byte{}, []byte{}, []byte{})

	f.Fuzz(func(t *testing.T, listener, cluster, cla []byte) {
		res := []*anypb.Any{
			{TypeUrl: TypeListener, Value: listener},
			{TypeUrl: TypeCluster, Value: cluster},
			{TypeUrl: TypeClusterLoadAssignment, Value: cla},
		}
		cfg, err := Decode(res...)
		if err != nil {
			require.Nil(t, cfg)
			require.NotEmpty(t, nackMessage(err))
			return
		}
		requireConsistent(t, cfg)
		for _, l := range cfg.Listeners {
			require.NotEmpty(t, l.Name)
			require.NotZero(t, l.Port)
			require.NotEmpty(t, l.Chains)
			for _, ch := range l.Chains {
				require.NotEmpty(t, ch.SNIs)
				require.NotEmpty(t, ch.Cluster)
				require.Positive(t, ch.IdleTimeout)
				for _, sni := range ch.SNIs {
					require.NoError(t, validServerName(sni))
				}
			}
		}
		for _, c := range cfg.Clusters {
			require.Contains(t, []ClusterType{Static, StrictDNS, EDS}, c.Type)
			require.Positive(t, c.ConnectTimeout)
			for _, e := range c.Endpoints {
				if c.Type != StrictDNS {
					require.True(t, e.Addr.IsValid(), "cluster %s: endpoint %+v", c.Name, e)
				}
			}
		}
		again, err := Decode(res...)
		require.NoError(t, err)
		require.Equal(t, cfg, again, "decoding is deterministic")
	})
}
