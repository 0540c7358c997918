package gateway

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"time"
)

// ParseRoutesJSON reads a static routing table, the format of
// `eastwest-gw --routes-file` (for tests, benchmarks and a cluster without
// a federator; in production the xDS client supplies the routes):
//
//	{"routes": [
//	  {"sni": "outbound_.80_._.echo.demo.svc.cluster.local",
//	   "cluster": "outbound|80||echo.demo.svc.cluster.local",
//	   "endpoints": [{"address": "10.0.0.7:8080"}, {"address": "10.0.0.8:8080", "healthy": false}],
//	   "connectTimeout": "1s", "idleTimeout": "1h"},
//	  {"sni": "federation.isthmus.internal", "cluster": "isthmus-federation",
//	   "dns": "federator.isthmus-system.svc.cluster.local:15443"}
//	]}
//
// An endpoint is healthy unless it says "healthy": false; the timeouts are
// optional Go durations. Unknown fields are errors.
func ParseRoutesJSON(data []byte) (*Routes, error) {
	var f struct {
		Routes []struct {
			SNI       string `json:"sni"`
			Cluster   string `json:"cluster"`
			Endpoints []struct {
				Address string `json:"address"`
				Healthy *bool  `json:"healthy"`
			} `json:"endpoints"`
			DNS            string `json:"dns"`
			ConnectTimeout string `json:"connectTimeout"`
			IdleTimeout    string `json:"idleTimeout"`
		} `json:"routes"`
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("routes: %w", err)
	}
	routes := make([]Route, 0, len(f.Routes))
	for i, fr := range f.Routes {
		r := Route{SNI: fr.SNI, Cluster: fr.Cluster, DNS: fr.DNS}
		for j, fe := range fr.Endpoints {
			ap, err := netip.ParseAddrPort(fe.Address)
			if err != nil {
				return nil, fmt.Errorf("routes[%d] (sni %q) endpoint %d: %w", i, fr.SNI, j, err)
			}
			r.Endpoints = append(r.Endpoints, Endpoint{Addr: ap, Healthy: fe.Healthy == nil || *fe.Healthy})
		}
		for _, d := range []struct {
			s   string
			dst *time.Duration
		}{{fr.ConnectTimeout, &r.ConnectTimeout}, {fr.IdleTimeout, &r.IdleTimeout}} {
			if d.s == "" {
				continue
			}
			v, err := time.ParseDuration(d.s)
			if err != nil {
				return nil, fmt.Errorf("routes[%d] (sni %q): %w", i, fr.SNI, err)
			}
			*d.dst = v
		}
		routes = append(routes, r)
	}
	return NewRoutes(routes)
}

// LoadRoutesFile reads ParseRoutesJSON's format from a file.
func LoadRoutesFile(path string) (*Routes, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	r, err := ParseRoutesJSON(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}
