package sidecar

// Path normalization: an inbound connection manager's normalize_path, as
// Envoy does it (PathUtil::canonicalPath, which runs Chromium's
// CanonicalizePath on the path before the '?'). The normalized path is
// what HTTP RBAC matches and what the app receives, so that a policy on
// "/admin" also holds for "/public/../admin", "/./admin", "/%61dmin" and
// "/%2e%2e/admin".
//
// Per path byte, as Chromium's path table:
//   - a percent-encoded unreserved character (ALPHA DIGIT - . _ ~) is
//     decoded; any other percent-encoding is kept exactly as received,
//     hex case included (a policy on "/a%2fb" keeps matching it), so %2F
//     never becomes a '/';
//   - a backslash is a '/';
//   - '.' and ".." segments (a dot may be written %2e) are removed as
//     RFC 3986 §5.2.4 removes them, never above the root;
//   - a control character, space, '"', '#', '<', '>', '^', '`', '{', '|',
//     '}', DEL or a byte above 0x7f is percent-encoded;
//   - slashes are not merged (merge_slashes is another option).
//
// Refused (the caller answers 400): NUL, raw or %00 (as Envoy); and, where
// Envoy passes it through, a '%' not followed by two hex digits, which the
// sidecar's HTTP/1.1 codec and net/http refuse already on their own
// paths: refusing it on every path keeps them alike and leaves no escape
// that a later decoder might read differently.

// pathClass is what normalizePath does with a byte of the path.
type pathClass uint8

const (
	pathPass     pathClass = iota // copied
	pathEscape                    // percent-encoded
	pathSpecial                   // '%', '.', '\\': looked at closely
	pathRefuse                    // NUL
	pathUnescape                  // copied; decoded when percent-encoded
)

var pathClasses = func() (t [256]pathClass) {
	for c := range 256 {
		switch {
		case c == 0:
			t[c] = pathRefuse
		case c < 0x20 || c >= 0x7f:
			t[c] = pathEscape
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_', c == '~':
			t[c] = pathUnescape
		}
	}
	for _, c := range []byte(" \"#<>^`{|}") {
		t[c] = pathEscape
	}
	for _, c := range []byte("%.\\") {
		t[c] = pathSpecial
	}
	return t
}()

// pathClean reports whether normalizing p (a path without its query,
// starting with '/') would leave it as it is, cheaply: no byte to look at
// closely, and no dot at the start of a segment.
func pathClean(p string) bool {
	for i := 0; i < len(p); i++ {
		switch pathClasses[p[i]] {
		case pathPass, pathUnescape:
		case pathSpecial:
			if p[i] != '.' || p[i-1] == '/' {
				return false
			}
		default:
			return false
		}
	}
	return true
}

// normalizePath normalizes the path p of a method request (its query,
// after the first '?', is kept as it is). A p that does not start with '/'
// is refused, except for the requests that have no path: CONNECT's "" and
// OPTIONS's "*", left alone. When the normalized path differs from p, it
// is written over buf[:0] and returned with changed set (the caller makes
// a string of it if it keeps it); when it does not, nothing is written: a
// path with nothing to normalize costs a scan and no allocation.
func normalizePath(buf []byte, method, p string) (out []byte, changed, ok bool) {
	if p == "" && method == "CONNECT" || p == "*" && method == "OPTIONS" {
		return buf[:0], false, true
	}
	if p == "" || p[0] != '/' {
		return buf[:0], false, false
	}
	path, query := p, ""
	for i := 0; i < len(p); i++ {
		if p[i] == '?' {
			path, query = p[:i], p[i:]
			break
		}
	}
	if pathClean(path) {
		return buf[:0], false, true
	}
	out, ok = canonicalPath(buf[:0], path)
	if !ok {
		return buf[:0], false, false
	}
	if string(out) == path {
		return out[:0], false, true
	}
	return append(out, query...), true, true
}

// canonicalPath appends path (starting with '/') normalized to out.
func canonicalPath(out []byte, path string) ([]byte, bool) {
	for i := 0; i < len(path); {
		c := path[i]
		if n := dotAt(path, i); n > 0 {
			if out[len(out)-1] != '/' {
				out = append(out, '.') // within a segment: a name
				i += n
				continue
			}
			switch kind, used := afterDot(path, i+n); kind {
			case dotName:
				out = append(out, '.')
				i += n
			case dotCurrent:
				i += n + used
			case dotParent:
				out = upToPreviousSlash(out)
				i += n + used
			}
			continue
		}
		switch pathClasses[c] {
		case pathPass, pathUnescape:
			out = append(out, c)
		case pathEscape:
			out = append(out, '%', upperHex[c>>4], upperHex[c&15])
		case pathRefuse:
			return out, false
		case pathSpecial:
			switch c {
			case '\\':
				out = append(out, '/')
			case '%':
				if i+2 >= len(path) || !isHex(path[i+1]) || !isHex(path[i+2]) {
					return out, false
				}
				v := unhex(path[i+1])<<4 | unhex(path[i+2])
				switch pathClasses[v] {
				case pathRefuse:
					return out, false
				case pathUnescape:
					out = append(out, v)
				default:
					out = append(out, path[i:i+3]...)
				}
				i += 3
				continue
			}
		}
		i++
	}
	return out, true
}

// dotAt is the length of a dot at path[i:], '.' (1) or %2e (3); 0 when
// there is none.
func dotAt(path string, i int) int {
	switch {
	case path[i] == '.':
		return 1
	case path[i] == '%' && i+2 < len(path) && path[i+1] == '2' && (path[i+2] == 'e' || path[i+2] == 'E'):
		return 3
	}
	return 0
}

type dotKind uint8

const (
	dotName    dotKind = iota // a segment that starts with a dot: kept
	dotCurrent                // "."
	dotParent                 // ".."
)

// afterDot classifies the segment whose first dot ended at path[i:], and
// how much of the path after that dot it used (the slash after it, and a
// second dot).
func afterDot(path string, i int) (dotKind, int) {
	switch {
	case i == len(path):
		return dotCurrent, 0
	case isPathSlash(path[i]):
		return dotCurrent, 1
	}
	if n := dotAt(path, i); n > 0 {
		switch j := i + n; {
		case j == len(path):
			return dotParent, n
		case isPathSlash(path[j]):
			return dotParent, n + 1
		}
	}
	return dotName, 0
}

func isPathSlash(c byte) bool { return c == '/' || c == '\\' }

// upToPreviousSlash removes the last segment of out, which ends with '/',
// leaving its slash; never the first one.
func upToPreviousSlash(out []byte) []byte {
	i := len(out) - 1
	if i == 0 {
		return out
	}
	i--
	for i > 0 && out[i] != '/' {
		i--
	}
	return out[:i+1]
}

const upperHex = "0123456789ABCDEF"

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c <= 'F':
		return c - 'A' + 10
	}
	return c - 'a' + 10
}
