package main

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// A word left over after the flags is refused, naming it: a boolean
// flag's value given apart would otherwise be dropped with the flag set
// to true (--xds-plaintext false turning plaintext xDS on).
func TestParseFlagsRefusesArguments(t *testing.T) {
	for name, tc := range map[string]struct {
		args []string
		want string
	}{
		"bool flag's value apart": {[]string{"--xds-plaintext", "false"}, `unexpected argument "false"`},
		"after other flags":       {[]string{"--listen-addr", "127.0.0.1:15443", "extra", "more"}, `unexpected argument "extra"`},
		"after --":                {[]string{"--", "--xds-plaintext"}, `unexpected argument "--xds-plaintext"`},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := parseFlags(tc.args)
			require.ErrorContains(t, err, tc.want)
		})
	}
	o, err := parseFlags([]string{"--xds-plaintext=false", "--xds-address", "127.0.0.1:15010"})
	require.NoError(t, err)
	require.False(t, o.x.XDSPlaintext)
}

// A port-less or out-of-range --xds-address or --ca-address is refused
// at start, naming the flag, instead of gRPC dialling 443 for ever.
func TestParseFlagsRefusesBadFederatorAddresses(t *testing.T) {
	_, err := parseFlags([]string{"--xds-address", "isthmus-federator.isthmus-system.svc", "--ca-address", "10.0.0.1:99999"})
	require.ErrorContains(t, err, `--xds-address "isthmus-federator.isthmus-system.svc": want host:port`)
	require.ErrorContains(t, err, `--ca-address "10.0.0.1:99999": port "99999" is not a number from 1 to 65535`)
}

// A listen address whose port is out of range is refused at start.
func TestParseFlagsRefusesListenPortsOutOfRange(t *testing.T) {
	_, err := parseFlags([]string{"--listen-addr", "127.0.0.1:99999", "--health-addr", ":65536"})
	require.ErrorContains(t, err, `listen address "127.0.0.1:99999": port "99999" is not a number from 0 to 65535`)
	require.ErrorContains(t, err, `health address ":65536": port "65536"`)
}
