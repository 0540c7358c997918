package federation

import (
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	fedv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"
)

// A peer's locality parts are what the exporter read from Kubernetes
// topology labels: label values, at most 63 characters. A 2,100-byte
// region was taken, and the ServiceEntry every peer exporting the service
// shares was refused by Istio's CRD (a locality over 2048 bytes), so one
// peer broke the others' import of the same service.
func TestImportedLocalityIsALabelValue(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("evil.mesh")
	for _, tc := range []struct {
		name string
		ep   *fedv1.LocalityEndpoints
		want string
	}{
		{"long region", &fedv1.LocalityEndpoints{Region: strings.Repeat("r", 2100), Ready: 1}, "endpoints[0].region"},
		{"zone with a slash", &fedv1.LocalityEndpoints{Region: "eu", Zone: "a/b", Ready: 1}, "endpoints[0].zone"},
		{"subzone with a space", &fedv1.LocalityEndpoints{Region: "eu", Zone: "z", Subzone: "rack 1", Ready: 1}, "endpoints[0].subzone"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := evilService("demo", "payments")
			r.GetService().Endpoints = []*fedv1.LocalityEndpoints{tc.ep}
			_, err := importService("evil", td, r)
			require.ErrorContains(t, err, tc.want)
			require.Less(t, len(err.Error()), 600, "the value is quoted in part")
		})
	}
	r := evilService("demo", "payments")
	r.GetService().Endpoints = []*fedv1.LocalityEndpoints{{Region: "us-east-1", Zone: "us-east-1a", Subzone: "rack_1.b", Ready: 1}}
	_, err := importService("evil", td, r)
	require.NoError(t, err)
}
