package identity

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/stretchr/testify/require"
)

// Established connections survive a rotation; new ones get the new
// certificates. Both ends use an identity.Source through go-spiffe's
// tlsconfig, which reads the Source at every handshake.
func TestMTLSAcrossRotation(t *testing.T) {
	// Real-time signer: the certificates meet real TLS verification.
	signer := newTestSigner(t, time.Now)
	ca := startTestCA(t, signer, nil)
	clk := newFakeClock()

	serverCfg := ca.config(t, clk)
	server := newSource(t, serverCfg)
	clientCfg := ca.config(t, clk)
	clientCfg.ServiceAccount = "client"
	clientCfg.TokenSource = func(context.Context) (string, error) { return "tok:demo:client", nil }
	client := newSource(t, clientCfg)

	// Echo server; reports the client certificate serial of each connection.
	lis, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(server, server, tlsconfig.AuthorizeMemberOf(testTD)))
	require.NoError(t, err)
	t.Cleanup(func() { _ = lis.Close() })
	clientSerials := make(chan *big.Int, 10)
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := c.(*tls.Conn)
				if tc.Handshake() != nil {
					return
				}
				clientSerials <- tc.ConnectionState().PeerCertificates[0].SerialNumber
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	dial := func() (*tls.Conn, *bufio.Reader) {
		c, err := tls.Dial("tcp", lis.Addr().String(), tlsconfig.MTLSClientConfig(client, client, tlsconfig.AuthorizeMemberOf(testTD)))
		require.NoError(t, err)
		t.Cleanup(func() { _ = c.Close() })
		return c, bufio.NewReader(c)
	}
	echo := func(c *tls.Conn, r *bufio.Reader, msg string) {
		t.Helper()
		require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
		_, err := c.Write([]byte(msg + "\n"))
		require.NoError(t, err)
		got, err := r.ReadString('\n')
		require.NoError(t, err)
		require.Equal(t, msg+"\n", got)
	}

	oldServer, err := server.GetX509SVID()
	require.NoError(t, err)
	oldClient, err := client.GetX509SVID()
	require.NoError(t, err)

	c1, r1 := dial()
	echo(c1, r1, "before rotation")
	require.Equal(t, oldServer.Certificates[0].SerialNumber, c1.ConnectionState().PeerCertificates[0].SerialNumber)
	require.Equal(t, oldClient.Certificates[0].SerialNumber, <-clientSerials)

	// Both renewal timers (one per Source), then past both half-lives.
	d1, d2 := clk.nextTimer(t), clk.nextTimer(t)
	clk.Advance(max(d1, d2))
	waitUpdated(t, server)
	waitUpdated(t, client)
	newServer, err := server.GetX509SVID()
	require.NoError(t, err)
	newClient, err := client.GetX509SVID()
	require.NoError(t, err)
	require.NotEqual(t, oldServer.Certificates[0].SerialNumber, newServer.Certificates[0].SerialNumber)
	require.NotEqual(t, oldClient.Certificates[0].SerialNumber, newClient.Certificates[0].SerialNumber)

	echo(c1, r1, "after rotation, same connection")
	require.Equal(t, oldServer.Certificates[0].SerialNumber, c1.ConnectionState().PeerCertificates[0].SerialNumber)

	c2, r2 := dial()
	echo(c2, r2, "new connection")
	require.Equal(t, newServer.Certificates[0].SerialNumber, c2.ConnectionState().PeerCertificates[0].SerialNumber,
		"the server presents its new certificate")
	require.Equal(t, newClient.Certificates[0].SerialNumber, <-clientSerials, "the client presents its new certificate")
	echo(c1, r1, "old connection still fine")
}

// A CA root rotation: the new root arrives in a response over the
// authenticated connection, is added to the bundle, and the old root stays.
func TestRootRotationAddsRoot(t *testing.T) {
	clk := newFakeClock()
	signer := newTestSigner(t, clk.Now)
	oldRoot := signer.rootCert
	ca := startTestCA(t, signer, nil)
	s := newSource(t, ca.config(t, clk))

	newRoot := signer.rotateRoot(t)
	clk.Advance(clk.nextTimer(t))
	waitUpdated(t, s)

	svid, err := s.GetX509SVID()
	require.NoError(t, err)
	require.NoError(t, svid.Certificates[0].CheckSignatureFrom(newRoot), "signed by the new root")
	b, err := s.GetX509BundleForTrustDomain(testTD)
	require.NoError(t, err)
	require.True(t, b.HasX509Authority(oldRoot), "old root kept")
	require.True(t, b.HasX509Authority(newRoot), "new root added")
	require.Len(t, b.X509Authorities(), 2)
}

// The bundle follows what the CA sends: a root it no longer sends (retired
// after a rotation) stops being trusted at the next renewal.
func TestBundleFollowsCA(t *testing.T) {
	clk := newFakeClock()
	signer := newTestSigner(t, clk.Now)
	ca := startTestCA(t, signer, nil)
	_, retired := newRoot(t, "retired root", clk.Now(), 24*time.Hour)
	cfg := ca.config(t, clk)
	cfg.RootsPEM = append(cfg.RootsPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: retired.Raw})...)
	s := newSource(t, cfg)

	b, err := s.GetX509BundleForTrustDomain(testTD)
	require.NoError(t, err)
	require.False(t, b.HasX509Authority(retired), "a root the CA does not send is dropped")
	require.True(t, b.HasX509Authority(signer.rootCert))
	require.Len(t, b.X509Authorities(), 1)
}

// Responses that do not check out are refused, and the current SVID stays.
func TestBadResponsesAreRefused(t *testing.T) {
	clk := newFakeClock()
	signer := newTestSigner(t, clk.Now)
	impostorKey, impostorRoot := newRoot(t, "impostor", clk.Now(), time.Hour)
	otherKey := newKey(t)

	// Each rewrites the real service's answer [leaf, root].
	tests := []struct {
		name    string
		tamper  func(chain []*x509.Certificate) ([]*x509.Certificate, error)
		wantErr string
	}{
		{
			name: "leaf by an unknown CA, root not sent",
			tamper: func(chain []*x509.Certificate) ([]*x509.Certificate, error) {
				leaf, err := issueLeaf(impostorRoot, impostorKey, chain[0].PublicKey, webID, clk.Now().Add(-time.Minute), clk.Now().Add(time.Hour))
				return []*x509.Certificate{leaf, chain[1]}, err
			},
			wantErr: "does not verify",
		},
		{
			name: "SVID for another workload",
			tamper: func(chain []*x509.Certificate) ([]*x509.Certificate, error) {
				leaf, err := issueLeaf(signer.rootCert, signer.rootKey, chain[0].PublicKey, federatorID, clk.Now().Add(-time.Minute), clk.Now().Add(time.Hour))
				return []*x509.Certificate{leaf, chain[1]}, err
			},
			wantErr: "CA issued spiffe://cluster-a.mesh/ns/isthmus-system/sa/isthmus-federator",
		},
		{
			name: "certificate for another key",
			tamper: func(chain []*x509.Certificate) ([]*x509.Certificate, error) {
				leaf, err := issueLeaf(signer.rootCert, signer.rootKey, otherKey.Public(), webID, clk.Now().Add(-time.Minute), clk.Now().Add(time.Hour))
				return []*x509.Certificate{leaf, chain[1]}, err
			},
			wantErr: "does not match private key",
		},
		{
			name: "expired certificate",
			tamper: func(chain []*x509.Certificate) ([]*x509.Certificate, error) {
				leaf, err := issueLeaf(signer.rootCert, signer.rootKey, chain[0].PublicKey, webID, clk.Now().Add(-2*time.Hour), clk.Now().Add(-time.Hour))
				return []*x509.Certificate{leaf, chain[1]}, err
			},
			wantErr: "expired",
		},
		{
			name:    "no root",
			tamper:  func(chain []*x509.Certificate) ([]*x509.Certificate, error) { return chain[:1], nil },
			wantErr: "no root",
		},
		{
			name:    "not PEM",
			tamper:  func([]*x509.Certificate) ([]*x509.Certificate, error) { return nil, errNotPEM },
			wantErr: "is not PEM certificates",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var tampering atomic.Bool
			ca := startTestCA(t, signer, func(elems []string) []string {
				if !tampering.Load() {
					return elems
				}
				var certs []*x509.Certificate
				for _, e := range elems {
					b, _ := pem.Decode([]byte(e))
					c, err := x509.ParseCertificate(b.Bytes)
					if err != nil {
						t.Errorf("tamper: %v", err)
						return elems
					}
					certs = append(certs, c)
				}
				tampered, err := tt.tamper(certs)
				if errors.Is(err, errNotPEM) {
					return []string{"junk"}
				}
				if err != nil {
					t.Errorf("tamper: %v", err)
					return elems
				}
				var out []string
				for _, c := range tampered {
					out = append(out, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})))
				}
				return out
			})
			sink := &logCapture{}
			cfg := ca.config(t, clk)
			cfg.Logger = sink.logger()
			s := newSource(t, cfg)
			held, err := s.GetX509SVID()
			require.NoError(t, err)
			heldBundle, err := s.GetX509BundleForTrustDomain(testTD)
			require.NoError(t, err)

			tampering.Store(true)
			clk.Advance(clk.nextTimer(t))
			require.Equal(t, initialBackoff, clk.nextTimer(t), "refused, retrying")
			got, err := s.GetX509SVID()
			require.NoError(t, err)
			require.Same(t, held, got, "current SVID kept")
			b, err := s.GetX509BundleForTrustDomain(testTD)
			require.NoError(t, err)
			require.True(t, heldBundle.Equal(b), "bundle unchanged")
			require.NotContains(t, b.X509Authorities(), impostorRoot)
			require.Contains(t, sink.String(), tt.wantErr)
		})
	}

	// The first SVID is refused the same way: New does not return one.
	t.Run("first SVID", func(t *testing.T) {
		ca := startTestCA(t, signer, func(elems []string) []string { return elems[:1] })
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		s, err := New(ctx, ca.config(t, nil))
		require.Nil(t, s)
		require.ErrorContains(t, err, "no root")
	})
}

// Close stops the renewal goroutine (even mid-request), and is idempotent.
func TestClose(t *testing.T) {
	clk := newFakeClock()
	signer := newTestSigner(t, clk.Now)
	ca := startTestCA(t, signer, nil)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	s, err := New(ctx, ca.config(t, clk))
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	// The goroutine may not have started yet (its stack then only shows
	// New's wrapper), so wait until it sets its first timer.
	wait := clk.nextTimer(t)
	require.True(t, goroutineRunning("identity.(*Source).renewLoop"))

	// Leave a renewal hanging on the CA, then close.
	ca.auth.setBlocking(true)
	clk.Advance(wait)
	require.Eventually(t, func() bool { return len(ca.auth.tokens()) == 2 }, 10*time.Second, 10*time.Millisecond)
	require.NoError(t, s.Close())
	require.NoError(t, s.Close(), "idempotent")
	// Close returned after the loop's last act (closing done); the
	// goroutine may still be on its way out of that deferred call.
	require.Eventually(t, func() bool { return !goroutineRunning("identity.(*Source).renewLoop") }, time.Second, time.Millisecond,
		"renewal goroutine gone once Close returns")

	_, err = s.GetX509SVID()
	require.ErrorIs(t, err, ErrClosed)
	_, err = s.GetX509BundleForTrustDomain(testTD)
	require.ErrorIs(t, err, ErrClosed)
}

func goroutineRunning(fn string) bool {
	buf := make([]byte, 1<<20)
	n := runtime.Stack(buf, true)
	for _, g := range strings.Split(string(buf[:n]), "\n\n") {
		if strings.Contains(g, fn) {
			return true
		}
	}
	return false
}

var errNotPEM = errors.New("send junk")

// logCapture keeps what a Source logs.
type logCapture struct {
	// mu guards buf.
	mu  sync.Mutex
	buf strings.Builder
}

func (l *logCapture) logger() *slog.Logger { return slog.New(slog.NewTextHandler(l, nil)) }

func (l *logCapture) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logCapture) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}
