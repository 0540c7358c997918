package localcluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// certValidity covers any test run or demo; the CA dies with the cluster.
const certValidity = 7 * 24 * time.Hour

// clusterPKI is one cluster's CA, API server serving certificate and service
// account signing key, written under dir.
type clusterPKI struct {
	caPEM []byte

	caCertFile  string
	servingCert string
	servingKey  string
	saKeyFile   string
	saPubFile   string
}

// newClusterPKI generates and writes the cluster CA, a serving certificate
// for the API server valid for dnsNames and ips, and a service account key
// pair.
func newClusterPKI(dir, cluster string, dnsNames []string, ips []netip.Addr) (*clusterPKI, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &clusterPKI{
		caCertFile:  filepath.Join(dir, "ca.crt"),
		servingCert: filepath.Join(dir, "apiserver.crt"),
		servingKey:  filepath.Join(dir, "apiserver.key"),
		saKeyFile:   filepath.Join(dir, "sa.key"),
		saPubFile:   filepath.Join(dir, "sa.pub"),
	}
	now := time.Now()

	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca key: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          mustSerial(),
		Subject:               pkix.Name{CommonName: "isthmus-localcluster-ca-" + cluster, Organization: []string{"isthmus localcluster"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(certValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("ca certificate: %w", err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	p.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})

	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("serving key: %w", err)
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: mustSerial(),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(certValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     dnsNames,
	}
	for _, ip := range ips {
		srvTmpl.IPAddresses = append(srvTmpl.IPAddresses, net.IP(ip.AsSlice()))
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("serving certificate: %w", err)
	}
	srvKeyDER, err := x509.MarshalPKCS8PrivateKey(srvKey)
	if err != nil {
		return nil, err
	}

	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("service account key: %w", err)
	}
	saKeyDER, err := x509.MarshalPKCS8PrivateKey(saKey)
	if err != nil {
		return nil, err
	}
	saPubDER, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}

	files := []struct {
		path  string
		block *pem.Block
		mode  os.FileMode
	}{
		{p.caCertFile, &pem.Block{Type: "CERTIFICATE", Bytes: caDER}, 0o644},
		{p.servingCert, &pem.Block{Type: "CERTIFICATE", Bytes: srvDER}, 0o644},
		{p.servingKey, &pem.Block{Type: "PRIVATE KEY", Bytes: srvKeyDER}, 0o600},
		{p.saKeyFile, &pem.Block{Type: "PRIVATE KEY", Bytes: saKeyDER}, 0o600},
		{p.saPubFile, &pem.Block{Type: "PUBLIC KEY", Bytes: saPubDER}, 0o644},
	}
	for _, f := range files {
		if err := os.WriteFile(f.path, pem.EncodeToMemory(f.block), f.mode); err != nil {
			return nil, err
		}
	}
	return p, nil
}

func mustSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(fmt.Sprintf("crypto/rand: %v", err)) // crypto/rand does not fail on Linux
	}
	return n
}

// User is an identity with a static bearer token in a cluster's token file.
type User struct {
	// Name is the key for Cluster.KubeconfigFor and Cluster.RESTConfig, and
	// names the kubeconfig files (for example "federator").
	Name string
	// Username is what the API server authenticates the token as (for
	// example "system:isthmus:federator").
	Username string
	// Groups beyond system:authenticated, which every user gets.
	Groups []string

	token string
}

// Built-in users of every cluster.
const (
	// UserAdmin is in system:masters.
	UserAdmin = "admin"
	// UserControllerManager is the identity kube-controller-manager runs
	// as.
	UserControllerManager = "controller-manager"
	// UserFederator is system:isthmus:federator with no groups, so it can do
	// only what the RBAC under deploy/ grants it.
	UserFederator = "federator"
)

// builtinUsers returns fresh copies of the built-in users.
func builtinUsers() []User {
	return []User{
		{Name: UserAdmin, Username: "admin", Groups: []string{"system:masters"}},
		// Only what the bootstrap role system:kube-controller-manager
		// grants: each controller runs with its own service account's
		// token (--use-service-account-credentials=true, as kubeadm does),
		// so the EndpointSlice controller writes slices as
		// system:serviceaccount:kube-system:endpointslice-controller.
		{Name: UserControllerManager, Username: "system:kube-controller-manager"},
		{Name: UserFederator, Username: "system:isthmus:federator"},
	}
}

func randomToken() string {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("crypto/rand: %v", err))
	}
	return hex.EncodeToString(b)
}

// writeTokenFile writes kube-apiserver's --token-auth-file:
// token,user,uid[,"group1,group2"].
func writeTokenFile(path string, users []User) error {
	var b strings.Builder
	for _, u := range users {
		fmt.Fprintf(&b, "%s,%s,%s", u.token, u.Username, "uid-"+u.Name)
		if len(u.Groups) > 0 {
			fmt.Fprintf(&b, ",%q", strings.Join(u.Groups, ","))
		}
		b.WriteByte('\n')
	}
	return os.WriteFile(path, []byte(b.String()), 0o600)
}
