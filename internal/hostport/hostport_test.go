package hostport

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		addr         string
		listen, dial string // "" when accepted, else words of the error
	}{
		{"127.0.0.1:15001", "", ""},
		{"[::1]:0", "", `port "0" is not a number from 1 to 65535`},
		{":15001", "", "no host"},
		{"fed:99999", `port "99999" is not a number from 0 to 65535`, `port "99999" is not a number from 1 to 65535`},
		{"fed:grpc", `port "grpc"`, `port "grpc"`},
		{"fed", "missing port", "want host:port"},
	} {
		for _, c := range []struct {
			name  string
			check func(string) error
			want  string
		}{{"listen", CheckListen, tc.listen}, {"dial", CheckDial, tc.dial}} {
			err := c.check(tc.addr)
			if c.want == "" {
				require.NoError(t, err, "%s %s", c.name, tc.addr)
			} else {
				require.ErrorContains(t, err, c.want, "%s %s", c.name, tc.addr)
			}
		}
	}
}
