package gateway

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// A listen address whose port is out of range is refused by Validate,
// at start, not when its listener opens.
func TestConfigValidateListenPorts(t *testing.T) {
	c := DefaultConfig()
	c.ListenAddr, c.MetricsAddr = "127.0.0.1:0", "" // any free port; off
	require.NoError(t, c.Validate())

	c.ListenAddr = "127.0.0.1:99999"
	c.HealthAddr = ":65536"
	c.MetricsAddr = "[::]:metrics"
	err := c.Validate()
	for _, want := range []string{
		`listen address "127.0.0.1:99999": port "99999" is not a number from 0 to 65535`,
		`health address ":65536": port "65536"`,
		`metrics address "[::]:metrics": port "metrics"`,
	} {
		require.ErrorContains(t, err, want)
	}
}
