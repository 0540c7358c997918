// Package bootstrap is how an Isthmus proxy (the east-west gateway, the
// sidecar) finds its federator: the flags naming the xDS server, the CA
// and the proxy itself, the workload SVID from the CA (pkg/identity), and
// the xDS client's configuration (pkg/xdsclient) over mTLS with it. Both
// binaries register the same flags, so they read alike.
package bootstrap

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"

	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/isthmus-mesh/isthmus/internal/hostport"
	"github.com/isthmus-mesh/isthmus/pkg/identity"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// Flags say where the federator is and who the proxy is.
type Flags struct {
	// XDSAddress is the federator's xDS address: 15012 over mTLS, or
	// 15010 in plaintext (XDSPlaintext, tests only).
	XDSAddress   string
	XDSPlaintext bool
	// CAAddress is the federator's CA (15012, always TLS); empty means
	// XDSAddress.
	CAAddress string
	// ClusterName, PodIP, PodName and Namespace name the proxy to the
	// federator (its xDS node).
	ClusterName, PodIP, PodName, Namespace string
	// ServiceAccount and TrustDomain give the proxy's SPIFFE ID,
	// spiffe://<trust domain>/ns/<namespace>/sa/<service account>; the
	// trust domain defaults to <cluster name>.mesh.
	ServiceAccount, TrustDomain string
	// FederatorNamespace and FederatorServiceAccount give the SPIFFE ID
	// the federator must present.
	FederatorNamespace, FederatorServiceAccount string
	// TokenFile is the projected ServiceAccount token (audience
	// isthmus-ca) the CA authenticates; RootsFile the PEM roots that
	// verify the federator until the CA sends its own.
	TokenFile, RootsFile string
}

// Defaults are a binary's defaults for the flags that differ between
// proxies.
type Defaults struct {
	Namespace, ServiceAccount string
}

// Register adds the flags to fs. Environment variables set by the pod
// spec (CLUSTER_NAME, POD_IP, POD_NAME, POD_NAMESPACE, SERVICE_ACCOUNT)
// are the defaults where present.
func (f *Flags) Register(fs *pflag.FlagSet, d Defaults) {
	fs.StringVar(&f.XDSAddress, "xds-address", "isthmus-federator.isthmus-system.svc:15012", "the federator's xDS (and CA) address, host:port")
	fs.BoolVar(&f.XDSPlaintext, "xds-plaintext", false, "speak plaintext xDS (the federator's --xds-plaintext-addr; tests only)")
	fs.StringVar(&f.CAAddress, "ca-address", "", "the federator's CA address (TLS), host:port; default --xds-address")
	fs.StringVar(&f.ClusterName, "cluster-name", os.Getenv("CLUSTER_NAME"), "this cluster's name (xDS node cluster)")
	fs.StringVar(&f.PodIP, "pod-ip", os.Getenv("POD_IP"), "this pod's IP (xDS node ID)")
	fs.StringVar(&f.PodName, "pod-name", os.Getenv("POD_NAME"), "this pod's name (xDS node ID)")
	fs.StringVar(&f.Namespace, "namespace", envOr("POD_NAMESPACE", d.Namespace), "this pod's namespace")
	fs.StringVar(&f.ServiceAccount, "service-account", envOr("SERVICE_ACCOUNT", d.ServiceAccount), "this pod's ServiceAccount (its SPIFFE ID)")
	fs.StringVar(&f.TrustDomain, "trust-domain", "", "the cluster's trust domain (default <cluster-name>.mesh)")
	fs.StringVar(&f.FederatorNamespace, "federator-namespace", "isthmus-system", "the federator's namespace (its SPIFFE ID)")
	fs.StringVar(&f.FederatorServiceAccount, "federator-service-account", "isthmus-federator", "the federator's ServiceAccount (its SPIFFE ID)")
	fs.StringVar(&f.TokenFile, "token-file", "/var/run/secrets/tokens/isthmus-ca", "projected ServiceAccount token (audience isthmus-ca) for the CA")
	fs.StringVar(&f.RootsFile, "ca-roots-file", "/var/run/secrets/isthmus/root-cert.pem", "PEM roots that verify the federator until it publishes its trust bundle over SDS")
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// CheckNode reports what is missing or malformed to name the proxy to
// the federator: the node ID is "<role>~<pod-ip>~<pod>.<namespace>~...",
// which the federator splits on "~" and checks against the proxy's SVID.
func (f Flags) CheckNode() error {
	if f.ClusterName == "" || f.PodIP == "" || f.PodName == "" {
		return errors.New("--cluster-name, --pod-ip and --pod-name (or CLUSTER_NAME, POD_IP, POD_NAME) are required for xDS: they name this proxy to the federator")
	}
	var errs []error
	if _, err := netip.ParseAddr(f.PodIP); err != nil {
		errs = append(errs, fmt.Errorf("--pod-ip %q is not an IP address", f.PodIP))
	}
	if msgs := validation.IsDNS1123Subdomain(f.PodName); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("--pod-name %q is not a Pod name: %s", f.PodName, strings.Join(msgs, "; ")))
	}
	if msgs := validation.IsDNS1123Label(f.Namespace); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("--namespace %q is not a namespace name: %s", f.Namespace, strings.Join(msgs, "; ")))
	}
	return errors.Join(errs...)
}

// CheckAddresses reports an --xds-address or --ca-address that is not
// host:port with a port from 1 to 65535: without a port, gRPC would dial
// 443 and retry for ever.
func (f Flags) CheckAddresses() error {
	var errs []error
	if f.XDSAddress == "" {
		errs = append(errs, errors.New("--xds-address is required: the federator's host:port"))
	} else if err := hostport.CheckDial(f.XDSAddress); err != nil {
		errs = append(errs, fmt.Errorf("--xds-address %q: %w", f.XDSAddress, err))
	}
	if f.CAAddress != "" {
		if err := hostport.CheckDial(f.CAAddress); err != nil {
			errs = append(errs, fmt.Errorf("--ca-address %q: %w", f.CAAddress, err))
		}
	}
	return errors.Join(errs...)
}

// TrustDomainName is --trust-domain, or <cluster name>.mesh.
func (f Flags) TrustDomainName() string {
	if f.TrustDomain != "" {
		return f.TrustDomain
	}
	return f.ClusterName + ".mesh"
}

// FederatorID is the SPIFFE ID the federator must present, to the xDS
// client and to the identity client alike.
func (f Flags) FederatorID() (spiffeid.ID, error) {
	td, err := spiffeid.TrustDomainFromString(f.TrustDomainName())
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("--trust-domain %q: %w", f.TrustDomainName(), err)
	}
	id, err := spiffeid.FromSegments(td, "ns", f.FederatorNamespace, "sa", f.FederatorServiceAccount)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("federator identity: %w", err)
	}
	return id, nil
}

// Identity gets the proxy's first SVID from the CA and keeps it renewed
// until the returned Source is closed; it returns once it holds one, or
// when ctx ends.
func (f Flags) Identity(ctx context.Context, log *slog.Logger) (*identity.Source, error) {
	federator, err := f.FederatorID()
	if err != nil {
		return nil, err
	}
	roots, err := os.ReadFile(f.RootsFile)
	if err != nil {
		return nil, fmt.Errorf("--ca-roots-file: %w", err)
	}
	caAddr := f.CAAddress
	if caAddr == "" {
		caAddr = f.XDSAddress
	}
	return identity.New(ctx, identity.Config{
		CAAddress: caAddr, CAID: federator, RootsPEM: roots, TrustDomain: federator.TrustDomain(),
		Namespace: f.Namespace, ServiceAccount: f.ServiceAccount, TokenFile: f.TokenFile, Logger: log,
	})
}

// ClientConfig is the xDS client's configuration for node: mTLS with
// svid, the federator authorized by its SPIFFE ID, or plaintext with
// --xds-plaintext (svid may then be nil).
func (f Flags) ClientConfig(node xdsclient.Node, svid *identity.Source, check func(*xdsclient.Config) error, log *slog.Logger) (xdsclient.ClientConfig, error) {
	cc := xdsclient.ClientConfig{Server: f.XDSAddress, Plaintext: f.XDSPlaintext, Node: node, Check: check, Logger: log}
	if f.XDSPlaintext {
		return cc, nil
	}
	if svid == nil {
		return cc, errors.New("xDS over mTLS needs the proxy's SVID")
	}
	federator, err := f.FederatorID()
	if err != nil {
		return cc, err
	}
	// The identity Source's bundle (--ca-roots-file, then the roots the
	// CA returns with each SVID) verifies the federator until the ROOTCA
	// Secret names its trust domain; from then on the bundle the
	// federator publishes does, rotations included.
	cc.TLS = &xdsclient.TLSConfig{SVID: svid, Bundle: svid, Authorizer: tlsconfig.AuthorizeID(federator), FollowSDS: true}
	return cc, nil
}
