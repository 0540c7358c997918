package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// The mesh's identities: the client in the peer cluster's trust domain,
// the backend in the gateway's, each validated against its own domain's
// bundle (go-spiffe's tlsconfig), as sidecars do.
var (
	clientTD  = spiffeid.RequireTrustDomainFromString("a.mesh")
	backendTD = spiffeid.RequireTrustDomainFromString("b.mesh")
	clientID  = spiffeid.RequireFromPath(clientTD, "/ns/bench/sa/client")
	backendID = spiffeid.RequireFromPath(backendTD, "/ns/bench/sa/backend")
)

// Backend commands, the first byte a client sends after the handshake.
const (
	cmdSink = 'S' // read until EOF, then answer the count (8 bytes)
	cmdPing = 'P' // answer one byte and close
)

// writePKI makes a root per trust domain and an SVID for each side, as PEM
// files in dir: <td>.bundle.pem, client.{crt,key}, backend.{crt,key}.
func writePKI(dir string) error {
	for _, s := range []struct {
		td   spiffeid.TrustDomain
		id   spiffeid.ID
		name string
	}{{clientTD, clientID, "client"}, {backendTD, backendID, "backend"}} {
		rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		root := &x509.Certificate{
			SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
			URIs: []*url.URL{s.td.ID().URL()},
		}
		rootDER, err := x509.CreateCertificate(rand.Reader, root, root, rootKey.Public(), rootKey)
		if err != nil {
			return err
		}
		root, _ = x509.ParseCertificate(rootDER)
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		leaf := &x509.Certificate{
			SerialNumber: big.NewInt(2), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage:    x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			URIs:        []*url.URL{s.id.URL()},
		}
		leafDER, err := x509.CreateCertificate(rand.Reader, leaf, root, key.Public(), rootKey)
		if err != nil {
			return err
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return err
		}
		for file, block := range map[string]*pem.Block{
			s.td.Name() + ".bundle.pem": {Type: "CERTIFICATE", Bytes: rootDER},
			s.name + ".crt":             {Type: "CERTIFICATE", Bytes: leafDER},
			s.name + ".key":             {Type: "PRIVATE KEY", Bytes: keyDER},
		} {
			if err := os.WriteFile(filepath.Join(dir, file), pem.EncodeToMemory(block), 0o600); err != nil {
				return err
			}
		}
	}
	return nil
}

// tlsConfig builds one side's mTLS configuration from writePKI's files:
// TLS 1.3 only, X25519 only (the comparison must not hinge on Go's default
// hybrid post-quantum key exchange), no session resumption (every
// connection is a full handshake).
func tlsConfig(dir string, server bool) (*tls.Config, error) {
	self, peerTD, peerID := "client", backendTD, backendID
	if server {
		self, peerTD, peerID = "backend", clientTD, clientID
	}
	svid, err := x509svid.Load(filepath.Join(dir, self+".crt"), filepath.Join(dir, self+".key"))
	if err != nil {
		return nil, err
	}
	bundle, err := x509bundle.Load(peerTD, filepath.Join(dir, peerTD.Name()+".bundle.pem"))
	if err != nil {
		return nil, err
	}
	var cfg *tls.Config
	if server {
		cfg = tlsconfig.MTLSServerConfig(svid, bundle, tlsconfig.AuthorizeID(peerID))
		cfg.SessionTicketsDisabled = true
	} else {
		cfg = tlsconfig.MTLSClientConfig(svid, bundle, tlsconfig.AuthorizeID(peerID))
		cfg.ServerName = benchSNI
	}
	cfg.MinVersion = tls.VersionTLS13
	cfg.CurvePreferences = []tls.CurveID{tls.X25519}
	return cfg, nil
}

// runBackend is the TLS backend, run as a child process of the benchmark
// (`gateway backend --pki DIR`): it prints its address, then serves the
// sink and ping commands until killed.
func runBackend(args []string) error {
	fs := flag.NewFlagSet("backend", flag.ExitOnError)
	pki := fs.String("pki", "", "directory of writePKI's files")
	_ = fs.Parse(args)
	cfg, err := tlsConfig(*pki, true)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Println(ln.Addr().String())
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			time.Sleep(5 * time.Millisecond)
			continue
		}
		go serveBackend(tls.Server(c, cfg))
	}
}

func serveBackend(c *tls.Conn) {
	defer c.Close()
	cmd := make([]byte, 1)
	if _, err := io.ReadFull(c, cmd); err != nil {
		return
	}
	switch cmd[0] {
	case cmdPing:
		_, _ = c.Write([]byte{'p'})
	case cmdSink:
		buf := make([]byte, 256<<10)
		var n int64
		for {
			m, err := c.Read(buf)
			n += int64(m)
			if err != nil {
				break
			}
		}
		_, _ = c.Write(binary.BigEndian.AppendUint64(nil, uint64(n)))
	}
}
