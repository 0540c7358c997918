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

	bad := DefaultConfig()
	bad.ClusterName = "East_1"
	bad.TrustDomain = "not a domain"
	bad.Namespace = ""
	bad.CAAddr = "15012"
	bad.MonitoringAddr = "x"
	bad.CertTTL = 72 * time.Hour
	bad.RootPublishDelay = 0
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
	} {
		require.ErrorContains(t, err, want)
	}
}
