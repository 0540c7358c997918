package main

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// Envoy's own examples, from its header documentation, plus what two
// sidecars on the way give.
const (
	envoyExample1 = `By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com`
	envoyExample2 = `By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;URI=http://testclient.lyft.com,By=http://backend.lyft.com;Hash=9ba61d6425303443c0748a02dd8de688468ed33be74eee6556d90c0149c1309e;URI=http://frontend.lyft.com`
	twoSidecars   = `By=spiffe://a.mesh/ns/demo/sa/gw;Hash=aa;URI=spiffe://b.mesh/ns/demo/sa/client,By=spiffe://a.mesh/ns/demo/sa/echo;Hash=bb;Subject="";URI=spiffe://a.mesh/ns/isthmus-system/sa/eastwest-gw`
)

func TestParseXFCC(t *testing.T) {
	for _, tc := range []struct {
		name   string
		header string
		want   []XFCCElement
	}{
		{name: "empty", header: "", want: nil},
		{name: "blank", header: " \t", want: nil},
		{name: "one pair", header: "URI=spiffe://a.mesh/ns/x/sa/y",
			want: []XFCCElement{{{"URI", "spiffe://a.mesh/ns/x/sa/y"}}}},
		{name: "envoy example, quoted subject", header: envoyExample1, want: []XFCCElement{{
			{"By", "http://frontend.lyft.com"},
			{"Hash", "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"},
			{"Subject", "/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client"},
			{"URI", "http://testclient.lyft.com"},
		}}},
		{name: "envoy example, two elements", header: envoyExample2, want: []XFCCElement{
			{{"By", "http://frontend.lyft.com"}, {"Hash", "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"}, {"URI", "http://testclient.lyft.com"}},
			{{"By", "http://backend.lyft.com"}, {"Hash", "9ba61d6425303443c0748a02dd8de688468ed33be74eee6556d90c0149c1309e"}, {"URI", "http://frontend.lyft.com"}},
		}},
		{name: "separators and escapes inside quotes", header: `Subject="CN=a,O=\"b;c\"\\";URI=spiffe://t/x`,
			want: []XFCCElement{{{"Subject", `CN=a,O="b;c"\`}, {"URI", "spiffe://t/x"}}}},
		{name: "repeated keys", header: "URI=spiffe://t/a;URI=spiffe://t/b;DNS=a.example;DNS=b.example",
			want: []XFCCElement{{{"URI", "spiffe://t/a"}, {"URI", "spiffe://t/b"}, {"DNS", "a.example"}, {"DNS", "b.example"}}}},
		{name: "folded header lines", header: " URI=spiffe://t/a , URI=spiffe://t/b ;\tHash=cc\t",
			want: []XFCCElement{{{"URI", "spiffe://t/a"}}, {{"URI", "spiffe://t/b"}, {"Hash", "cc"}}}},
		{name: "empty values", header: `Subject="";URI=`,
			want: []XFCCElement{{{"Subject", ""}, {"URI", ""}}}},
		{name: "plain value holding '='", header: "Cert=a=b%3D",
			want: []XFCCElement{{{"Cert", "a=b%3D"}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseXFCC(tc.header)
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
			again, err := ParseXFCC(FormatXFCC(got))
			require.NoError(t, err)
			require.Equal(t, got, again, "formatting and parsing again changes nothing")
		})
	}
}

func TestParseXFCCMalformed(t *testing.T) {
	for _, tc := range []struct {
		name, header, msg string
	}{
		{"no equals", "URI", `want '=' after key "URI"`},
		{"no key", "=spiffe://t/a", "want a key"},
		{"empty element", "URI=a,,URI=b", "want a key"},
		{"trailing comma", "URI=a,", "want a key, got the end"},
		{"trailing semicolon", "URI=a;", "want a key, got the end"},
		{"unterminated quote", `Subject="CN=a;URI=b`, "unterminated quoted value"},
		{"backslash at the end", `Subject="CN=a\`, "a backslash ends the header"},
		{"text after quotes", `Subject="a"b;URI=c`, `want ';' or ',' after a value, got 'b'`},
		{"quote inside a plain value", `URI=a"b"`, `want ';' or ',' after a value, got '"'`},
		{"space inside a key", "U RI=a", `want '=' after key "U"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseXFCC(tc.header)
			require.ErrorIs(t, err, ErrXFCC)
			require.ErrorContains(t, err, tc.msg)
			require.Nil(t, got)
		})
	}
}

func TestCallerIdentity(t *testing.T) {
	for _, tc := range []struct {
		name, header, want, err string
	}{
		{name: "no header"},
		{name: "one sidecar", header: "By=spiffe://a.mesh/ns/demo/sa/echo;Hash=aa;URI=spiffe://b.mesh/ns/demo/sa/client",
			want: "spiffe://b.mesh/ns/demo/sa/client"},
		{name: "the last element is the nearest proxy's", header: twoSidecars,
			want: "spiffe://a.mesh/ns/isthmus-system/sa/eastwest-gw"},
		{name: "first SPIFFE URI of several", header: "URI=https://example.com/x;URI=spiffe://t/first;URI=spiffe://t/second",
			want: "spiffe://t/first"},
		{name: "invalid SPIFFE IDs are skipped", header: "URI=spiffe://UPPER/x;URI=spiffe://t/ok", want: "spiffe://t/ok"},
		{name: "last element without a URI", header: "URI=spiffe://t/a,By=spiffe://t/b;Hash=cc"},
		{name: "not SPIFFE", header: envoyExample2},
		{name: "malformed", header: `URI="spiffe://t/a`, err: "unterminated quoted value"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := CallerIdentity(tc.header)
			if tc.err != "" {
				require.ErrorIs(t, err, ErrXFCC)
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}
}

// FuzzParseXFCC checks that no header makes the parser panic, and that
// whatever it accepts formats back into a header that parses the same.
func FuzzParseXFCC(f *testing.F) {
	for _, s := range []string{
		"", envoyExample1, envoyExample2, twoSidecars,
		`Subject="CN=a,O=\"b;c\"\\";URI=spiffe://t/x`,
		" URI=a , URI=b ;\tHash=cc\t", `URI="a`, "URI=a,,", "Cert=a=b",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, header string) {
		elements, err := ParseXFCC(header)
		if err != nil {
			require.ErrorIs(t, err, ErrXFCC)
			require.Nil(t, elements)
			return
		}
		for _, e := range elements {
			require.NotEmpty(t, e, "an element has at least one pair")
			for _, p := range e {
				require.NotEmpty(t, p.Key)
			}
		}
		again, err := ParseXFCC(FormatXFCC(elements))
		require.NoError(t, err, "formatted: %q", FormatXFCC(elements))
		require.Equal(t, elements, again)
		_, err = CallerIdentity(header)
		require.NoError(t, err)
	})
}
