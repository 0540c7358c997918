package pemutil

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// selfSigned makes n self-signed certificates with one key.
func selfSigned(t *testing.T, n int) []*x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	var certs []*x509.Certificate
	for i := range n {
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(i + 1)), Subject: pkix.Name{CommonName: "c"},
			NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
		require.NoError(t, err)
		c, err := x509.ParseCertificate(der)
		require.NoError(t, err)
		certs = append(certs, c)
	}
	return certs
}

func TestParseCertificates(t *testing.T) {
	certs := selfSigned(t, 2)
	got, err := ParseCertificates(EncodeCertificates(certs...))
	require.NoError(t, err)
	require.Len(t, got, 2)
	require.True(t, got[1].Equal(certs[1]), "order kept")

	_, err = ParseCertificates(nil)
	require.ErrorContains(t, err, "no PEM certificate")
	_, err = ParseCertificates(append(EncodeCertificates(certs[0]), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1}})...))
	require.ErrorContains(t, err, `unexpected PEM block "PRIVATE KEY"`)
	_, err = ParseCertificates(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("x")}))
	require.Error(t, err)
}

// A truncated list (say a bundle cut while being written, during a root
// rotation) is an error, never the certificates before the cut.
func TestParseCertificatesNoticesTruncation(t *testing.T) {
	certs := selfSigned(t, 3)
	one, two := EncodeCertificates(certs[0]), EncodeCertificates(certs[1])
	full := EncodeCertificates(certs...)

	tests := []struct {
		name    string
		data    []byte
		want    int    // certificates, when no error
		wantErr string // else
	}{
		{name: "complete", data: full, want: 3},
		{name: "trailing white space", data: append(bytes.Clone(full), "\n\t \r\n"...), want: 3},
		{name: "explanatory text before blocks", data: append([]byte("subject=CN = c\n"), full...), want: 3},
		{name: "half of the second certificate", data: append(bytes.Clone(one), two[:len(two)/2]...), wantErr: "PEM block 2 is truncated or corrupt"},
		{name: "second one cut inside its END line", data: append(bytes.Clone(one), two[:len(two)-8]...), wantErr: "PEM block 2 is truncated or corrupt"},
		{name: "cut inside the BEGIN line", data: append(bytes.Clone(one), two[:7]...), wantErr: "7 bytes after the last PEM block (certificate 1) are not a PEM block"},
		{name: "trailing garbage", data: append(bytes.Clone(full), "garbage"...), wantErr: "after the last PEM block (certificate 3)"},
		{
			// encoding/pem would skip the broken block and return the third.
			name:    "a broken block in the middle",
			data:    slices.Concat(one, two[:len(two)/2], []byte("\n"), EncodeCertificates(certs[2])),
			wantErr: "PEM block 2 is truncated or corrupt",
		},
		{name: "only text", data: []byte("hello"), wantErr: "no PEM certificate found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseCertificates(tt.data)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				require.Nil(t, got)
				return
			}
			require.NoError(t, err)
			require.Len(t, got, tt.want)
		})
	}
}
