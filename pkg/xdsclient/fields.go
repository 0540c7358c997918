package xdsclient

import (
	"errors"
	"slices"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// The subset of docs/gateway-xds.md as allow-lists: per message type, the
// only fields that may be set. Everything else a server sets — a field the
// contract does not name, a field a newer Envoy API adds — is refused
// with its name, never ignored. Unknown fields on the wire are not set
// fields and pass, as Envoy lets them pass by default.
var (
	listenerFields       = allow[*listenerv3.Listener]("name", "address", "listener_filters", "filter_chains")
	listenerFilterFields = allow[*listenerv3.ListenerFilter]("name", "typed_config")
	tlsInspectorFields   = allow[*tlsinspectorv3.TlsInspector]()
	filterChainFields    = allow[*listenerv3.FilterChain]("filter_chain_match", "filters")
	chainMatchFields     = allow[*listenerv3.FilterChainMatch]("server_names")
	filterFields         = allow[*listenerv3.Filter]("name", "typed_config")
	tcpProxyFields       = allow[*tcpproxyv3.TcpProxy]("stat_prefix", "cluster", "idle_timeout",
		"weighted_clusters") // weighted_clusters gets its own message
	clusterFields = allow[*clusterv3.Cluster]("name", "type", "eds_cluster_config", "connect_timeout",
		"lb_policy", "load_assignment", "common_lb_config")
	commonLbFields     = allow[*clusterv3.Cluster_CommonLbConfig]("healthy_panic_threshold")
	percentFields      = allow[*typev3.Percent]("value")
	edsClusterFields   = allow[*clusterv3.Cluster_EdsClusterConfig]("eds_config", "service_name")
	configSourceFields = allow[*corev3.ConfigSource]("ads", "resource_api_version")
	adsFields          = allow[*corev3.AggregatedConfigSource]()
	assignmentFields   = allow[*endpointv3.ClusterLoadAssignment]("cluster_name", "endpoints")
	localityLbFields   = allow[*endpointv3.LocalityLbEndpoints]("locality", "lb_endpoints")
	localityFields     = allow[*corev3.Locality]("region", "zone", "sub_zone")
	lbEndpointFields   = allow[*endpointv3.LbEndpoint]("endpoint", "health_status")
	endpointFields     = allow[*endpointv3.Endpoint]("address")
	addressFields      = allow[*corev3.Address]("socket_address")
	socketAddrFields   = allow[*corev3.SocketAddress]("address", "port_value", "protocol")

	// The ROOTCA Secret. tls_certificate and trusted_ca are refused with
	// reasons of their own, so they are allowed here.
	secretFields            = allow[*tlsv3.Secret]("name", "validation_context", "tls_certificate")
	validationContextFields = allow[*tlsv3.CertificateValidationContext]("custom_validator_config", "trusted_ca")
	extensionFields         = allow[*corev3.TypedExtensionConfig]("name", "typed_config")
	spiffeValidatorFields   = allow[*tlsv3.SPIFFECertValidatorConfig]("trust_domains")
	trustDomainFields       = allow[*tlsv3.SPIFFECertValidatorConfig_TrustDomain]("name", "trust_bundle")
	dataSourceFields        = allow[*corev3.DataSource]("inline_bytes")
)

// fieldSet is one message type's allow-list, kept as the list of the
// type's other fields: a check costs one Has per refused field and
// allocates nothing when the message is valid.
type fieldSet[M proto.Message] struct {
	refused []protoreflect.FieldDescriptor
}

// allow builds the allow-list of M from field names; a name M does not
// have is a programming error and panics at start-up.
func allow[M proto.Message](names ...protoreflect.Name) *fieldSet[M] {
	var zero M
	fields := zero.ProtoReflect().Descriptor().Fields()
	for _, n := range names {
		if fields.ByName(n) == nil {
			panic("xdsclient: " + string(zero.ProtoReflect().Descriptor().FullName()) + " has no field " + string(n))
		}
	}
	fs := &fieldSet[M]{}
	for i := range fields.Len() {
		if fd := fields.Get(i); !slices.Contains(names, fd.Name()) {
			fs.refused = append(fs.refused, fd)
		}
	}
	slices.SortFunc(fs.refused, func(a, b protoreflect.FieldDescriptor) int {
		return strings.Compare(string(a.Name()), string(b.Name()))
	})
	return fs
}

// check reports every refused field set in m (nil m: none).
func (fs *fieldSet[M]) check(m M) error {
	pm := m.ProtoReflect()
	if !pm.IsValid() {
		return nil
	}
	var errs []error
	for _, fd := range fs.refused {
		if pm.Has(fd) {
			errs = append(errs, fieldErr(string(fd.Name()), "not supported"))
		}
	}
	return errors.Join(errs...)
}
