package xdsclient

import (
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/stretchr/testify/require"
)

// The gateway's clusters carry common_lb_config.healthy_panic_threshold
// 0% (docs/gateway-xds.md), so a stock Envoy never routes to unhealthy
// endpoints either: accepted, meaning what the gateway always does;
// anything asking for panic routing or other balancing is refused.
func TestDecodeGatewayPanicThreshold(t *testing.T) {
	noPanic := func() *clusterv3.Cluster_CommonLbConfig {
		return &clusterv3.Cluster_CommonLbConfig{HealthyPanicThreshold: &typev3.Percent{Value: 0}}
	}
	t.Run("0% on every cluster", func(t *testing.T) {
		want, err := newMutable(t).decode(t)
		require.NoError(t, err)
		m := newMutable(t)
		m.eds.CommonLbConfig, m.fed.CommonLbConfig = noPanic(), noPanic()
		got, err := m.decode(t)
		require.NoError(t, err)
		require.Equal(t, want.Clusters, got.Clusters, "the same clusters as without: the gateway never panics")
	})
	t.Run("absent, as federators before it sent", func(t *testing.T) {
		m := newMutable(t)
		m.eds.CommonLbConfig = nil
		_, err := m.decode(t)
		require.NoError(t, err)
	})

	const cl = `cluster "outbound|80||echo.demo.svc.cluster.local": common_lb_config`
	for _, tc := range []struct {
		name   string
		config func() *clusterv3.Cluster_CommonLbConfig
		want   string
	}{
		{"Envoy's default 50%", func() *clusterv3.Cluster_CommonLbConfig {
			c := noPanic()
			c.HealthyPanicThreshold.Value = 50
			return c
		}, cl + `.healthy_panic_threshold.value: 50 is not supported (0: the gateway never routes to unhealthy endpoints)`},
		{"no threshold", func() *clusterv3.Cluster_CommonLbConfig {
			return &clusterv3.Cluster_CommonLbConfig{}
		}, cl + `.healthy_panic_threshold: is missing: Envoy's default of 50% routes to unhealthy endpoints in panic`},
		{"locality weighting", func() *clusterv3.Cluster_CommonLbConfig {
			c := noPanic()
			c.LocalityConfigSpecifier = &clusterv3.Cluster_CommonLbConfig_LocalityWeightedLbConfig_{
				LocalityWeightedLbConfig: &clusterv3.Cluster_CommonLbConfig_LocalityWeightedLbConfig{}}
			return c
		}, cl + `.locality_weighted_lb_config: not supported`},
		{"hosts ignored until health checked", func() *clusterv3.Cluster_CommonLbConfig {
			c := noPanic()
			c.IgnoreNewHostsUntilFirstHc = true
			return c
		}, cl + `.ignore_new_hosts_until_first_hc: not supported`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMutable(t)
			m.eds.CommonLbConfig = tc.config()
			_, err := m.decode(t)
			require.ErrorContains(t, err, tc.want)
		})
	}
}
