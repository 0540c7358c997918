// Package tlsbackend is the mTLS backend and client side the benchmarks
// put behind and in front of the east-west gateway: a root per trust
// domain and an SVID for each side written as PEM files, go-spiffe's
// tlsconfig builders on both ends, a backend server run as a child
// process (`<bench> backend --pki DIR`), and a dialer that completes the
// handshake. make bench-gateway and make bench-propagation share it.
//
// Both sides speak TLS 1.3 only, X25519 only (a comparison must not hinge
// on Go's default hybrid post-quantum key exchange), ECDSA P-256
// certificates, no session resumption: every connection is a full
// handshake, as a new connection from a peer's sidecar is.
package tlsbackend

import (
	"context"
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
	ClientTD  = spiffeid.RequireTrustDomainFromString("a.mesh")
	BackendTD = spiffeid.RequireTrustDomainFromString("b.mesh")
	ClientID  = spiffeid.RequireFromPath(ClientTD, "/ns/bench/sa/client")
	BackendID = spiffeid.RequireFromPath(BackendTD, "/ns/bench/sa/backend")
)

// Backend commands, the first byte a client sends after the handshake.
const (
	CmdSink = 'S' // read until EOF, then answer the count (8 bytes, big endian)
	CmdPing = 'P' // answer one byte ('p') and close
)

// WritePKI makes a root per trust domain and an SVID for each side, as PEM
// files in dir: <td>.bundle.pem, client.{crt,key}, backend.{crt,key}.
func WritePKI(dir string) error {
	for _, s := range []struct {
		td   spiffeid.TrustDomain
		id   spiffeid.ID
		name string
	}{{ClientTD, ClientID, "client"}, {BackendTD, BackendID, "backend"}} {
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

// ServerConfig is the backend's configuration from WritePKI's files in
// dir: it accepts only ClientID.
func ServerConfig(dir string) (*tls.Config, error) {
	return config(dir, true, "")
}

// ClientConfig is the client's configuration from WritePKI's files in
// dir, sending serverName as SNI: it accepts only BackendID.
func ClientConfig(dir, serverName string) (*tls.Config, error) {
	return config(dir, false, serverName)
}

func config(dir string, server bool, serverName string) (*tls.Config, error) {
	self, peerTD, peerID := "client", BackendTD, BackendID
	if server {
		self, peerTD, peerID = "backend", ClientTD, ClientID
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
		cfg.ServerName = serverName
	}
	cfg.MinVersion = tls.VersionTLS13
	cfg.CurvePreferences = []tls.CurveID{tls.X25519}
	return cfg, nil
}

// Dial connects to addr and completes the TLS handshake, each bounded
// (5 s to connect, 10 s to handshake) and by ctx.
func Dial(ctx context.Context, addr string, cfg *tls.Config) (*tls.Conn, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c := tls.Client(raw, cfg)
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := c.HandshakeContext(hctx); err != nil {
		_ = raw.Close()
		return nil, err
	}
	return c, nil
}

// Ping sends CmdPing on an established connection and reads the backend's
// answer, within d: proof that the backend itself accepted the client.
func Ping(c *tls.Conn, d time.Duration) error {
	_ = c.SetDeadline(time.Now().Add(d))
	if _, err := c.Write([]byte{CmdPing}); err != nil {
		return err
	}
	one := make([]byte, 1)
	if _, err := io.ReadFull(c, one); err != nil {
		return err
	}
	if one[0] != 'p' {
		return fmt.Errorf("backend answered %q to a ping", one[0])
	}
	return nil
}

// Run is the backend, run as a child process of a benchmark with the
// arguments after `backend`: --pki DIR (WritePKI's files) and --listen
// ADDR (default 127.0.0.1:0). It prints the address it listens on as its
// first line, then serves CmdSink and CmdPing until killed.
func Run(args []string) error {
	fs := flag.NewFlagSet("backend", flag.ExitOnError)
	pki := fs.String("pki", "", "directory of WritePKI's files")
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	_ = fs.Parse(args)
	cfg, err := ServerConfig(*pki)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	fmt.Println(ln.Addr().String())
	return Serve(ln, cfg)
}

// Serve answers CmdSink and CmdPing on every connection ln accepts, with
// the server configuration cfg, until ln is closed.
func Serve(ln net.Listener, cfg *tls.Config) error {
	for {
		c, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			// Out of file descriptors or the like: wait, go on.
			time.Sleep(5 * time.Millisecond)
			continue
		}
		go serve(tls.Server(c, cfg))
	}
}

func serve(c *tls.Conn) {
	defer c.Close()
	cmd := make([]byte, 1)
	if _, err := io.ReadFull(c, cmd); err != nil {
		return
	}
	switch cmd[0] {
	case CmdPing:
		_, _ = c.Write([]byte{'p'})
	case CmdSink:
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
