package sidecar

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"maps"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"go.opentelemetry.io/otel/metric"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// Meter records into the sidecar's metrics, so another component of the
// pod's proxy (the DNS proxy) shows in the same /stats/prometheus.
func (p *Proxy) Meter() metric.Meter { return p.metrics.meter }

// adminHandler is the admin port (Istio's 127.0.0.1:15000): Envoy's
// /config_dump, /ready and /stats, for people and tools on the pod.
func (p *Proxy) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /config_dump", p.serveConfigDump)
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		// Envoy's words: LIVE, PRE_INITIALIZING, DRAINING.
		ok, why := p.Ready()
		switch {
		case ok:
			_, _ = w.Write([]byte("LIVE\n"))
		case p.draining.Load():
			http.Error(w, "DRAINING", http.StatusServiceUnavailable)
		default:
			http.Error(w, "PRE_INITIALIZING: "+why, http.StatusServiceUnavailable)
		}
	})
	stats := p.statsHandler()
	mux.Handle("GET /stats", stats)
	mux.Handle("GET /stats/prometheus", stats)
	return mux
}

// healthHandler is the health port (Istio's :15020): the kubelet's
// readiness probe and the merged metrics Prometheus scrapes.
func (p *Proxy) healthHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz/ready", func(w http.ResponseWriter, _ *http.Request) {
		if ok, why := p.Ready(); !ok {
			http.Error(w, why, http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.Handle("GET /stats/prometheus", p.statsHandler())
	return mux
}

func (p *Proxy) statsHandler() http.Handler {
	return promhttp.HandlerFor(p.metrics.registry, promhttp.HandlerOpts{})
}

// The /config_dump document: the adopted configuration as the proxy uses
// it, with the versions it was made from.
type (
	configDump struct {
		// Versions are the xDS version_info of each type the adopted
		// configuration was made from.
		Versions  map[string]string `json:"versions"`
		AdoptedAt *time.Time        `json:"adopted_at,omitempty"`
		XDS       *xdsDump          `json:"xds,omitempty"`
		SVID      *svidDump         `json:"svid,omitempty"`
		Listeners []any             `json:"listeners"`
		Routes    []routeDump       `json:"routes"`
		Clusters  []clusterDump     `json:"clusters"`
		// TrustDomains are the ROOTCA bundles, one per trust domain.
		TrustDomains []trustDomainDump `json:"trust_domains"`
		// Names are the DNS proxy's table, host → VIP.
		Names map[string]string `json:"names"`
	}
	xdsDump struct {
		Connected  bool              `json:"connected"`
		Accepted   uint64            `json:"accepted"`
		Rejected   uint64            `json:"rejected"`
		Published  uint64            `json:"published"`
		LastNACK   string            `json:"last_nack,omitempty"`
		LastError  string            `json:"last_error,omitempty"`
		Versions   map[string]string `json:"versions_accepted"`
		Reconnects uint64            `json:"reconnects"`
	}
	svidDump struct {
		ID       string    `json:"spiffe_id,omitempty"`
		NotAfter time.Time `json:"not_after,omitzero"`
		Error    string    `json:"error,omitempty"`
	}
	outboundDump struct {
		Name    string              `json:"name"`
		Address string              `json:"address"`
		Chains  []outboundChainDump `json:"filter_chains"`
		Default outboundChainDump   `json:"default_filter_chain"`
	}
	outboundChainDump struct {
		DestinationPort uint16   `json:"destination_port,omitempty"`
		PrefixRanges    []string `json:"prefix_ranges,omitempty"`
		HTTP            *hcmDump `json:"http_connection_manager,omitempty"`
		TCP             *tcpDump `json:"tcp_proxy,omitempty"`
	}
	inboundDump struct {
		Name    string             `json:"name"`
		Address string             `json:"address"`
		Chains  []inboundChainDump `json:"filter_chains"`
	}
	inboundChainDump struct {
		DestinationPort uint16 `json:"destination_port,omitempty"`
		// TransportProtocol is "tls" or "raw_buffer" (plaintext: no
		// secrets).
		TransportProtocol    string   `json:"transport_protocol"`
		ApplicationProtocols []string `json:"application_protocols,omitempty"`
		CertSecret           string   `json:"tls_certificate_sds_secret,omitempty"`
		ValidationSecret     string   `json:"validation_context_sds_secret,omitempty"`
		// RBAC are the chain's envoy.filters.network.rbac filters, in
		// order (DENY, then ALLOW), each with its policies' names.
		RBAC []rbacDump `json:"network_rbac,omitempty"`
		HTTP *hcmDump   `json:"http_connection_manager,omitempty"`
		TCP  *tcpDump   `json:"tcp_proxy,omitempty"`
	}
	rbacDump struct {
		Action string `json:"action"`
		// StatPrefix is a network filter's; an HTTP filter has none.
		StatPrefix string   `json:"stat_prefix,omitempty"`
		Policies   []string `json:"policies"`
	}
	hcmDump struct {
		StatPrefix        string     `json:"stat_prefix"`
		RouteConfigName   string     `json:"rds_route_config_name,omitempty"`
		RouteConfig       *routeDump `json:"route_config,omitempty"`
		ForwardClientCert string     `json:"forward_client_cert_details"`
		SetClientCertURI  bool       `json:"set_current_client_cert_uri,omitempty"`
		// NormalizePath is normalize_path: the inbound request's path is
		// normalized before HTTP RBAC and the app see it.
		NormalizePath bool `json:"normalize_path,omitempty"`
		// RBAC are the manager's envoy.filters.http.rbac filters, in
		// order (DENY, then ALLOW), each with its policies' names.
		RBAC []rbacDump `json:"http_rbac,omitempty"`
	}
	tcpDump struct {
		Cluster     string `json:"cluster"`
		StatPrefix  string `json:"stat_prefix"`
		IdleTimeout string `json:"idle_timeout"`
	}
	routeDump struct {
		Name         string            `json:"name"`
		VirtualHosts []virtualHostDump `json:"virtual_hosts"`
	}
	virtualHostDump struct {
		Name    string      `json:"name"`
		Domains []string    `json:"domains"`
		Routes  []routeRule `json:"routes"`
	}
	routeRule struct {
		Prefix  string `json:"prefix"`
		Cluster string `json:"cluster"`
		Timeout string `json:"timeout"`
	}
	clusterDump struct {
		Name           string          `json:"name"`
		Type           string          `json:"type"`
		ConnectTimeout string          `json:"connect_timeout"`
		Service        *serviceDump    `json:"service,omitempty"`
		UpstreamHTTP   string          `json:"upstream_http,omitempty"`
		TLS            *upstreamTLS    `json:"tls,omitempty"`
		Priorities     [][]localityDmp `json:"priorities,omitempty"`
	}
	serviceDump struct {
		Host     string `json:"host"`
		VIP      string `json:"vip"`
		Port     uint16 `json:"port"`
		Protocol string `json:"protocol"`
	}
	upstreamTLS struct {
		SNI  string   `json:"sni"`
		SANs []string `json:"subject_alt_names"`
		ALPN []string `json:"alpn_protocols"`
	}
	localityDmp struct {
		Region    string         `json:"region,omitempty"`
		Zone      string         `json:"zone,omitempty"`
		SubZone   string         `json:"sub_zone,omitempty"`
		Weight    uint32         `json:"load_balancing_weight,omitempty"`
		Endpoints []endpointDump `json:"endpoints"`
	}
	endpointDump struct {
		Address string `json:"address"`
		Healthy bool   `json:"healthy"`
		// Ejected is passive health: the sidecar failed to connect and
		// skips it for a while.
		Ejected bool `json:"ejected,omitempty"`
	}
	trustDomainDump struct {
		Name  string     `json:"name"`
		Roots []rootDump `json:"roots"`
	}
	rootDump struct {
		Subject  string    `json:"subject"`
		NotAfter time.Time `json:"not_after"`
		SHA256   string    `json:"sha256"`
	}
)

func (p *Proxy) serveConfigDump(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(p.configDump())
}

func (p *Proxy) configDump() configDump {
	d := configDump{Versions: map[string]string{}, Listeners: []any{}, Routes: []routeDump{}, Clusters: []clusterDump{},
		TrustDomains: []trustDomainDump{}, Names: map[string]string{}}
	if s, ok := p.src.(interface{ Stats() xdsclient.Stats }); ok {
		st := s.Stats()
		d.XDS = &xdsDump{Connected: st.Connected, Accepted: st.Accepted, Rejected: st.Rejected, Published: st.Published,
			LastNACK: st.LastNACK, LastError: st.LastError, Versions: st.Versions, Reconnects: st.Reconnects}
	}
	if svid, err := p.svid.GetX509SVID(); err != nil {
		d.SVID = &svidDump{Error: err.Error()}
	} else {
		d.SVID = &svidDump{ID: svid.ID.String(), NotAfter: svid.Certificates[0].NotAfter}
	}
	st := p.state.Load()
	if st == nil {
		return d
	}
	cfg := st.cfg
	d.AdoptedAt = &st.adopted
	if cfg.Versions != nil {
		d.Versions = cfg.Versions
	}
	sc := cfg.Sidecar
	out := outboundDump{Name: sc.Outbound.Name, Address: addrPort(sc.Outbound.Addr.String(), sc.Outbound.Port),
		Chains: []outboundChainDump{}, Default: outboundChain(&sc.Outbound.Default)}
	for i := range sc.Outbound.Chains {
		out.Chains = append(out.Chains, outboundChain(&sc.Outbound.Chains[i]))
	}
	in := inboundDump{Name: sc.Inbound.Name, Address: addrPort(sc.Inbound.Addr.String(), sc.Inbound.Port), Chains: []inboundChainDump{}}
	for _, ch := range sc.Inbound.Chains {
		d := inboundChainDump{DestinationPort: ch.Port, TransportProtocol: ch.Transport().String(), ApplicationProtocols: ch.ALPN,
			RBAC: networkRBAC(ch.RBAC), HTTP: hcm(ch.HTTP), TCP: tcp(ch.TCP)}
		if ch.TLS != nil {
			d.CertSecret, d.ValidationSecret = ch.TLS.CertSecret, ch.TLS.ValidationSecret
		}
		in.Chains = append(in.Chains, d)
	}
	d.Listeners = []any{out, in}
	for _, name := range slices.Sorted(maps.Keys(sc.Routes)) {
		d.Routes = append(d.Routes, routeConfig(sc.Routes[name]))
	}
	now := time.Now().UnixNano()
	for _, name := range slices.Sorted(maps.Keys(cfg.Clusters)) {
		c := cfg.Clusters[name]
		cd := clusterDump{Name: name, Type: c.Type.String(), ConnectTimeout: c.ConnectTimeout.String()}
		if c.UpstreamHTTP != xdsclient.UpstreamHTTPNone {
			cd.UpstreamHTTP = c.UpstreamHTTP.String()
		}
		if m := c.Service; m != nil {
			cd.Service = &serviceDump{Host: m.Host, VIP: m.VIP.String(), Port: m.Port, Protocol: m.Protocol.String()}
		}
		if t := c.TLS; t != nil {
			cd.TLS = &upstreamTLS{SNI: t.SNI, SANs: []string{}, ALPN: t.ALPN}
			for _, id := range t.SANs {
				cd.TLS.SANs = append(cd.TLS.SANs, id.String())
			}
		}
		for _, pr := range c.Priorities {
			var level []localityDmp
			for _, l := range pr.Localities {
				ld := localityDmp{Region: l.Locality.Region, Zone: l.Locality.Zone, SubZone: l.Locality.SubZone, Weight: l.Weight,
					Endpoints: []endpointDump{}}
				for _, e := range l.Endpoints {
					ld.Endpoints = append(ld.Endpoints, endpointDump{Address: e.HostPort(), Healthy: e.Healthy,
						Ejected: e.Addr.IsValid() && p.health.Ejected(e.Addr, now)})
				}
				level = append(level, ld)
			}
			cd.Priorities = append(cd.Priorities, level)
		}
		d.Clusters = append(d.Clusters, cd)
	}
	if cfg.Bundles != nil {
		bundles := cfg.Bundles.Bundles()
		slices.SortFunc(bundles, func(a, b *x509bundle.Bundle) int {
			return strings.Compare(a.TrustDomain().Name(), b.TrustDomain().Name())
		})
		for _, b := range bundles {
			td := trustDomainDump{Name: b.TrustDomain().Name(), Roots: []rootDump{}}
			for _, r := range b.X509Authorities() {
				sum := sha256.Sum256(r.Raw)
				td.Roots = append(td.Roots, rootDump{Subject: r.Subject.String(), NotAfter: r.NotAfter, SHA256: hex.EncodeToString(sum[:])})
			}
			d.TrustDomains = append(d.TrustDomains, td)
		}
	}
	for host, vip := range sc.NameTable() {
		d.Names[host] = vip.String()
	}
	return d
}

func addrPort(addr string, port uint16) string {
	return net.JoinHostPort(addr, strconv.Itoa(int(port)))
}

func outboundChain(ch *xdsclient.OutboundChain) outboundChainDump {
	d := outboundChainDump{DestinationPort: ch.Port, HTTP: hcm(ch.HTTP), TCP: tcp(ch.TCP)}
	for _, v := range ch.VIPs {
		d.PrefixRanges = append(d.PrefixRanges, v.String()+"/"+strconv.Itoa(v.BitLen()))
	}
	return d
}

func hcm(h *xdsclient.HTTPConnectionManager) *hcmDump {
	if h == nil {
		return nil
	}
	d := &hcmDump{StatPrefix: h.StatPrefix, RouteConfigName: h.RouteConfigName, ForwardClientCert: h.ForwardClientCert.String(),
		SetClientCertURI: h.SetClientCertURI, NormalizePath: h.NormalizePath}
	if h.RBAC != nil {
		d.RBAC = rbacFilters(h.RBAC.Deny, h.RBAC.Allow)
	}
	if h.Routes != nil {
		rc := routeConfig(h.Routes)
		d.RouteConfig = &rc
	}
	return d
}

func tcp(t *xdsclient.TCPProxy) *tcpDump {
	if t == nil {
		return nil
	}
	return &tcpDump{Cluster: t.Cluster, StatPrefix: t.StatPrefix, IdleTimeout: t.IdleTimeout.String()}
}

func routeConfig(rc *xdsclient.RouteConfig) routeDump {
	d := routeDump{Name: rc.Name, VirtualHosts: []virtualHostDump{}}
	for _, vh := range rc.VirtualHosts {
		v := virtualHostDump{Name: vh.Name, Domains: vh.Domains, Routes: []routeRule{}}
		for _, r := range vh.Routes {
			v.Routes = append(v.Routes, routeRule{Prefix: r.Prefix, Cluster: r.Cluster, Timeout: r.Timeout.String()})
		}
		d.VirtualHosts = append(d.VirtualHosts, v)
	}
	return d
}

// networkRBAC dumps a chain's RBAC filters: action, stat prefix and
// policy names; nil without any.
func networkRBAC(r *xdsclient.NetworkRBAC) []rbacDump {
	if r == nil {
		return nil
	}
	return rbacFilters(r.Deny, r.Allow)
}

// rbacFilters dumps a DENY and an ALLOW filter, those there are.
func rbacFilters(deny, allow *xdsclient.RBACRules) []rbacDump {
	var out []rbacDump
	for _, f := range []struct {
		action string
		rules  *xdsclient.RBACRules
	}{{"DENY", deny}, {"ALLOW", allow}} {
		if f.rules == nil {
			continue
		}
		d := rbacDump{Action: f.action, StatPrefix: f.rules.StatPrefix, Policies: []string{}}
		for _, p := range f.rules.Policies {
			d.Policies = append(d.Policies, p.Name)
		}
		out = append(out, d)
	}
	return out
}
