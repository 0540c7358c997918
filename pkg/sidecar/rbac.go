package sidecar

import (
	"context"
	"log/slog"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/net/http2/hpack"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// An inbound HTTP connection manager's envoy.filters.http.rbac, decided
// per request on every HTTP path (the HTTP/1.1 codec, the HTTP/2 one,
// net/http's server), once the request head is read and before anything
// of it goes upstream: against the connection's caller (its verified
// SPIFFE ID), peer address and original destination address and port,
// and the request's method, authority, path and headers, each path
// giving its own view of them. remote_ip is the peer address too: the
// inbound connection managers trust no X-Forwarded-For hop
// (xff_num_trusted_hops 0, Istio's default), so a header a caller sends
// cannot choose it. A denied request is answered as Envoy answers it and
// never reaches the app; the connection stays for the next request.

// rbacDenied is the body of Envoy's answer to a request its HTTP RBAC
// filter denies, with 403 and content-type text/plain.
const rbacDenied = "RBAC: access denied"

// rbacRefused counts a request the HTTP RBAC filters of ci's connection
// manager denied, and logs it at Debug: the caller, method and path
// (without the query, which may carry credentials), never a header.
func (p *Proxy) rbacRefused(ci *connInfo, method, path string) {
	p.metrics.refuse(ci.listener, ReasonRBAC)
	if p.log.Enabled(context.Background(), slog.LevelDebug) {
		// Copies: the HTTP/1.1 path's strings are its read buffer's.
		p.log.Debug("refused", "listener", ci.listener, "reason", ReasonRBAC, "caller", ci.in.caller,
			"port", ci.dst.Port(), "method", strings.Clone(method), "path", strings.Clone(xdsclient.URLPath(path)))
	}
}

// valueSep is what the values of a repeated header are joined with for
// the RBAC matchers: "," as Envoy's header map joins them, "; " for
// cookie, as it joins cookie crumbs (RFC 9113 §8.2.3).
func valueSep(name string) string {
	if name == "cookie" {
		return "; "
	}
	return ","
}

// joiner joins the values of a repeated header field as Envoy's header
// map does (valueSep; empty ones included) for RBAC's matchers: a lone
// value as it is, several in buf, reused from request to request.
type joiner struct {
	one string
	n   int
	buf []byte
}

func (j *joiner) reset() { j.one, j.n = "", 0 }

func (j *joiner) add(name, val string) {
	switch j.n++; j.n {
	case 1:
		j.one = val
	case 2:
		j.buf = append(append(append(j.buf[:0], j.one...), valueSep(name)...), val...)
	default:
		j.buf = append(append(j.buf, valueSep(name)...), val...)
	}
}

func (j *joiner) result() (string, bool) {
	if j.n > 1 {
		return str(j.buf), true
	}
	return j.one, j.n == 1
}

// h1Fields are an HTTP/1.1 request head's header fields as RBAC reads
// them. The connection's own, reused.
type h1Fields struct {
	head []byte
	h    *h1Head
	join joiner
}

var _ xdsclient.RBACHeaders = (*h1Fields)(nil)

func (v *h1Fields) Lookup(name string) (string, bool) {
	v.join.reset()
	for i := range v.h.fields {
		f := &v.h.fields[i]
		if strings.EqualFold(str(f.name.of(v.head)), name) {
			v.join.add(name, str(f.value.of(v.head)))
		}
	}
	return v.join.result()
}

// h2Fields are an HTTP/2 request's header block as RBAC reads it, as
// h1Fields. The downstream connection's reader's own, reused.
type h2Fields struct {
	fields []hpack.HeaderField
	join   joiner
}

var _ xdsclient.RBACHeaders = (*h2Fields)(nil)

func (v *h2Fields) Lookup(name string) (string, bool) {
	v.join.reset()
	for i := range v.fields {
		// HTTP/2 field names are lower case (the framer refuses others).
		if f := &v.fields[i]; f.Name == name {
			v.join.add(name, f.Value)
		}
	}
	return v.join.result()
}

// netHTTPFields are a net/http request's header as RBAC reads it.
type netHTTPFields http.Header

var _ xdsclient.RBACHeaders = netHTTPFields(nil)

func (h netHTTPFields) Lookup(name string) (string, bool) {
	// net/http's server keeps header keys in canonical form.
	vs := http.Header(h).Values(name)
	if len(vs) == 0 {
		return "", false
	}
	return strings.Join(vs, valueSep(name)), true
}

// rbacConn is the connection's part of an RBAC request: its caller,
// peer address and original destination. Inbound only: RBAC is.
func (ci *connInfo) rbacConn() xdsclient.RBACRequest { return ci.in.rbacRequest() }

// allowedBy reports whether the network RBAC nw (rbacNow's: nil unless
// a new configuration's chain has not decided the connection yet)
// allows ci's connection.
func (ci *connInfo) allowedBy(nw *xdsclient.NetworkRBAC) bool {
	if nw == nil {
		return true
	}
	req := ci.rbacConn()
	return nw.Allows(&req)
}

// rbacAllowsNetHTTP decides r on the net/http path: its request target
// as :path (the path and query of an absolute-form one).
func rbacAllowsNetHTTP(rb *xdsclient.HTTPRBAC, ci *connInfo, r *http.Request) bool {
	req := ci.rbacConn()
	req.Method, req.Authority, req.Path, req.Headers = r.Method, r.Host, requestPath(r), netHTTPFields(r.Header)
	return rb.Allows(&req)
}

// requestPath is r's :path: the request target as received when it is
// origin-form (or *), else its URL's path and query; empty for CONNECT.
func requestPath(r *http.Request) string {
	if strings.HasPrefix(r.RequestURI, "/") || r.RequestURI == "*" {
		return r.RequestURI
	}
	if r.Method == http.MethodConnect {
		return ""
	}
	p := r.URL.EscapedPath()
	if r.URL.RawQuery != "" {
		p += "?" + r.URL.RawQuery
	}
	return p
}

// normalizeRequestPath normalizes r's path as normalize_path asks, and
// reports whether it could be. A changed path replaces r's RequestURI
// (RBAC's :path) and its URL's path (what ReverseProxy sends upstream):
// RawPath keeps the encodings the normalization kept, %2F among them.
func normalizeRequestPath(r *http.Request) bool {
	if r.Method == http.MethodConnect {
		return true
	}
	p := requestPath(r)
	if p == "" || p[0] == '?' {
		p = "/" + p // an absolute-form target without a path (RFC 9112 3.2.2)
	}
	out, changed, ok := normalizePath(nil, r.Method, p)
	if !ok {
		return false
	}
	if !changed && p == r.RequestURI {
		return true
	}
	if changed {
		p = str(out) // out is the path's own
	}
	path, _, _ := strings.Cut(p, "?")
	u, err := url.ParseRequestURI(path)
	if err != nil {
		return false
	}
	r.URL.Path, r.URL.RawPath = u.Path, u.RawPath
	r.RequestURI = p
	return true
}
