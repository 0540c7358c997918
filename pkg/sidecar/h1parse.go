package sidecar

import (
	"bytes"
	"errors"
	"net/http"
)

// The HTTP/1.1 codec of the sidecar's own forwarding path (h1.go): heads
// are parsed where they were read, as offsets into the read buffer, and
// strictly, so what the sidecar forwards can be read only one way by the
// next hop (RFC 9112 §11.2, request smuggling): CRLF line endings only,
// no obsolete line folding, no white space before a field's colon, one
// Content-Length value, Transfer-Encoding exactly "chunked" and never with
// Content-Length, chunk sizes of hex digits only.

// Limits of a message head: Envoy's max_request_headers_kb (60 KiB) and
// max_request_headers_count (100), rounded.
const (
	h1MaxHead       = 64 << 10
	h1MaxFields     = 100
	h1MaxConnTokens = 8
	// h1MaxChunkLine bounds a chunk-size line with its extensions, and a
	// trailer field.
	h1MaxChunkLine = 4096
)

// h1Error is a message the codec refuses: the status the sidecar answers
// a downstream with (then closes), and why.
type h1Error struct {
	code int
	msg  string
}

func (e *h1Error) Error() string { return http.StatusText(e.code) + ": " + e.msg }

// The codec's refusals, made once: the hot path allocates no error.
var (
	errBareLF          = &h1Error{http.StatusBadRequest, "line not ended by CRLF"}
	errRequestLine     = &h1Error{http.StatusBadRequest, "malformed request line"}
	errStatusLine      = &h1Error{http.StatusBadRequest, "malformed status line"}
	errVersion         = &h1Error{http.StatusHTTPVersionNotSupported, "unsupported HTTP version"}
	errFieldLine       = &h1Error{http.StatusBadRequest, "malformed header field"}
	errObsFold         = &h1Error{http.StatusBadRequest, "obsolete line folding"}
	errHeadTooLarge    = &h1Error{http.StatusRequestHeaderFieldsTooLarge, "message head larger than 64 KiB"}
	errTooManyFields   = &h1Error{http.StatusRequestHeaderFieldsTooLarge, "more than 100 header fields"}
	errContentLength   = &h1Error{http.StatusBadRequest, "malformed Content-Length"}
	errContentLengths  = &h1Error{http.StatusBadRequest, "differing Content-Length values"}
	errTransferCoding  = &h1Error{http.StatusNotImplemented, "unsupported Transfer-Encoding (only chunked)"}
	errTEAndCL         = &h1Error{http.StatusBadRequest, "both Transfer-Encoding and Content-Length"}
	errTEInHTTP10      = &h1Error{http.StatusBadRequest, "Transfer-Encoding in an HTTP/1.0 message"}
	errMissingHost     = &h1Error{http.StatusBadRequest, "missing Host header"}
	errManyHosts       = &h1Error{http.StatusBadRequest, "more than one Host header"}
	errBadHost         = &h1Error{http.StatusBadRequest, "malformed Host header"}
	errChunkSize       = &h1Error{http.StatusBadRequest, "malformed chunk size"}
	errChunkEnd        = &h1Error{http.StatusBadRequest, "chunk data not followed by CRLF"}
	errChunkLineLength = &h1Error{http.StatusBadRequest, "chunk-size line or trailer field longer than 4 KiB"}
	errTarget          = &h1Error{http.StatusBadRequest, "malformed request target"}
)

// errH1Fallback: the request is one the codec leaves to net/http
// (HTTP/2 prior knowledge, HTTP/1.0, CONNECT, Upgrade, Expect, an
// absolute-form target with user information, too many Connection
// options).
var errH1Fallback = errors.New("sidecar: request left to net/http")

// span is a part of a message head: offsets into it.
type span struct{ s, e int32 }

func (s span) of(b []byte) []byte { return b[s.s:s.e] }

// fieldKind is what the forwarding path does with a header field,
// decided once while parsing.
type fieldKind uint8

const (
	fieldOther            fieldKind = iota
	fieldHost                       // Host
	fieldContentLength              // rewritten from the parsed length
	fieldTransferEncoding           // rewritten from the parsed framing
	fieldConnection                 // hop-by-hop, and names more
	fieldHopByHop                   // Keep-Alive, Proxy-Connection, Proxy-Authenticate, Proxy-Authorization
	fieldTE                         // hop-by-hop; "trailers" is passed on, as ReverseProxy does
	fieldUpgrade                    // hop-by-hop; a request with it falls back
	fieldExpect                     // a request with it falls back
	fieldXFCC                       // X-Forwarded-Client-Cert
)

// h1Field is one header field line.
type h1Field struct {
	kind  fieldKind
	name  span
	value span // trimmed of white space
	line  span // the whole line, CRLF included
}

// h1Head is a parsed request or response head; every span is an offset
// into the bytes it was parsed from.
type h1Head struct {
	// Request line: method, target; absolute is an absolute-form target,
	// whose authority and path-and-query are split out.
	method, target  span
	absolute        bool
	authority, path span // path: path and query of the target; authority: of an absolute-form target
	// Status line.
	status int
	reason span // from the status code on: "200 OK"
	minor  byte // HTTP/1.<minor>

	fields    []h1Field
	fieldsArr [h1MaxFields]h1Field
	host      span // the Host field's value
	hasHost   bool
	// contentLength is -1 when the message has no Content-Length.
	contentLength int64
	chunked       bool
	// Connection options.
	connClose, connKeepAlive bool
	connTokens               [h1MaxConnTokens]span
	nConnTokens              int
	// connMany is set when the Connection fields named more than
	// h1MaxConnTokens fields: connNamed then reads them again.
	connMany        bool
	teTrailers      bool
	upgrade, expect bool
}

func (h *h1Head) reset() {
	h.method, h.target, h.authority, h.path, h.reason, h.host = span{}, span{}, span{}, span{}, span{}, span{}
	h.absolute, h.hasHost = false, false
	h.status, h.minor = 0, 0
	h.fields = h.fieldsArr[:0]
	h.contentLength = -1
	h.chunked, h.connClose, h.connKeepAlive, h.teTrailers, h.upgrade, h.expect = false, false, false, false, false, false
	h.nConnTokens, h.connMany = 0, false
}

// responseBody is how the body of a response with this head is
// delimited, and whether its connection can carry another request after
// it: none (a HEAD request's, 204, 304), or to the connection's end
// (neither chunked nor a length; the connection then closes).
func (h *h1Head) responseBody(headRequest bool) (noBody, toClose, keep bool) {
	noBody = headRequest || h.status == http.StatusNoContent || h.status == http.StatusNotModified
	toClose = !noBody && !h.chunked && h.contentLength < 0
	keep = !toClose && !h.connClose && (h.minor == 1 || h.connKeepAlive)
	return noBody, toClose, keep
}

// endToEnd reports whether response field f of head goes on to the next
// hop: it is not hop-by-hop (Connection, Keep-Alive, TE, Upgrade, the
// framing) and the Connection field does not name it. Content-Length
// is the caller's to rewrite.
func (h *h1Head) endToEnd(head []byte, f *h1Field) bool {
	switch f.kind {
	case fieldOther, fieldHost, fieldExpect, fieldXFCC:
		return h.nConnTokens == 0 || !h.connNamed(head, f)
	}
	return false
}

// connNamed reports whether the Connection header named field f of b:
// hop-by-hop, so removed.
func (h *h1Head) connNamed(b []byte, f *h1Field) bool {
	name := f.name.of(b)
	if h.connMany {
		for i := range h.fields {
			if c := &h.fields[i]; c.kind == fieldConnection && hasToken(c.value.of(b), string(name)) {
				return true
			}
		}
		return false
	}
	for i := range h.nConnTokens {
		if bytes.EqualFold(h.connTokens[i].of(b), name) {
			return true
		}
	}
	return false
}

// scanHead finds the end of a message head in b: the offset just past
// the empty line that ends it, or 0 when b holds no complete head yet.
// from is where a previous call on a prefix of b stopped (next), so a
// head read in pieces is scanned once. A line ended by a bare LF is
// refused at once.
func scanHead(b []byte, from int) (end, next int, err error) {
	i := from
	for {
		j := bytes.IndexByte(b[i:], '\n')
		if j < 0 {
			return 0, i, nil
		}
		j += i
		if j == 0 || b[j-1] != '\r' {
			return 0, 0, errBareLF
		}
		if j-1 == i && i > 0 {
			return j + 1, 0, nil
		}
		i = j + 1
	}
}

// tokenChars marks tchar (RFC 9110 §5.6.2).
var tokenChars = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return t
}()

// valueChar reports a byte allowed in a field value: visible ASCII,
// space, tab and obs-text; no control character (CR, LF, NUL, DEL).
func valueChar(c byte) bool { return c == '\t' || (c >= ' ' && c != 0x7f) }

// parseRequestHead parses head, a complete request head (scanHead found
// its end), into h. It returns an *h1Error for a request to refuse, and
// errH1Fallback for one net/http should serve.
func parseRequestHead(head []byte, h *h1Head) error {
	h.reset()
	eol := bytes.IndexByte(head, '\n') - 1 // scanHead checked the CR
	if eol < 0 {
		return errRequestLine
	}
	line := head[:eol]
	sp1 := bytes.IndexByte(line, ' ')
	if sp1 <= 0 {
		return errRequestLine
	}
	for _, c := range line[:sp1] {
		if !tokenChars[c] {
			return errRequestLine
		}
	}
	sp2 := bytes.IndexByte(line[sp1+1:], ' ')
	if sp2 <= 0 {
		return errRequestLine
	}
	sp2 += sp1 + 1
	h.method, h.target = span{0, int32(sp1)}, span{int32(sp1 + 1), int32(sp2)}
	for _, c := range line[sp1+1 : sp2] {
		if c <= ' ' || c == 0x7f {
			return errRequestLine
		}
	}
	switch version := line[sp2+1:]; {
	case string(version) == "HTTP/1.1":
		h.minor = 1
	case string(version) == "HTTP/1.0", string(version) == "HTTP/2.0" && string(line[:sp1]) == "PRI":
		// HTTP/1.0's keep-alive and close-delimited bodies, and HTTP/2
		// prior knowledge, are net/http's.
		return errH1Fallback
	case len(version) == 8 && string(version[:5]) == "HTTP/" && isDigit(version[5]) && version[6] == '.' && isDigit(version[7]):
		return errVersion
	default:
		return errRequestLine
	}
	if string(line[:sp1]) == http.MethodConnect {
		return errH1Fallback
	}
	if err := h.splitTarget(head); err != nil {
		return err
	}
	if err := h.parseFields(head, eol+2, true); err != nil {
		return err
	}
	switch {
	case h.upgrade, h.expect:
		return errH1Fallback
	case !h.hasHost:
		return errMissingHost
	}
	return nil
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

// targetChars reports a target whose characters the codec takes: no
// fragment, no bad percent-encoding, none of the characters a URI must
// escape.
func targetChars[T string | []byte](t T) bool {
	for i := 0; i < len(t); i++ {
		switch c := t[i]; {
		case c == '%':
			if i+2 >= len(t) || !isHex(t[i+1]) || !isHex(t[i+2]) {
				return false
			}
		case c == '#', c >= 0x80, c == '"', c == '<', c == '>', c == '\\', c == '^', c == '`', c == '{', c == '|', c == '}':
			return false
		}
	}
	return true
}

// splitTarget finds the path (and query) and, for an absolute-form
// target, the authority. It refuses a target net/http would (a bad
// percent-encoding) and leaves user information to net/http.
func (h *h1Head) splitTarget(head []byte) error {
	t := h.target.of(head)
	if !targetChars(t) {
		return errTarget
	}
	if t[0] == '/' || string(t) == "*" {
		h.path = h.target
		return nil
	}
	// absolute-form: scheme "://" authority path-abempty [ "?" query ]
	i := bytes.Index(t, []byte("://"))
	if i <= 0 {
		return errTarget
	}
	for _, c := range t[:i] {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || isDigit(c) || c == '+' || c == '-' || c == '.') {
			return errTarget
		}
	}
	rest := t[i+3:]
	end := len(rest)
	if j := bytes.IndexAny(rest, "/?"); j >= 0 {
		end = j
	}
	auth := rest[:end]
	if bytes.IndexByte(auth, '@') >= 0 || bytes.IndexByte(auth, '%') >= 0 {
		return errH1Fallback
	}
	if len(auth) == 0 || !validHost(auth) {
		return errTarget
	}
	base := h.target.s + int32(i+3)
	h.absolute = true
	h.authority = span{base, base + int32(end)}
	h.path = span{base + int32(end), h.target.e}
	return nil
}

func isHex(c byte) bool { return isDigit(c) || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F' }

// validHost is net/http's check of a Host value (httpguts.ValidHostHeader):
// the characters of a reg-name, an IPv6 literal and a port.
func validHost(h []byte) bool {
	for _, c := range h {
		if !hostChars[c] {
			return false
		}
	}
	return true
}

var hostChars = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range "!$%&'()*+,-.:;=[]_~" {
		t[c] = true
	}
	return t
}()

// parseResponseHead parses head, a complete response head, into h.
func parseResponseHead(head []byte, h *h1Head) error {
	h.reset()
	eol := bytes.IndexByte(head, '\n') - 1
	if eol < 0 {
		return errStatusLine
	}
	line := head[:eol]
	// HTTP/1.x SP 3DIGIT SP reason
	if len(line) < 12 || string(line[:7]) != "HTTP/1." || !isDigit(line[7]) || line[8] != ' ' ||
		!isDigit(line[9]) || !isDigit(line[10]) || !isDigit(line[11]) || (len(line) > 12 && line[12] != ' ') {
		return errStatusLine
	}
	h.minor = line[7] - '0'
	h.status = int(line[9]-'0')*100 + int(line[10]-'0')*10 + int(line[11]-'0')
	if h.status < 100 {
		return errStatusLine
	}
	for _, c := range line[12:] {
		if !valueChar(c) {
			return errStatusLine
		}
	}
	h.reason = span{9, int32(eol)}
	if err := h.parseFields(head, eol+2, false); err != nil {
		return err
	}
	if h.chunked && h.minor == 0 {
		// RFC 9112 §6.1: its framing is faulty. net/http ignores the
		// field and reads to the connection's end; refused here.
		return errTEInHTTP10
	}
	return nil
}

// parseFields parses the field lines of head from off to the empty line,
// classifying each and reading the framing and Connection fields; a
// request's Host is checked.
func (h *h1Head) parseFields(head []byte, off int, request bool) error {
	var cl span // the first Content-Length's value; h.contentLength >= 0 once seen
	for {
		eol := bytes.IndexByte(head[off:], '\n')
		if eol < 0 {
			return errFieldLine
		}
		eol += off - 1 // the CR
		if eol == off {
			break // the empty line
		}
		if len(h.fields) == h1MaxFields {
			return errTooManyFields
		}
		f, err := parseField(head, off, eol)
		if err != nil {
			return err
		}
		value := f.value.of(head)
		switch f.kind {
		case fieldHost:
			if !request {
				break
			}
			if h.hasHost {
				return errManyHosts
			}
			if !validHost(value) {
				return errBadHost
			}
			h.host, h.hasHost = f.value, true
		case fieldContentLength:
			n, ok := parseContentLength(value)
			if !ok {
				return errContentLength
			}
			// Repeated, it must be the same text, as net/http requires
			// ("02" and "2" differ).
			if h.contentLength >= 0 && !bytes.Equal(value, cl.of(head)) {
				return errContentLengths
			}
			cl, h.contentLength = f.value, n
		case fieldTransferEncoding:
			if len(value) == 0 {
				return errFieldLine // and not a coding we do not know
			}
			if h.chunked || !bytes.EqualFold(value, []byte("chunked")) {
				return errTransferCoding
			}
			h.chunked = true
		case fieldConnection:
			h.connectionOptions(head, f.value)
		case fieldTE:
			h.teTrailers = h.teTrailers || hasToken(value, "trailers")
		case fieldUpgrade:
			h.upgrade = true
		case fieldExpect:
			h.expect = true
		}
		h.fields = append(h.fields, f)
		off = eol + 2
	}
	if h.chunked && h.contentLength >= 0 {
		return errTEAndCL
	}
	return nil
}

// parseField parses the field line head[off:eol] (eol is its CR).
func parseField(head []byte, off, eol int) (h1Field, error) {
	line := head[off:eol]
	if line[0] == ' ' || line[0] == '\t' {
		return h1Field{}, errObsFold
	}
	colon := bytes.IndexByte(line, ':')
	if colon <= 0 {
		return h1Field{}, errFieldLine
	}
	for _, c := range line[:colon] {
		if !tokenChars[c] {
			return h1Field{}, errFieldLine
		}
	}
	vs, ve := colon+1, len(line)
	for vs < ve && (line[vs] == ' ' || line[vs] == '\t') {
		vs++
	}
	for ve > vs && (line[ve-1] == ' ' || line[ve-1] == '\t') {
		ve--
	}
	for _, c := range line[vs:ve] {
		if !valueChar(c) {
			return h1Field{}, errFieldLine
		}
	}
	o := int32(off)
	return h1Field{
		kind:  classify(line[:colon]),
		name:  span{o, o + int32(colon)},
		value: span{o + int32(vs), o + int32(ve)},
		line:  span{o, int32(eol + 2)},
	}, nil
}

// classify is what a field name means to the forwarding path.
func classify(name []byte) fieldKind {
	switch len(name) {
	case 2:
		if bytes.EqualFold(name, []byte("TE")) {
			return fieldTE
		}
	case 4:
		if bytes.EqualFold(name, []byte("Host")) {
			return fieldHost
		}
	case 6:
		if bytes.EqualFold(name, []byte("Expect")) {
			return fieldExpect
		}
	case 7:
		if bytes.EqualFold(name, []byte("Upgrade")) {
			return fieldUpgrade
		}
	case 10:
		switch {
		case bytes.EqualFold(name, []byte("Connection")):
			return fieldConnection
		case bytes.EqualFold(name, []byte("Keep-Alive")):
			return fieldHopByHop
		}
	case 14:
		if bytes.EqualFold(name, []byte("Content-Length")) {
			return fieldContentLength
		}
	case 16:
		if bytes.EqualFold(name, []byte("Proxy-Connection")) {
			return fieldHopByHop
		}
	case 17:
		if bytes.EqualFold(name, []byte("Transfer-Encoding")) {
			return fieldTransferEncoding
		}
	case 18:
		if bytes.EqualFold(name, []byte("Proxy-Authenticate")) {
			return fieldHopByHop
		}
	case 19:
		if bytes.EqualFold(name, []byte("Proxy-Authorization")) {
			return fieldHopByHop
		}
	case len(xfccHeader):
		if bytes.EqualFold(name, []byte(xfccHeader)) {
			return fieldXFCC
		}
	}
	return fieldOther
}

// connectionOptions reads a Connection field's comma-separated options.
func (h *h1Head) connectionOptions(head []byte, v span) {
	b := v.of(head)
	for i := 0; i < len(b); {
		j := bytes.IndexByte(b[i:], ',')
		if j < 0 {
			j = len(b) - i
		}
		s, e := i, i+j
		for s < e && (b[s] == ' ' || b[s] == '\t') {
			s++
		}
		for e > s && (b[e-1] == ' ' || b[e-1] == '\t') {
			e--
		}
		tok := b[s:e]
		switch {
		case len(tok) == 0:
		case bytes.EqualFold(tok, []byte("close")):
			h.connClose = true
		case bytes.EqualFold(tok, []byte("keep-alive")):
			h.connKeepAlive = true
		case bytes.EqualFold(tok, []byte("upgrade")):
			h.upgrade = true
		case h.nConnTokens == h1MaxConnTokens:
			h.connMany = true
		default:
			h.connTokens[h.nConnTokens] = span{v.s + int32(s), v.s + int32(e)}
			h.nConnTokens++
		}
		i += j + 1
	}
}

// hasToken reports whether the comma-separated list v holds tok.
func hasToken(v []byte, tok string) bool {
	for len(v) > 0 {
		j := bytes.IndexByte(v, ',')
		if j < 0 {
			j = len(v)
		}
		if bytes.EqualFold(bytes.Trim(v[:j], " \t"), []byte(tok)) {
			return true
		}
		if j == len(v) {
			break
		}
		v = v[j+1:]
	}
	return false
}

// parseContentLength reads 1*DIGIT, at most 18 of them (no overflow).
func parseContentLength(v []byte) (int64, bool) {
	if len(v) == 0 || len(v) > 18 {
		return 0, false
	}
	var n int64
	for _, c := range v {
		if !isDigit(c) {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

// parseChunkSize reads a chunk-size line without its CRLF: 1 to 15 hex
// digits, then optional chunk extensions, which are checked and dropped.
func parseChunkSize(line []byte) (int64, error) {
	i := 0
	var n int64
	for i < len(line) && isHex(line[i]) {
		if i == 15 {
			return 0, errChunkSize
		}
		c := line[i]
		switch {
		case c >= 'a':
			c -= 'a' - 10
		case c >= 'A':
			c -= 'A' - 10
		default:
			c -= '0'
		}
		n = n<<4 | int64(c)
		i++
	}
	if i == 0 {
		return 0, errChunkSize
	}
	rest := line[i:]
	for len(rest) > 0 && (rest[0] == ' ' || rest[0] == '\t') {
		rest = rest[1:]
	}
	if len(rest) == 0 {
		return n, nil
	}
	if rest[0] != ';' {
		return 0, errChunkSize
	}
	for _, c := range rest {
		if !valueChar(c) {
			return 0, errChunkSize
		}
	}
	return n, nil
}
