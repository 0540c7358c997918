package bootstrap

import (
	"testing"

	"github.com/spf13/pflag"
	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

func TestFlags(t *testing.T) {
	t.Setenv("POD_NAMESPACE", "")
	t.Setenv("SERVICE_ACCOUNT", "")
	var f Flags
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	f.Register(fs, Defaults{Namespace: "isthmus-system", ServiceAccount: "isthmus-eastwest-gw"})
	require.NoError(t, fs.Parse([]string{"--cluster-name", "alpha", "--pod-ip", "10.0.0.9", "--xds-plaintext"}))
	require.ErrorContains(t, f.CheckNode(), "--pod-name")
	require.NoError(t, fs.Parse([]string{"--pod-name", "gw-0"}))
	require.NoError(t, f.CheckNode())
	require.Equal(t, "isthmus-system", f.Namespace)
	require.Equal(t, "alpha.mesh", f.TrustDomainName())
	id, err := f.FederatorID()
	require.NoError(t, err)
	require.Equal(t, "spiffe://alpha.mesh/ns/isthmus-system/sa/isthmus-federator", id.String())

	node := xdsclient.GatewayNode(f.ClusterName, f.PodIP, f.PodName, f.Namespace)
	cc, err := f.ClientConfig(node, nil, nil, nil)
	require.NoError(t, err)
	require.True(t, cc.Plaintext)
	require.Nil(t, cc.TLS)

	f.XDSPlaintext = false
	_, err = f.ClientConfig(node, nil, nil, nil)
	require.ErrorContains(t, err, "SVID")

	f.TrustDomain = "not a trust domain"
	_, err = f.FederatorID()
	require.ErrorContains(t, err, "--trust-domain")
}
