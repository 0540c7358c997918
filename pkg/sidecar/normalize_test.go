package sidecar

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// normCase is a path and what normalizing it gives. The method is GET,
// except for "" (CONNECT) and "*" (OPTIONS); "\x00GET" before a path
// asks for GET with it.
type normCase struct{ name, in, want string }

func (tc *normCase) method() string {
	switch {
	case strings.HasPrefix(tc.in, "\x00GET"):
		tc.in = strings.TrimPrefix(tc.in, "\x00GET")
		return "GET"
	case tc.in == "":
		return "CONNECT"
	case tc.in == "*":
		return "OPTIONS"
	}
	return "GET"
}

func TestNormalizePath(t *testing.T) {
	const refused = "\x00refused"
	for _, tc := range []normCase{
		// Envoy's test/common/http/path_utility_test.cc.
		{"already normal", "/xyz", "/xyz"},
		{"already normal, deeper", "/x/y/z", "/x/y/z"},
		{"parent", "/a/b/../c", "/a/c"},
		{"current", "/a/b/./c", "/a/b/c"},
		{"parents above the root", "/a/b/../../../../c", "/c"},
		{"backslash dot dot", "/a/..\\c", "/c"},
		{"reserved encodings kept, their case too", "/%c0%af", "/%c0%af"},
		{"encoded backslash and percent kept", "/%5c%25", "/%5c%25"},
		{"encoded dots", "/a/b/%2E%2E/c", "/a/c"},
		{"encoded dots, lower case", "/a/b/%2e%2e/c", "/a/c"},
		{"encoded dot and a dot", "/a/b/%2E./c", "/a/c"},
		{"encoded current", "/a/b/%2E/c", "/a/b/c"},
		{"leading parent", "/../a/b", "/a/b"},
		{"leading current", "/./a/b", "/a/b"},
		{"no lower-casing", "/A/B/C", "/A/B/C"},
		{"encoded slashes stay, case kept", "/a/%2F%2f/c", "/a/%2F%2f/c"},
		{"encoded NUL", "/xyz/.%00../abc", refused},
		{"encoded NULs", "/xyz/%00.%00./abc", refused},
		{"bad then NUL", "/xyz/AAAAA%%0000/abc", refused},
		// The bypasses of a DENY on /admin*.
		{"bypass parent", "/public/../admin", "/admin"},
		{"bypass current", "/./admin", "/admin"},
		{"bypass encoded letter", "/%61dmin", "/admin"},
		{"bypass encoded parent", "/%2e%2e/admin", "/admin"},
		{"bypass backslash", "/public\\..\\admin", "/admin"},
		{"bypass encoded unreserved", "/%41%44%4d%49%4E%2d%5f%7e", "/ADMIN-_~"},
		// The query is left alone.
		{"query kept", "/public/./x?q=/../y", "/public/x?q=/../y"},
		{"clean with query", "/x?a=%zz", "/x?a=%zz"},
		{"encoded question mark stays", "/a%3Fb", "/a%3Fb"},
		// Dot segments at the end, and dots that name.
		{"trailing current", "/a/.", "/a/"},
		{"trailing parent", "/a/b/..", "/a/"},
		{"parent at root", "/..", "/"},
		{"dot names", "/.well-known/a..b/...", "/.well-known/a..b/..."},
		{"dot then encoded slash", "/.%2F", "/.%2F"},
		{"slashes not merged", "//a//./b", "//a//b"},
		// Characters that must be escaped.
		{"space and quote", "/a b\"c", "/a%20b%22c"},
		{"fragment sign", "/a#b", "/a%23b"},
		{"high bytes", "/\xc3\xa9", "/%C3%A9"},
		{"controls and DEL", "/\x01\x7f", "/%01%7F"},
		{"raw NUL", "/a\x00", refused},
		{"bad encoding", "/a%zz", refused},
		{"truncated encoding", "/a%4", refused},
		{"percent at the end", "/a%", refused},
		// Requests without a path, or not starting with one.
		{"CONNECT", "", ""},
		{"OPTIONS *", "*", "*"},
		{"GET without a path", "\x00GET", refused},
		{"GET *", "\x00GET*", refused},
		{"relative", "a/b", refused},
		{"absolute", "http://x/a", refused},
	} {
		t.Run(tc.name, func(t *testing.T) {
			buf := make([]byte, 0, 4)
			method := tc.method()
			out, changed, ok := normalizePath(buf, method, tc.in)
			if tc.want == refused {
				require.False(t, ok, "%q", out)
				return
			}
			require.True(t, ok)
			got := tc.in
			if changed {
				got = string(out)
				require.NotEqual(t, tc.in, got, "changed, yet the same")
			}
			require.Equal(t, tc.want, got)
		})
	}
}

func TestNormalizePathDoesNotAllocate(t *testing.T) {
	buf := make([]byte, 0, 256)
	for _, p := range []string{"/", "/api/v1/items/42?x=1", "/a.b/c.d", "/public/./x", "/a%2Fb"} {
		n := testing.AllocsPerRun(100, func() { _, _, _ = normalizePath(buf, "GET", p) })
		require.Zero(t, n, p)
	}
}

func FuzzNormalizePath(f *testing.F) {
	for _, s := range []string{"/", "/a/b/../c", "/%2e%2e/admin", "/a\\..\\b", "/%61dmin?q=/../", "/.%2e/%2F", "//..//", "/%%300", "*", "", "a/b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, changed, ok := normalizePath(nil, "GET", in)
		if !ok {
			return
		}
		got := in
		if changed {
			got = string(out)
		}
		require.True(t, strings.HasPrefix(got, "/"), "%q -> %q", in, got)
		again, changed2, ok2 := normalizePath(nil, "GET", got)
		require.True(t, ok2, "%q -> %q refused the second time", in, got)
		require.False(t, changed2, "%q -> %q -> %q", in, got, again)
		path, _, _ := strings.Cut(got, "?")
		inPath, _, _ := strings.Cut(in, "?")
		for _, seg := range []string{"/./", "/../"} {
			require.NotContains(t, path, seg, "%q -> %q", in, got)
		}
		require.False(t, strings.HasSuffix(path, "/.") || strings.HasSuffix(path, "/.."), "%q -> %q", in, got)
		// A '/' comes only from a '/' or a '\': never from %2F.
		require.LessOrEqual(t, strings.Count(path, "/"), strings.Count(inPath, "/")+strings.Count(inPath, "\\"), "%q -> %q", in, got)
	})
}

func BenchmarkNormalizePath(b *testing.B) {
	for _, bc := range []struct{ name, path string }{
		{"clean", "/api/v1/items/42?page=3&size=20"},
		{"dots", "/api/v1/../v2/./items/42?page=3"},
		{"encoded", "/%61pi/v1/items%2F42?page=3"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			buf := make([]byte, 0, 256)
			b.ReportAllocs()
			for b.Loop() {
				_, _, _ = normalizePath(buf, "GET", bc.path)
			}
		})
	}
}
