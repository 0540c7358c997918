package sidecar

import (
	"crypto/tls"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// ALPN values of the contract (docs/sidecar-xds.md, "Clusters").
const (
	alpnHTTP1 = "istio-http/1.1"
	alpnHTTP2 = "istio-h2"
)

// state is one adopted configuration and what serving it needs, built
// once and then only read.
type state struct {
	cfg *xdsclient.Config
	// gen orders the configurations: a later one has a higher gen.
	gen uint64
	// adopted is when the proxy adopted cfg.
	adopted time.Time
	// clusters are the upstreams by cluster name.
	clusters map[string]*upstream
	// inboundTLS are the TLS server configurations of the inbound
	// chains, by index: the chain's ALPN, the SVID, client certificates
	// required and verified against their own trust domain's bundle;
	// nil for a raw_buffer chain.
	inboundTLS []*tls.Config
	// dispatch is the inbound listener's TLS configuration, made once
	// (inboundDispatch).
	dispatchOnce sync.Once
	dispatch     *tls.Config
}

// upstream is one cluster of one configuration.
type upstream struct {
	name string
	c    *xdsclient.Cluster
	// picker chooses endpoints; nil for an ORIGINAL_DST cluster, which
	// goes where the connection was going.
	picker *Picker
	// pool holds the cluster's connections, kept across configurations.
	pool *pool
}

// Check is the sidecar's judgement of a configuration, beyond what the
// xDS client validates: give it to xdsclient.ClientConfig.Check, so a
// configuration the proxy would not adopt is NACKed with the reason. The
// proxy applies it too, and keeps its last configuration when it fails.
func Check(cfg *xdsclient.Config) error {
	if cfg == nil || cfg.Sidecar == nil || cfg.Sidecar.Outbound == nil || cfg.Sidecar.Inbound == nil {
		return errors.New("sidecar: the configuration has no sidecar listeners (node role is not " + xdsclient.RoleSidecar + ")")
	}
	var problems []string
	for _, name := range slices.Sorted(maps.Keys(cfg.Clusters)) {
		c := cfg.Clusters[name]
		switch c.Type {
		case xdsclient.OriginalDst:
			if c.TLS != nil {
				problems = append(problems, fmt.Sprintf("cluster %q: ORIGINAL_DST with TLS is not supported", name))
			}
		case xdsclient.EDS, xdsclient.Static:
			if c.TLS == nil {
				problems = append(problems, fmt.Sprintf("cluster %q: no UpstreamTlsContext: the sidecar speaks only mTLS to endpoints", name))
			} else if len(c.TLS.ALPN) == 0 {
				problems = append(problems, fmt.Sprintf("cluster %q: no alpn_protocols: the next hop could not tell HTTP from TCP", name))
			}
		default:
			problems = append(problems, fmt.Sprintf("cluster %q: type %v is not supported by the sidecar", name, c.Type))
		}
	}
	if len(problems) > 0 {
		return errors.New("sidecar: " + strings.Join(problems, "; "))
	}
	return nil
}

// buildState prepares cfg for serving: pickers per cluster, pools reused
// where the cluster's connection settings did not change (and retired
// otherwise), and the inbound TLS configurations.
func (p *Proxy) buildState(cfg *xdsclient.Config) *state {
	st := &state{cfg: cfg, adopted: time.Now(), clusters: make(map[string]*upstream, len(cfg.Clusters))}
	p.poolsMu.Lock()
	next := make(map[string]*pool, len(cfg.Clusters))
	for name := range cfg.Clusters {
		c := cfg.Clusters[name]
		u := &upstream{name: name, c: &c}
		if c.Type != xdsclient.OriginalDst {
			u.picker = NewPicker(u.c, &p.health)
		}
		key := poolKey(u.c)
		pl := p.pools[name]
		if pl == nil || pl.key != key {
			if pl != nil {
				p.retire(pl)
			}
			pl = p.newPool(u.c, key)
		}
		next[name] = pl
		u.pool = pl
		st.clusters[name] = u
	}
	for name, pl := range p.pools {
		if _, kept := next[name]; !kept {
			p.retire(pl)
		}
	}
	p.pools = next
	p.poolsMu.Unlock()

	base := tlsconfig.MTLSServerConfig(p.svid, p.bundles, tlsconfig.AuthorizeAny())
	base.SessionTicketsDisabled = true // every connection verifies its caller afresh
	for _, ch := range cfg.Sidecar.Inbound.Chains {
		if ch.TLS == nil {
			st.inboundTLS = append(st.inboundTLS, nil) // plaintext: no handshake picks it
			continue
		}
		c := base.Clone()
		c.NextProtos = slices.Clone(ch.ALPN)
		st.inboundTLS = append(st.inboundTLS, c)
	}
	return st
}

// retire closes a replaced pool's idle connections; the ones in use close
// when they go idle. It is kept (for closePools) until it has had no
// connection for a while: a request that started on the previous
// configuration may still dial through it. p.poolsMu is held.
func (p *Proxy) retire(pl *pool) {
	pl.closeIdle()
	now := time.Now()
	p.retired = slices.DeleteFunc(p.retired, func(old *pool) bool {
		return old.drained() && now.Sub(old.retiredAt) > retiredKeep
	})
	pl.retiredAt = now
	p.retired = append(p.retired, pl)
}

// retiredKeep is how long a retired pool without connections is kept.
const retiredKeep = time.Minute

// poolKey is what a pool's connections depend on: another key means
// another pool.
func poolKey(c *xdsclient.Cluster) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%v|%v|%v", c.Type, c.ConnectTimeout, c.UpstreamHTTP)
	if t := c.TLS; t != nil {
		fmt.Fprintf(&b, "|%s|%q|%q", t.SNI, t.ALPN, t.SANs)
	}
	return b.String()
}

// authorizer accepts a peer whose SPIFFE ID is one of ids: the cluster's
// SAN matchers. No matcher accepts any ID the bundles verify, as Envoy
// does.
func authorizer(ids []spiffeid.ID) tlsconfig.Authorizer {
	if len(ids) == 0 {
		return tlsconfig.AuthorizeAny()
	}
	return tlsconfig.AuthorizeOneOf(ids...)
}

// bundleSource is the trust bundles of the adopted configuration's ROOTCA
// Secret, one per trust domain: a peer is verified against the bundle of
// the trust domain in its own SPIFFE ID, never against a merged pool. It
// is read at every handshake, so a rotation needs no restart.
type bundleSource struct{ p *Proxy }

var _ x509bundle.Source = bundleSource{}

func (s bundleSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	st := s.p.state.Load()
	if st == nil || st.cfg.Bundles == nil {
		return nil, fmt.Errorf("sidecar: no trust bundle for %q: no %s accepted yet", td.Name(), xdsclient.RootCASecretName)
	}
	b, ok := st.cfg.Bundles.Get(td)
	if !ok {
		return nil, fmt.Errorf("sidecar: trust domain %q is not federated (no bundle for it in %s)", td.Name(), xdsclient.RootCASecretName)
	}
	return b, nil
}
