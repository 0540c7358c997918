package federator

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestConfigValidate(t *testing.T) {
	ok := DefaultConfig()
	ok.ClusterName = "east"
	require.NoError(t, ok.Validate())
	require.Equal(t, "east.mesh", ok.TrustDomainName())
	require.Equal(t, "istio-system", ok.RootNamespace, "Istio's default root namespace")
	require.Equal(t, "isthmus-federator.isthmus-system.svc:15019", ok.FederationUpstream(),
		"the gateway reaches the federator through its Service by default")
	ok.Namespace, ok.FederationAddr = "mesh", "0.0.0.0:9019"
	require.Equal(t, "isthmus-federator.mesh.svc:9019", ok.FederationUpstream())
	ok.GatewayFederationUpstream = "127.0.0.1:15019"
	require.Equal(t, "127.0.0.1:15019", ok.FederationUpstream())
	ok.XDSPlaintextAddr = "127.0.0.1:15010"
	ok.Region = "eu-west-1"
	require.NoError(t, ok.Validate())

	bad := DefaultConfig()
	bad.ClusterName = "East_1"
	bad.TrustDomain = "not a domain"
	bad.Namespace = ""
	bad.CAAddr = "15012"
	bad.MonitoringAddr = "x"
	bad.CertTTL = 72 * time.Hour
	bad.RootPublishDelay = 0
	bad.XDSPlaintextAddr = "15010"
	bad.GatewayFederationUpstream = "federator"
	bad.Region = "eu west"
	bad.RootNamespace = "Istio_System"
	bad.PeerSyncTimeout = 0
	bad.ImportWriteQPS = 0
	bad.TokenReviewBurst = -1
	bad.EstablishQPS = 0
	bad.GatewayAddresses = []string{"0.0.0.0:15443", "192.0.2.1:15443"}
	bad.AdvertiseAddresses = []string{"[::]:15019"}
	err := bad.Validate()
	// Every problem is named at once.
	for _, want := range []string{
		`--cluster-name "East_1" is not a DNS label`,
		`--trust-domain "not a domain"`,
		`--namespace "" is not a DNS label`,
		`--ca-addr "15012"`,
		`--monitoring-addr "x"`,
		"--cert-ttl 72h0m0s and --max-cert-ttl 48h0m0s",
		"--root-publish-delay 0s is too short",
		`--xds-plaintext-addr "15010"`,
		`--gateway-federation-upstream: address "federator"`,
		`--region "eu west" is not a label value`,
		`--root-namespace "Istio_System" is not a DNS label`,
		"--peer-sync-timeout 0s must be positive",
		"--import-write-qps 0 and --import-write-burst 40 must be positive",
		"--token-review-qps 50 and --token-review-burst -1 must be positive",
		"--establish-qps 0 and --establish-burst 10 must be positive",
		`--gateway-address: address "0.0.0.0:15443": 0.0.0.0 is not a unicast address`,
		`--advertise-address: address "[::]:15019": :: is not a unicast address`,
	} {
		require.ErrorContains(t, err, want)
	}
	require.NotContains(t, err.Error(), "192.0.2.1")
}

// A listen address whose port is out of range is refused by Validate,
// before New writes the CA Secret and the ConfigMaps, not when the
// listener opens.
func TestConfigValidateListenPorts(t *testing.T) {
	c := DefaultConfig()
	c.ClusterName = "east"
	c.MonitoringAddr = "127.0.0.1:0" // any free port
	c.XDSPlaintextAddr = "127.0.0.1:015010"
	require.NoError(t, c.Validate())

	c.MonitoringAddr = "127.0.0.1:99999"
	c.CAAddr = ":65536"
	c.BundleEndpointAddr = ":https"
	c.FederationAddr = "[::]:-1"
	c.XDSPlaintextAddr = "127.0.0.1:"
	err := c.Validate()
	for _, want := range []string{
		`--monitoring-addr "127.0.0.1:99999": port "99999" is not a number from 0 to 65535`,
		`--ca-addr ":65536": port "65536"`,
		`--bundle-endpoint-addr ":https": port "https"`,
		`--federation-addr "[::]:-1": port "-1"`,
		`--xds-plaintext-addr "127.0.0.1:": port ""`,
	} {
		require.ErrorContains(t, err, want)
	}
}
