package trust

import (
	"fmt"
	"net/http"
	"time"

	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// NewBundleEndpoint returns an HTTPS server for the local bundle in the
// SPIFFE bundle endpoint format, with the https_spiffe profile: the server
// authenticates with svid (an SVID of the local trust domain), and a
// federating party (another Isthmus cluster, or a SPIRE server) verifies it
// against the bundle it already holds. Serve it with ListenAndServeTLS("",
// "") or ServeTLS(ln, "", "").
func NewBundleEndpoint(addr string, store *Store, svid x509svid.Source) (*http.Server, error) {
	h, err := federation.NewHandler(store.LocalTrustDomain(), store)
	if err != nil {
		return nil, fmt.Errorf("bundle endpoint: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /", h)
	return &http.Server{
		Addr:              addr,
		Handler:           mux,
		TLSConfig:         tlsconfig.TLSServerConfig(svid),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    16 << 10,
	}, nil
}
