package federator

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/isthmus-mesh/isthmus/internal/hostport"
	"github.com/isthmus-mesh/isthmus/pkg/authz"
	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
	"github.com/isthmus-mesh/isthmus/pkg/xds"
)

// TrustDomainName is the effective trust domain: the configured one, or
// "<cluster-name>.mesh".
func (c Config) TrustDomainName() string {
	if c.TrustDomain != "" {
		return c.TrustDomain
	}
	return c.ClusterName + ".mesh"
}

// ServiceName is the federator's Kubernetes Service (deploy/multicluster).
const ServiceName = "isthmus-federator"

// FederationUpstream is where the east-west gateway forwards federation
// traffic (the reserved SNI): the configured address, or the federator's
// Service, "isthmus-federator.<namespace>.svc:<federation port>".
func (c Config) FederationUpstream() string {
	if c.GatewayFederationUpstream != "" {
		return c.GatewayFederationUpstream
	}
	_, port, err := net.SplitHostPort(c.FederationAddr)
	if err != nil || port == "" {
		port = "15019"
	}
	return net.JoinHostPort(ServiceName+"."+c.Namespace+".svc", port)
}

// Config is everything `federator run` needs. Validate reports every
// problem at once.
type Config struct {
	// ClusterName is this cluster's unique name in the mesh: a DNS label
	// (lowercase letters, digits, '-', at most 63 characters). Required.
	ClusterName string
	// Kubeconfig is the path to a kubeconfig, or several joined by the
	// path-list separator as in $KUBECONFIG, merged as kubectl merges
	// them; empty means the in-cluster configuration of the pod's
	// ServiceAccount.
	Kubeconfig string
	// KubeAPIQPS and KubeAPIBurst bound the federator's requests to its
	// API server (a client-side token bucket).
	KubeAPIQPS   float32
	KubeAPIBurst int
	// ImportWriteQPS and ImportWriteBurst bound the writes of imported
	// services as ServiceEntries and ServiceImports (a token bucket of
	// its own, within KubeAPIQPS). A new imported service costs three
	// requests, so the default 20/s writes about 7 services a second;
	// the in-memory catalog, which Isthmus's own proxies route by, does
	// not wait for it.
	ImportWriteQPS   float32
	ImportWriteBurst int
	// TokenReviewQPS and TokenReviewBurst bound the TokenReviews the
	// certificate service asks the API server for (a token bucket of its
	// own, apart from KubeAPIQPS, so that callers of CAAddr cannot use up
	// the budget of everything else).
	TokenReviewQPS   float32
	TokenReviewBurst int
	// EstablishQPS and EstablishBurst bound the Establish calls the
	// federation port answers: anyone who reaches it can call Establish,
	// and each call reads a token record from the API server.
	EstablishQPS   float64
	EstablishBurst int
	// MonitoringAddr is where /healthz, /readyz, /metrics and /debug/ are
	// served (host:port); Istio's convention is :15014.
	MonitoringAddr string
	// ShutdownTimeout bounds a graceful shutdown.
	ShutdownTimeout time.Duration

	// TrustDomain is the cluster's SPIFFE trust domain; empty means
	// "<cluster-name>.mesh".
	TrustDomain string
	// Namespace is where the federator runs and keeps its CA Secret.
	Namespace string
	// ServiceAccount is the federator's own ServiceAccount; its SPIFFE ID
	// is spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
	ServiceAccount string
	// CAAddr serves the certificate service and the proxies' xDS (gRPC
	// over TLS, proxies authenticated by their SVID); Istio's convention
	// is :15012.
	CAAddr string
	// BundleEndpointAddr serves the local trust bundle as a SPIFFE bundle
	// endpoint (https_spiffe); empty disables it.
	BundleEndpointAddr string
	// TokenAudience is the audience workloads' ServiceAccount tokens must
	// carry for the certificate service.
	TokenAudience string
	// CertTTL is the default workload certificate lifetime, MaxCertTTL the
	// longest one issued.
	CertTTL, MaxCertTTL time.Duration
	// RootPublishDelay is how long a new root is trusted before it signs
	// (see `federator ca rotate`): at least ca.MinPublishDelay(MaxCertTTL),
	// 0.55 x MaxCertTTL. DefaultConfig's suits the default MaxCertTTL only;
	// `federator run` derives it from the MaxCertTTL given unless the flag
	// is set.
	RootPublishDelay time.Duration

	// FederationAddr serves the federation API (gRPC over mTLS) to peer
	// federators, directly or behind the east-west gateway's reserved SNI.
	FederationAddr string
	// GatewayAddresses are this cluster's east-west gateway addresses as
	// peers reach them (host:port, hostnames allowed); every exported
	// service carries them. Without one, peers refuse the exports.
	GatewayAddresses []string
	// AdvertiseAddresses are where peers reach this federator (host:port),
	// told to a cluster this one joins.
	AdvertiseAddresses []string
	// Heartbeat is the federation heartbeat interval; a peer silent for
	// three of them is disconnected.
	Heartbeat time.Duration
	// KeepFor and DrainFor are the staleness defaults for peers whose
	// FederationPeer does not set them.
	KeepFor, DrainFor time.Duration
	// MaxImportedServices bounds the services one peer may export here.
	MaxImportedServices int
	// PeerSyncTimeout bounds how long after start the sidecars are served
	// nothing while not every peer's imports are known, so that they keep
	// their last configuration instead of one without the imports; after
	// it they are served what is known.
	PeerSyncTimeout time.Duration

	// XDSPlaintextAddr, when set, also serves xDS without TLS or any
	// authentication (Istio's :15010). For tests only: whoever reaches it
	// reads every exported service's endpoints. Empty (the default) is off.
	// xDS over TLS is always served on CAAddr.
	XDSPlaintextAddr string
	// GatewayFederationUpstream is host:port of the federation API as the
	// east-west gateway reaches it (an IP or a hostname); empty means the
	// federator's Service (see FederationUpstream).
	GatewayFederationUpstream string
	// Region is this cluster's region (a topology.kubernetes.io/region
	// value): sidecars prefer the peers whose endpoints are in it to the
	// other peers (docs/sidecar-xds.md). Empty matches only peers whose
	// region is empty too.
	Region string
	// RootNamespace is Istio's root namespace (meshConfig.rootNamespace):
	// an AuthorizationPolicy in it applies to the pods of every
	// namespace, and a PeerAuthentication in it without a selector is
	// the mesh's. It must be the one the cluster's Istio uses.
	RootNamespace string
}

// DefaultConfig returns the defaults for everything but ClusterName.
func DefaultConfig() Config {
	return Config{
		MonitoringAddr:      ":15014",
		KubeAPIQPS:          50,
		KubeAPIBurst:        100,
		ImportWriteQPS:      20,
		ImportWriteBurst:    40,
		TokenReviewQPS:      50,
		TokenReviewBurst:    100,
		EstablishQPS:        2,
		EstablishBurst:      10,
		ShutdownTimeout:     10 * time.Second,
		Namespace:           "isthmus-system",
		ServiceAccount:      "isthmus-federator",
		CAAddr:              ":15012",
		BundleEndpointAddr:  ":8443",
		TokenAudience:       "isthmus-ca",
		CertTTL:             ca.DefaultCertTTL,
		MaxCertTTL:          ca.DefaultMaxTTL,
		RootPublishDelay:    ca.MinPublishDelay(ca.DefaultMaxTTL),
		FederationAddr:      ":15019",
		Heartbeat:           10 * time.Second,
		KeepFor:             5 * time.Minute,
		DrainFor:            time.Minute,
		MaxImportedServices: 20000,
		PeerSyncTimeout:     xds.DefaultPeersSyncTimeout,
		RootNamespace:       authz.DefaultRootNamespace,
	}
}

// Validate checks the configuration and names every problem.
func (c Config) Validate() error {
	var errs []error
	if c.ClusterName == "" {
		errs = append(errs, errors.New("--cluster-name is required"))
	} else if msgs := validation.IsDNS1123Label(c.ClusterName); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("--cluster-name %q is not a DNS label: %v", c.ClusterName, msgs))
	}
	if err := hostport.CheckListen(c.MonitoringAddr); err != nil {
		errs = append(errs, fmt.Errorf("--monitoring-addr %q: %w", c.MonitoringAddr, err))
	}
	if c.TrustDomain != "" {
		if _, err := spiffeid.TrustDomainFromString(c.TrustDomain); err != nil {
			errs = append(errs, fmt.Errorf("--trust-domain %q: %w", c.TrustDomain, err))
		}
	}
	for _, f := range []struct{ flag, v string }{{"--namespace", c.Namespace}, {"--service-account", c.ServiceAccount}, {"--root-namespace", c.RootNamespace}} {
		flag, v := f.flag, f.v
		if msgs := validation.IsDNS1123Label(v); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("%s %q is not a DNS label: %v", flag, v, msgs))
		}
	}
	for _, f := range []struct{ flag, v string }{{"--ca-addr", c.CAAddr}, {"--bundle-endpoint-addr", c.BundleEndpointAddr}} {
		flag, v := f.flag, f.v
		if v == "" && flag == "--bundle-endpoint-addr" {
			continue
		}
		if err := hostport.CheckListen(v); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: %w", flag, v, err))
		}
	}
	if c.TokenAudience == "" {
		errs = append(errs, errors.New("--token-audience must not be empty"))
	}
	if c.CertTTL <= 0 || c.MaxCertTTL <= 0 || c.CertTTL > c.MaxCertTTL {
		errs = append(errs, fmt.Errorf("--cert-ttl %s and --max-cert-ttl %s must be positive, and the default no longer than the maximum", c.CertTTL, c.MaxCertTTL))
	}
	if floor := ca.MinPublishDelay(c.MaxCertTTL); c.RootPublishDelay < floor {
		errs = append(errs, fmt.Errorf("--root-publish-delay %s is too short: workloads renew by 0.55 x --max-cert-ttl, so a new root must be trusted at least %s before it signs", c.RootPublishDelay, floor))
	}
	if err := hostport.CheckListen(c.FederationAddr); err != nil {
		errs = append(errs, fmt.Errorf("--federation-addr %q: %w", c.FederationAddr, err))
	}
	for _, f := range []struct {
		flag  string
		addrs []string
	}{{"--gateway-address", c.GatewayAddresses}, {"--advertise-address", c.AdvertiseAddresses}} {
		for _, a := range f.addrs {
			if err := federation.CheckAddress(a); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", f.flag, err))
			}
		}
	}
	if c.Heartbeat <= 0 || c.KeepFor <= 0 || c.DrainFor <= 0 {
		errs = append(errs, fmt.Errorf("--heartbeat %s, --keep-for %s and --drain-for %s must be positive", c.Heartbeat, c.KeepFor, c.DrainFor))
	}
	if c.PeerSyncTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--peer-sync-timeout %s must be positive", c.PeerSyncTimeout))
	}
	if c.XDSPlaintextAddr != "" {
		if err := hostport.CheckListen(c.XDSPlaintextAddr); err != nil {
			errs = append(errs, fmt.Errorf("--xds-plaintext-addr %q: %w", c.XDSPlaintextAddr, err))
		}
	}
	if err := federation.CheckAddress(c.FederationUpstream()); err != nil {
		errs = append(errs, fmt.Errorf("--gateway-federation-upstream: %w", err))
	}
	if msgs := validation.IsValidLabelValue(c.Region); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("--region %q is not a label value: %v", c.Region, msgs))
	}
	if c.MaxImportedServices <= 0 {
		errs = append(errs, fmt.Errorf("--max-imported-services %d must be positive", c.MaxImportedServices))
	}
	if c.KubeAPIQPS <= 0 || c.KubeAPIBurst <= 0 {
		errs = append(errs, fmt.Errorf("--kube-api-qps %g and --kube-api-burst %d must be positive", c.KubeAPIQPS, c.KubeAPIBurst))
	}
	if c.ImportWriteQPS <= 0 || c.ImportWriteBurst <= 0 {
		errs = append(errs, fmt.Errorf("--import-write-qps %g and --import-write-burst %d must be positive", c.ImportWriteQPS, c.ImportWriteBurst))
	}
	if c.EstablishQPS <= 0 || c.EstablishBurst <= 0 {
		errs = append(errs, fmt.Errorf("--establish-qps %g and --establish-burst %d must be positive", c.EstablishQPS, c.EstablishBurst))
	}
	if c.TokenReviewQPS <= 0 || c.TokenReviewBurst <= 0 {
		errs = append(errs, fmt.Errorf("--token-review-qps %g and --token-review-burst %d must be positive", c.TokenReviewQPS, c.TokenReviewBurst))
	}
	if c.ShutdownTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--shutdown-timeout %s must be positive", c.ShutdownTimeout))
	}
	return errors.Join(errs...)
}
