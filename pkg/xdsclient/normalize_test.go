package xdsclient

import (
	"testing"

	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// normalize_path on the inbound connection manager (Istio's
// pathNormalization BASE) reaches the model; false or unset is no
// normalization.
func TestSidecarDecodeNormalizePath(t *testing.T) {
	for _, tc := range []struct {
		name string
		v    *wrapperspb.BoolValue
		want bool
	}{
		{"unset", nil, false},
		{"false", wrapperspb.Bool(false), false},
		{"true", wrapperspb.Bool(true), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newSidecarMutable(t)
			editFilter(t, m.in.FilterChains[0].Filters[0], func(h *hcmv3.HttpConnectionManager) { h.NormalizePath = tc.v })
			cfg, err := m.decode(t)
			require.NoError(t, err)
			require.Equal(t, tc.want, cfg.Sidecar.Inbound.Chains[0].HTTP.NormalizePath)
			for _, ch := range cfg.Sidecar.Outbound.Chains {
				if ch.HTTP != nil {
					require.False(t, ch.HTTP.NormalizePath)
				}
			}
		})
	}
}
