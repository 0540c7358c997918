package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The X-Forwarded-Client-Cert header as Envoy writes it
// (https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_conn_man/headers#x-forwarded-client-cert):
//
//	header  = element *( "," element )
//	element = pair *( ";" pair )
//	pair    = key "=" value
//	value   = quoted / plain
//
// Each proxy that forwards the client certificate appends one element, so
// the last one is what the nearest proxy authenticated. Keys (By, Hash,
// Cert, Chain, Subject, URI, DNS) may repeat within an element: a
// certificate with several URI SANs gives several URI pairs. A quoted value
// may hold ',', ';' and '='; a backslash escapes the next character, as
// Envoy escapes '"' in a Subject. Space and tab around elements and pairs
// are skipped, since intermediaries may fold several header lines into
// one with ", ".

// XFCCPair is one key=value pair of an element.
type XFCCPair struct {
	Key, Value string
}

// XFCCElement is one certificate's element: its pairs in header order.
type XFCCElement []XFCCPair

// Values returns the values of every pair whose key is key, compared
// without regard to case, in order.
func (e XFCCElement) Values(key string) []string {
	var vs []string
	for _, p := range e {
		if strings.EqualFold(p.Key, key) {
			vs = append(vs, p.Value)
		}
	}
	return vs
}

// String formats e as ParseXFCC reads it, quoting the values that need it.
func (e XFCCElement) String() string {
	var b strings.Builder
	for i, p := range e {
		if i > 0 {
			b.WriteByte(';')
		}
		b.WriteString(p.Key)
		b.WriteByte('=')
		if !needsQuotes(p.Value) {
			b.WriteString(p.Value)
			continue
		}
		b.WriteByte('"')
		for j := range len(p.Value) {
			if c := p.Value[j]; c == '"' || c == '\\' {
				b.WriteByte('\\')
			}
			b.WriteByte(p.Value[j])
		}
		b.WriteByte('"')
	}
	return b.String()
}

// FormatXFCC joins elements into one header value.
func FormatXFCC(elements []XFCCElement) string {
	s := make([]string, len(elements))
	for i, e := range elements {
		s[i] = e.String()
	}
	return strings.Join(s, ",")
}

func needsQuotes(v string) bool {
	if v == "" {
		return false
	}
	if isOWS(v[0]) || isOWS(v[len(v)-1]) {
		return true
	}
	return strings.ContainsAny(v, `,;="\`)
}

// ErrXFCC marks a malformed X-Forwarded-Client-Cert header.
var ErrXFCC = errors.New("malformed x-forwarded-client-cert")

// ParseXFCC parses an X-Forwarded-Client-Cert header value into its
// elements. An empty or all-blank header has none. It reads s once, left to
// right, and allocates only the result.
func ParseXFCC(s string) ([]XFCCElement, error) {
	p := xfccParser{s: s}
	p.skipOWS()
	if p.i == len(s) {
		return nil, nil
	}
	var elements []XFCCElement
	for {
		e, err := p.element()
		if err != nil {
			return nil, err
		}
		elements = append(elements, e)
		if p.i == len(s) {
			return elements, nil
		}
		p.i++ // the ',' that element stopped at
	}
}

type xfccParser struct {
	s string
	i int
}

func (p *xfccParser) errorf(format string, args ...any) error {
	return fmt.Errorf("%w: at byte %d: %s", ErrXFCC, p.i, fmt.Sprintf(format, args...))
}

func isOWS(c byte) bool { return c == ' ' || c == '\t' }

func (p *xfccParser) skipOWS() {
	for p.i < len(p.s) && isOWS(p.s[p.i]) {
		p.i++
	}
}

// element reads pairs up to the end of s or a ',', where it stops.
func (p *xfccParser) element() (XFCCElement, error) {
	var e XFCCElement
	for {
		p.skipOWS()
		pair, err := p.pair()
		if err != nil {
			return nil, err
		}
		e = append(e, pair)
		p.skipOWS()
		if p.i == len(p.s) || p.s[p.i] == ',' {
			return e, nil
		}
		if p.s[p.i] != ';' {
			return nil, p.errorf("want ';' or ',' after a value, got %q", p.s[p.i])
		}
		p.i++
	}
}

func (p *xfccParser) pair() (XFCCPair, error) {
	start := p.i
	for p.i < len(p.s) && isKeyByte(p.s[p.i]) {
		p.i++
	}
	key := p.s[start:p.i]
	if key == "" {
		if p.i == len(p.s) {
			return XFCCPair{}, p.errorf("want a key, got the end")
		}
		return XFCCPair{}, p.errorf("want a key, got %q", p.s[p.i])
	}
	if p.i == len(p.s) || p.s[p.i] != '=' {
		return XFCCPair{}, p.errorf("want '=' after key %q", key)
	}
	p.i++
	if p.i < len(p.s) && p.s[p.i] == '"' {
		v, err := p.quoted()
		return XFCCPair{Key: key, Value: v}, err
	}
	start = p.i
	for p.i < len(p.s) && strings.IndexByte(`,;"`, p.s[p.i]) < 0 {
		p.i++
	}
	return XFCCPair{Key: key, Value: strings.TrimRight(p.s[start:p.i], " \t")}, nil
}

// quoted reads a quoted value, p.i at its opening quote.
func (p *xfccParser) quoted() (string, error) {
	open := p.i
	p.i++
	start := p.i
	// Values without escapes, Envoy's usual, are slices of s.
	for p.i < len(p.s) && p.s[p.i] != '"' && p.s[p.i] != '\\' {
		p.i++
	}
	if p.i < len(p.s) && p.s[p.i] == '"' {
		p.i++
		return p.s[start : p.i-1], nil
	}
	var b strings.Builder
	b.WriteString(p.s[start:p.i])
	for p.i < len(p.s) {
		switch c := p.s[p.i]; c {
		case '"':
			p.i++
			return b.String(), nil
		case '\\':
			if p.i+1 == len(p.s) {
				return "", p.errorf("a backslash ends the header")
			}
			b.WriteByte(p.s[p.i+1])
			p.i += 2
		default:
			b.WriteByte(c)
			p.i++
		}
	}
	p.i = open
	return "", p.errorf("unterminated quoted value")
}

// isKeyByte reports whether c may appear in a key: an HTTP token byte
// other than those that separate values.
func isKeyByte(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// CallerIdentity returns the SPIFFE ID of the caller as the nearest proxy
// authenticated it: the first URI of the header's last element that is a
// valid SPIFFE ID. It returns "" without error when the header is empty or
// that element carries none, and an error when the header is malformed.
func CallerIdentity(header string) (string, error) {
	elements, err := ParseXFCC(header)
	if err != nil || len(elements) == 0 {
		return "", err
	}
	for _, uri := range elements[len(elements)-1].Values("URI") {
		if id, err := spiffeid.FromString(uri); err == nil {
			return id.String(), nil
		}
	}
	return "", nil
}
