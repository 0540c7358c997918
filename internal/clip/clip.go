// Package clip shortens text a peer or a proxy chose (a NACK's reason, a
// type URL, a name) before it goes into a log line, a status condition or
// an error: at most n bytes, cut on a UTF-8 boundary, saying how much was
// left out.
package clip

import (
	"fmt"
	"unicode/utf8"
)

// String returns s when it has at most n bytes, else its start and
// "… (<k> more bytes)", n bytes at most in all (the marker alone when n
// is smaller than it).
func String(s string, n int) string {
	if len(s) <= n {
		return s
	}
	more := fmt.Sprintf("… (%d more bytes)", len(s)-n)
	cut := max(n-len(more), 0)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + more
}
