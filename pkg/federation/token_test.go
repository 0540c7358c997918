package federation

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func testToken(t testing.TB) Token {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "a.mesh root"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	id, secret, err := newSecret()
	require.NoError(t, err)
	return Token{
		ClusterName: "a", TrustDomain: "a.mesh", FederatorID: "spiffe://a.mesh/ns/isthmus-system/sa/isthmus-federator",
		Addresses: []string{"gw.a.example:15443", "10.254.0.1:15443"}, Roots: [][]byte{der},
		Peer: "b", PeerTrustDomain: "b.mesh", ID: id, Secret: secret, Expires: time.Now().Add(time.Hour).UTC().Truncate(time.Second),
	}
}

func TestTokenRoundTrip(t *testing.T) {
	in := testToken(t)
	s, err := in.Encode()
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(s, "isthmus1."))
	out, err := DecodeToken("  " + s + "\n")
	require.NoError(t, err)
	require.Equal(t, in, out)
	require.Len(t, out.RootCertificates(), 1)
	require.False(t, out.Expired(time.Now()))
	require.True(t, out.Expired(out.Expires))
}

func TestDecodeTokenRefusesBadTokens(t *testing.T) {
	good, err := testToken(t).Encode()
	require.NoError(t, err)
	mutate := func(f func(*Token)) string {
		tok := testToken(t)
		f(&tok)
		s, err := tok.Encode()
		require.NoError(t, err)
		return s
	}
	tests := []struct {
		name, token, want string
	}{
		{"not a token", "hello", "does not start with"},
		{"cut when copied", good[:len(good)/2], "was it cut when copied?"},
		// On a base64 boundary, the encoding holds and the JSON ends early.
		{"cut on a base64 boundary", good[:len("isthmus1.")+(len(good)-len("isthmus1."))/8*4], "was it cut when copied?"},
		{"not base64", "isthmus1.***", "not base64url"},
		{"unknown field", "isthmus1." + b64(`{"cluster":"a","admin":true}`), `unknown field "admin"`},
		{"bad cluster name", mutate(func(t *Token) { t.ClusterName = "A_1" }), `cluster "A_1"`},
		{"federator outside trust domain", mutate(func(t *Token) { t.FederatorID = "spiffe://evil.mesh/x" }), "not in trust domain a.mesh"},
		{"no addresses", mutate(func(t *Token) { t.Addresses = nil }), "no addresses"},
		{"bad address", mutate(func(t *Token) { t.Addresses = []string{"gw:http"} }), `port "http" is not a number`},
		{"garbage root", mutate(func(t *Token) { t.Roots = [][]byte{[]byte("x")} }), "roots[0]"},
		{"short secret", mutate(func(t *Token) { t.Secret = "abc" }), "malformed secret"},
		{"no expiry", mutate(func(t *Token) { t.Expires = time.Time{} }), "no expiry"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeToken(tc.token)
			require.ErrorIs(t, err, ErrInvalidToken)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func b64(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

func TestSecretHash(t *testing.T) {
	_, secret, err := newSecret()
	require.NoError(t, err)
	h := HashSecret(secret)
	require.NotContains(t, h, secret)
	require.True(t, SecretMatches(secret, h))
	require.False(t, SecretMatches(secret+"x", h))
	require.False(t, SecretMatches("", h))
}

// The token arrives from another organisation's operator: decoding must
// never panic, and whatever it accepts is valid.
func FuzzDecodeToken(f *testing.F) {
	good, err := testToken(f).Encode()
	require.NoError(f, err)
	f.Add(good)
	f.Add("isthmus1.")
	f.Add("isthmus1.e30")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := DecodeToken(s)
		if err != nil {
			return
		}
		require.NoError(t, tok.Validate())
	})
}

// An address a peer or proxy dials is an IP it can reach or a DNS name,
// with a port: the unspecified and multicast addresses, IPv4-mapped too,
// are refused.
func TestCheckAddress(t *testing.T) {
	for _, ok := range []string{"10.1.0.1:15443", "127.0.0.1:1", "[fd00::1]:15443", "gw.example.net:443"} {
		require.NoError(t, CheckAddress(ok), ok)
	}
	for a, want := range map[string]string{
		"0.0.0.0:15443":          `address "0.0.0.0:15443": 0.0.0.0 is not a unicast address`,
		"[::]:15443":             `address "[::]:15443": :: is not a unicast address`,
		"[::ffff:0.0.0.0]:15443": `address "[::ffff:0.0.0.0]:15443": 0.0.0.0 is not a unicast address`,
		"224.0.0.1:15443":        `address "224.0.0.1:15443": 224.0.0.1 is not a unicast address`,
		"[ff02::1]:15443":        `address "[ff02::1]:15443": ff02::1 is not a unicast address`,
		"bad_name:15443":         `address "bad_name:15443": host is neither an IP nor a DNS name`,
		"[fe80::1%eth0]:15443":   `address "[fe80::1%eth0]:15443": host is neither an IP nor a DNS name`,
		"gw.example.net:0":       `address "gw.example.net:0": port must be between 1 and 65535, inclusive`,
	} {
		require.EqualError(t, CheckAddress(a), want, a)
	}
}
