package sidecar

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// A listen address whose port is out of range is refused by Validate,
// at start, not when its listener opens after the SVID was obtained.
func TestConfigValidateListenPorts(t *testing.T) {
	c := DefaultConfig()
	c.OutboundAddr, c.InboundAddr = "127.0.0.1:0", "[::1]:0" // any free port
	require.NoError(t, c.Validate())

	c.OutboundAddr = "127.0.0.1:99999"
	c.InboundAddr = ":-1"
	c.AdminAddr = "127.0.0.1:http"
	c.HealthAddr = "[::1]:"
	err := c.Validate()
	for _, want := range []string{
		`outbound address "127.0.0.1:99999": port "99999" is not a number from 0 to 65535`,
		`inbound address ":-1": port "-1"`,
		`admin address "127.0.0.1:http": port "http"`,
		`health address "[::1]:": port ""`,
	} {
		require.ErrorContains(t, err, want)
	}
}
