package identity

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestNewHoldsSVID(t *testing.T) {
	signer := newTestSigner(t, time.Now)
	ca := startTestCA(t, signer, nil)
	cfg := ca.config(t, nil)
	cfg.TTL = 10 * time.Minute

	s := newSource(t, cfg)

	svid, err := s.GetX509SVID()
	require.NoError(t, err)
	require.Equal(t, "spiffe://cluster-a.mesh/ns/demo/sa/web", svid.ID.String())
	require.Len(t, svid.Certificates, 1, "the SVID is leaf and intermediates, no root")
	leaf := svid.Certificates[0]
	require.Equal(t, 10*time.Minute, leaf.NotAfter.Sub(leaf.NotBefore))
	key, ok := svid.PrivateKey.(*ecdsa.PrivateKey)
	require.True(t, ok, "ECDSA key, got %T", svid.PrivateKey)
	require.Equal(t, elliptic.P256(), key.Curve)
	require.True(t, key.PublicKey.Equal(leaf.PublicKey))

	bundle, err := s.GetX509BundleForTrustDomain(testTD)
	require.NoError(t, err)
	require.True(t, bundle.HasX509Authority(signer.rootCert))
	id, _, err := x509svid.Verify(svid.Certificates, s)
	require.NoError(t, err)
	require.Equal(t, webID, id)

	_, err = s.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("cluster-b.mesh"))
	require.ErrorContains(t, err, "no bundle for trust domain")

	require.Equal(t, []string{"tok:demo:web"}, ca.auth.tokens())
}

// The token file is read at every request: kubelet rotates it.
func TestTokenFileIsReadEachTime(t *testing.T) {
	clk := newFakeClock()
	signer := newTestSigner(t, clk.Now)
	ca := startTestCA(t, signer, nil)
	tokenFile := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(tokenFile, []byte("tok:demo:web#1\n"), 0o600))
	cfg := ca.config(t, clk)
	cfg.TokenSource = nil
	cfg.TokenFile = tokenFile
	s := newSource(t, cfg)

	// kubelet replaces the token.
	require.NoError(t, os.WriteFile(tokenFile, []byte("tok:demo:web#2\n"), 0o600))
	clk.Advance(clk.nextTimer(t))
	waitUpdated(t, s)
	require.Equal(t, []string{"tok:demo:web#1", "tok:demo:web#2"}, ca.auth.tokens())

	// A missing token is a failed renewal, retried; the SVID stays.
	require.NoError(t, os.Remove(tokenFile))
	clk.Advance(clk.nextTimer(t))
	require.Equal(t, initialBackoff, clk.nextTimer(t))
	require.Len(t, ca.auth.tokens(), 2, "nothing sent without a token")
	_, err := s.GetX509SVID()
	require.NoError(t, err)
}

func TestNewRefuses(t *testing.T) {
	signer := newTestSigner(t, time.Now)
	ca := startTestCA(t, signer, nil)
	otherSigner := newTestSigner(t, time.Now)

	tests := []struct {
		name    string
		mutate  func(*Config)
		wantErr []string
		code    codes.Code // if set, status.Code of the error
	}{
		{
			name:    "token of another ServiceAccount: no retry",
			mutate:  func(c *Config) { c.TokenSource = func(context.Context) (string, error) { return "tok:demo:db", nil } },
			wantErr: []string{"PermissionDenied", "ns/demo/sa/web", "ns/demo/sa/db"},
			code:    codes.PermissionDenied,
		},
		{
			name:    "refused token: retried until ctx ends",
			mutate:  func(c *Config) { c.TokenSource = func(context.Context) (string, error) { return "forged", nil } },
			wantErr: []string{"deadline exceeded", "Unauthenticated", "not authenticated"},
		},
		{
			name: "token source fails",
			mutate: func(c *Config) {
				c.TokenSource = func(context.Context) (string, error) { return "", errors.New("no token yet") }
			},
			wantErr: []string{"deadline exceeded", "no token yet"},
		},
		{
			name:    "CA presents another ID than expected",
			mutate:  func(c *Config) { c.CAID = spiffeid.RequireFromPath(testTD, "/ns/kube-system/sa/not-the-ca") },
			wantErr: []string{"deadline exceeded", "unexpected ID"},
		},
		{
			name:    "CA not signed by the configured roots",
			mutate:  func(c *Config) { c.RootsPEM = otherSigner.rootsPEM() },
			wantErr: []string{"deadline exceeded", "certificate signed by unknown authority"},
		},
		{
			name:    "no CA listening",
			mutate:  func(c *Config) { c.CAAddress = "127.0.0.1:1" },
			wantErr: []string{"deadline exceeded", "Unavailable"},
		},
		{
			name: "invalid config: every problem at once",
			mutate: func(c *Config) {
				*c = Config{CAID: spiffeid.RequireFromString("spiffe://other.mesh/ca"), TrustDomain: testTD,
					RootsPEM: []byte("junk"), Namespace: "demo", TokenFile: "/x", TokenSource: c.TokenSource, TTL: -1}
			},
			wantErr: []string{"CAAddress is empty", "not in trust domain", "RootsPEM", "namespace and ServiceAccount", "exclusive", "TTL"},
		},
		{
			// Sent in whole seconds, it would be 0: the CA's default.
			name:    "TTL under a second",
			mutate:  func(c *Config) { c.TTL = 500 * time.Millisecond },
			wantErr: []string{"TTL is 500ms, want 0 (CA default) or a second or more"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := ca.config(t, nil)
			tt.mutate(&cfg)
			ctx, cancel := context.WithTimeout(t.Context(), 1500*time.Millisecond)
			defer cancel()
			s, err := New(ctx, cfg)
			require.Error(t, err)
			require.Nil(t, s)
			for _, w := range tt.wantErr {
				require.ErrorContains(t, err, w)
			}
			if tt.code != codes.OK {
				require.Equal(t, tt.code, status.Code(err))
				require.NoError(t, ctx.Err(), "failed at once, without waiting for ctx")
			}
		})
	}
}

// New keeps trying while the CA is not up yet, and succeeds once it is.
func TestNewWaitsForCA(t *testing.T) {
	signer := newTestSigner(t, time.Now)
	ca := startTestCA(t, signer, nil)
	signer.setErr(errSignerDown)
	clk := newFakeClock()

	type result struct {
		s   *Source
		err error
	}
	done := make(chan result, 1)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	go func() {
		s, err := New(ctx, ca.config(t, clk))
		done <- result{s, err}
	}()
	require.Equal(t, initialBackoff, clk.nextTimer(t))
	clk.Advance(initialBackoff)
	require.Equal(t, 2*initialBackoff, clk.nextTimer(t))
	signer.setErr(nil)
	clk.Advance(2 * initialBackoff)
	r := <-done
	require.NoError(t, r.err)
	t.Cleanup(func() { _ = r.s.Close() })
	svid, err := r.s.GetX509SVID()
	require.NoError(t, err)
	require.Equal(t, webID, svid.ID)
}

func TestRenewsAtHalfLife(t *testing.T) {
	clk := newFakeClock()
	signer := newTestSigner(t, clk.Now)
	ca := startTestCA(t, signer, nil)
	start := clk.Now()
	s := newSource(t, ca.config(t, clk))
	first, err := s.GetX509SVID()
	require.NoError(t, err)
	leaf := first.Certificates[0]
	life := leaf.NotAfter.Sub(leaf.NotBefore)

	wait := clk.nextTimer(t)
	at := start.Add(wait)
	require.False(t, at.Before(leaf.NotBefore.Add(life*45/100)), "renewal at %s, before 45%% of life", at)
	require.False(t, at.After(leaf.NotBefore.Add(life*55/100)), "renewal at %s, after 55%% of life", at)

	clk.Advance(wait - time.Second)
	select {
	case <-s.Updated():
		t.Fatal("renewed early")
	case <-time.After(50 * time.Millisecond):
	}
	clk.Advance(time.Second)
	waitUpdated(t, s)
	second, err := s.GetX509SVID()
	require.NoError(t, err)
	require.NotEqual(t, first.Certificates[0].SerialNumber, second.Certificates[0].SerialNumber)
	require.False(t, first.PrivateKey.(*ecdsa.PrivateKey).Equal(second.PrivateKey), "a new key for each SVID")
	require.Len(t, ca.auth.tokens(), 2)

	// And again, from the new SVID.
	clk.Advance(clk.nextTimer(t))
	waitUpdated(t, s)
	third, err := s.GetX509SVID()
	require.NoError(t, err)
	require.NotEqual(t, second.Certificates[0].SerialNumber, third.Certificates[0].SerialNumber)
}

// While the CA refuses, the Source retries with exponential backoff and
// keeps serving the current SVID until it expires.
func TestRenewalFailureBackoff(t *testing.T) {
	clk := newFakeClock()
	signer := newTestSigner(t, clk.Now)
	ca := startTestCA(t, signer, nil)
	cfg := ca.config(t, clk)
	cfg.TTL = 5 * time.Minute
	s := newSource(t, cfg)
	held, err := s.GetX509SVID()
	require.NoError(t, err)

	signer.setErr(errSignerDown)
	clk.Advance(clk.nextTimer(t))
	var waits []time.Duration
	for range 8 {
		d := clk.nextTimer(t)
		waits = append(waits, d)
		got, err := s.GetX509SVID()
		if clk.Now().Before(held.Certificates[0].NotAfter) {
			require.NoError(t, err, "the current SVID is served while it is valid")
			require.Same(t, held, got)
		}
		clk.Advance(d)
	}
	require.Equal(t, []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second,
		16 * time.Second, 32 * time.Second, time.Minute, time.Minute}, waits)

	// The SVID (NotAfter = start + 4 min; renewal began at half of those
	// 4 min, and 8 tries took 3 more) has now expired: handshakes would
	// fail on our side with a clear error.
	_, err = s.GetX509SVID()
	require.ErrorIs(t, err, ErrExpired)

	signer.setErr(nil)
	clk.Advance(clk.nextTimer(t))
	waitUpdated(t, s)
	got, err := s.GetX509SVID()
	require.NoError(t, err)
	require.NotEqual(t, held.Certificates[0].SerialNumber, got.Certificates[0].SerialNumber)
	// Back to the normal rhythm: half of the 4 min the SVID has left as it
	// comes (5 min from a NotBefore 1 min ago), ±10 % (and up to 1 s
	// less: certificates keep whole seconds).
	d := clk.nextTimer(t)
	require.GreaterOrEqual(t, d, 107*time.Second)
	require.LessOrEqual(t, d, 132*time.Second)
}

// Workloads that lost the CA together must not retry together: each retry
// waits its backoff step ±20 %, never more than the cap, drawn from the
// Source's random source.
func TestRetriesAreJittered(t *testing.T) {
	signer := newTestSigner(t, time.Now)
	ca := startTestCA(t, signer, nil)
	signer.setErr(errSignerDown)
	nominal := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second,
		16 * time.Second, 32 * time.Second, time.Minute, time.Minute}

	// firstWaits starts a Source while the CA is down and returns the
	// waits between its attempts at a first SVID.
	firstWaits := func(random func() float64) []time.Duration {
		clk := newFakeClock()
		cfg := ca.config(t, clk)
		cfg.random = random
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() {
			s, err := New(ctx, cfg)
			if err == nil {
				_ = s.Close()
			}
			done <- err
		}()
		var waits []time.Duration
		for range nominal {
			d := clk.nextTimer(t)
			waits = append(waits, d)
			clk.Advance(d)
		}
		cancel()
		require.Error(t, <-done)
		return waits
	}

	low := firstWaits(func() float64 { return 0 })
	high := firstWaits(func() float64 { return 0.999 })
	for i, step := range nominal {
		require.Equal(t, step*8/10, low[i], "attempt %d: 80 %% of %s", i+1, step)
		require.InDelta(t, float64(min(time.Duration(float64(step)*1.1996), time.Minute)), float64(high[i]), float64(time.Microsecond), "attempt %d", i+1)
		require.NotEqual(t, low[i], high[i], "attempt %d: two workloads retry at different times", i+1)
	}

	// With the real random source: within the bounds, and not the bare
	// steps in lockstep.
	a, b := firstWaits(nil), firstWaits(nil)
	require.NotEqual(t, a, b, "two workloads' retries differ")
	for _, waits := range [][]time.Duration{a, b} {
		require.NotEqual(t, nominal, waits)
		for i, step := range nominal {
			require.GreaterOrEqual(t, waits[i], step*8/10, "attempt %d", i+1)
			require.LessOrEqual(t, waits[i], min(step*12/10, maxBackoff), "attempt %d", i+1)
		}
	}
}

// Failed renewals are retried with the same jitter.
func TestRenewalRetriesAreJittered(t *testing.T) {
	clk := newFakeClock()
	signer := newTestSigner(t, clk.Now)
	ca := startTestCA(t, signer, nil)
	cfg := ca.config(t, clk)
	cfg.random = func() float64 { return 0 }
	newSource(t, cfg)

	signer.setErr(errSignerDown)
	clk.Advance(clk.nextTimer(t))
	for _, want := range []time.Duration{800 * time.Millisecond, 1600 * time.Millisecond, 3200 * time.Millisecond} {
		d := clk.nextTimer(t)
		require.Equal(t, want, d)
		clk.Advance(d)
	}
}

// A TTL so short that the CA's one-minute backdating puts an SVID's
// half-life (counted from NotBefore) before it even arrives: renewal is
// still at half of what is left, and never after expiry. It was taken
// for clock skew and backed off past the SVID's end.
func TestShortTTLIsRenewedBeforeItExpires(t *testing.T) {
	clk := newFakeClock()
	signer := newTestSigner(t, clk.Now)
	ca := startTestCA(t, signer, nil)
	cfg := ca.config(t, clk)
	cfg.TTL = 90 * time.Second // 30 s left as it comes
	s := newSource(t, cfg)
	for round := range 5 {
		held, err := s.GetX509SVID()
		require.NoError(t, err)
		d := clk.nextTimer(t)
		left := held.Certificates[0].NotAfter.Sub(clk.Now())
		require.Less(t, d, left, "round %d: renewal in %s, the SVID ends in %s", round, d, left)
		require.Greater(t, d, left/3, "round %d: about half of what is left", round)
		clk.Advance(d)
		waitUpdated(t, s)
	}
}
