package pemutil

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestParseCertificates(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	var certs []*x509.Certificate
	for i := range 2 {
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(i + 1)), Subject: pkix.Name{CommonName: "c"},
			NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
		require.NoError(t, err)
		c, err := x509.ParseCertificate(der)
		require.NoError(t, err)
		certs = append(certs, c)
	}
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
