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

// The node's parts are checked at start: the federator splits the node
// ID on "~" and checks its namespace against the proxy's SVID, and a pod
// IP that is not one would name the proxy wrongly in every log.
func TestCheckNodeRefusesMalformedParts(t *testing.T) {
	good := Flags{ClusterName: "alpha", PodIP: "10.0.0.9", PodName: "gw-0.x", Namespace: "isthmus-system"}
	require.NoError(t, good.CheckNode())
	for name, tc := range map[string]struct {
		edit func(*Flags)
		want string
	}{
		"pod IP not an IP":    {func(f *Flags) { f.PodIP = "not-an-ip" }, `--pod-ip "not-an-ip" is not an IP address`},
		"pod name with a ~":   {func(f *Flags) { f.PodName = "gw~0" }, `--pod-name "gw~0" is not a Pod name`},
		"namespace with a .":  {func(f *Flags) { f.Namespace = "a.b" }, `--namespace "a.b" is not a namespace name`},
		"namespace upper":     {func(f *Flags) { f.Namespace = "Demo" }, `--namespace "Demo"`},
		"IPv6 pod IP is fine": {func(f *Flags) { f.PodIP = "fd00::9" }, ""},
	} {
		t.Run(name, func(t *testing.T) {
			f := good
			tc.edit(&f)
			if tc.want == "" {
				require.NoError(t, f.CheckNode())
				return
			}
			require.ErrorContains(t, f.CheckNode(), tc.want)
		})
	}
}

// An --xds-address or --ca-address gRPC would dial at 443, or not at
// all, is refused at start, naming the flag.
func TestCheckAddresses(t *testing.T) {
	for name, tc := range map[string]struct {
		args []string
		want []string
	}{
		"defaults":          {},
		"IPv6 and a CA":     {args: []string{"--xds-address", "[fd00::1]:15010", "--ca-address", "ca.example:15012"}},
		"no port":           {args: []string{"--xds-address", "isthmus-federator.isthmus-system.svc"}, want: []string{`--xds-address "isthmus-federator.isthmus-system.svc": want host:port`}},
		"CA without a port": {args: []string{"--ca-address", "10.0.0.1"}, want: []string{`--ca-address "10.0.0.1": want host:port`}},
		"port out of range": {args: []string{"--xds-address", "fed:99999"}, want: []string{`--xds-address "fed:99999": port "99999" is not a number from 1 to 65535`}},
		"port zero":         {args: []string{"--ca-address", "fed:0"}, want: []string{`--ca-address "fed:0": port "0"`}},
		"named port":        {args: []string{"--xds-address", "fed:grpc"}, want: []string{`port "grpc" is not a number`}},
		"no host":           {args: []string{"--xds-address", ":15012"}, want: []string{`--xds-address ":15012": want host:port: no host`}},
		"empty":             {args: []string{"--xds-address="}, want: []string{"--xds-address is required"}},
		"both at once":      {args: []string{"--xds-address", "a", "--ca-address", "b"}, want: []string{"--xds-address", "--ca-address"}},
	} {
		t.Run(name, func(t *testing.T) {
			var f Flags
			fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
			f.Register(fs, Defaults{})
			require.NoError(t, fs.Parse(tc.args))
			err := f.CheckAddresses()
			if len(tc.want) == 0 {
				require.NoError(t, err)
				return
			}
			for _, w := range tc.want {
				require.ErrorContains(t, err, w)
			}
		})
	}
}
