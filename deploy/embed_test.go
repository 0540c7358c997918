package deploy

import (
	"testing"

	"github.com/stretchr/testify/require"
	mcscrd "sigs.k8s.io/mcs-api/config/crd"
)

// The CRDs we ship must be the ones of the MCS API version we compile
// against, or the informers and the API server would disagree.
func TestCRDsMatchMCSModule(t *testing.T) {
	require.Equal(t, string(mcscrd.ServiceExportCRD), string(ServiceExportCRD), "run `make generate` to refresh deploy/crds")
	require.Equal(t, string(mcscrd.ServiceImportCRD), string(ServiceImportCRD), "run `make generate` to refresh deploy/crds")
}
