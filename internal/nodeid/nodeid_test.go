package nodeid

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestParse(t *testing.T) {
	id := ID{Role: RoleSidecar, IP: "10.1.2.3", Pod: "web-0", Namespace: "demo"}
	require.Equal(t, "sidecar~10.1.2.3~web-0.demo~demo.svc.cluster.local", id.String())
	got, err := Parse(id.String())
	require.NoError(t, err)
	id.Domain = "cluster.local"
	require.Equal(t, id, got)

	// Any cluster domain.
	got, err = Parse("sidecar~10.1.2.3~web-0.demo~demo.svc.corp.example")
	require.NoError(t, err)
	require.Equal(t, "corp.example", got.Domain)
	require.Equal(t, "demo", got.Namespace)

	// A pod's name may have dots.
	got, err = Parse("eastwest-gw~10.0.0.5~gw.v2-0.isthmus-system~isthmus-system.svc.cluster.local")
	require.NoError(t, err)
	require.Equal(t, ID{Role: RoleGateway, IP: "10.0.0.5", Pod: "gw.v2-0", Namespace: "isthmus-system", Domain: "cluster.local"}, got)

	for s, want := range map[string]string{
		"":                                "not of the form",
		"sidecar~10.1.2.3":                "not of the form",
		"sidecar~1~web-0.demo~demo.svc~x": "not of the form",
		"~10.1.2.3~web-0.demo~demo.svc.cluster.local":         "no role",
		"sidecar~10.1.2.3~web-0.demo~demo.svc.":               "last field",
		"sidecar~10.1.2.3~web-0.demo~demo.example.org":        "last field",
		"sidecar~10.1.2.3~web-0.demo~demo":                    "last field",
		"sidecar~10.1.2.3~web-0.demo~.svc.cluster.local":      "last field",
		"sidecar~10.1.2.3~web-0.other~demo.svc.cluster.local": "third field is not <pod>.demo",
		"sidecar~10.1.2.3~web-0~demo.svc.cluster.local":       "third field",
		"sidecar~10.1.2.3~.demo~demo.svc.cluster.local":       "third field",
	} {
		_, err := Parse(s)
		require.ErrorContains(t, err, want, "%q", s)
	}
	require.Equal(t, RoleGateway, Role("eastwest-gw~anything"))
	require.Equal(t, "plain", Role("plain"))
}

// FuzzParse: a node ID comes from the proxy, before anything else is
// known of it. Parse never panics, and what it accepts it gives back.
func FuzzParse(f *testing.F) {
	f.Add("sidecar~10.1.2.3~web-0.demo~demo.svc.cluster.local")
	f.Add("eastwest-gw~~a.b.c~c.svc.cluster.local")
	f.Add("~~~")
	f.Fuzz(func(t *testing.T, s string) {
		id, err := Parse(s)
		if err != nil {
			return
		}
		if id.String() != s {
			t.Fatalf("Parse(%q) = %+v, which reads back as %q", s, id, id.String())
		}
	})
}
