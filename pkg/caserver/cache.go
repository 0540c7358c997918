package caserver

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math"
	"strings"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"golang.org/x/sync/singleflight"
)

// Defaults of CacheOptions.
const (
	// DefaultCacheTTL is how long an accepted token is remembered. A
	// revoked token (its Pod deleted) is thus accepted for at most this
	// long after the revocation; the API server's own webhook token cache
	// keeps answers for two minutes.
	DefaultCacheTTL = time.Minute
	// DefaultNegativeCacheTTL is how long a refused token is remembered:
	// long enough that a caller repeating a junk token costs one
	// TokenReview every few seconds, short enough that a workload whose
	// token was refused by mistake is not held up for long.
	DefaultNegativeCacheTTL = 5 * time.Second
	// DefaultCacheSize bounds the acceptances remembered, and apart from
	// them the refusals. An entry is about 100 bytes.
	DefaultCacheSize = 4096
	// reviewTimeout bounds one review that several callers wait for.
	reviewTimeout = 30 * time.Second
)

// CacheOptions are the optional knobs of a CachingAuthenticator. The zero
// value is usable.
type CacheOptions struct {
	// TTL is how long an accepted token is remembered, cut to the token's
	// expiry when it is a JWT with an "exp" claim. Zero means
	// DefaultCacheTTL; negative remembers no acceptance.
	TTL time.Duration
	// NegativeTTL is how long a refused token is remembered. Zero means
	// DefaultNegativeCacheTTL; negative remembers no refusal.
	NegativeTTL time.Duration
	// Size bounds the acceptances remembered, and apart from them the
	// refusals, the least recently used leaving first: a flood of junk
	// tokens evicts only refusals. Zero or less means DefaultCacheSize.
	Size int
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// CachingAuthenticator remembers another Authenticator's answers for a
// short time, keyed by the SHA-256 of the token (the token itself is never
// kept), and makes callers that present the same token at the same time
// share one review. A workload renewing with the same token, or a caller
// repeating a junk one, then costs at most one review per token and TTL.
// Answers that are neither an acceptance nor a refusal (the API server
// could not decide) are not remembered. Acceptances and refusals are
// kept apart, so that anyone able to reach the port, who can make up
// tokens without end, evicts only refusals; an acceptance takes a token
// the API server accepted.
type CachingAuthenticator struct {
	inner             Authenticator
	ttl, negTTL       time.Duration
	now               func() time.Time
	accepted, refused *lru.Cache[[sha256.Size]byte, cachedAnswer]
	inflight          singleflight.Group
}

var _ Authenticator = (*CachingAuthenticator)(nil)

type cachedAnswer struct {
	caller  Caller
	err     error // a refusal, wrapping ErrUnauthenticated; nil for an acceptance
	expires time.Time
}

// NewCachingAuthenticator returns an Authenticator that asks inner and
// remembers its answers as opts say.
func NewCachingAuthenticator(inner Authenticator, opts CacheOptions) *CachingAuthenticator {
	c := &CachingAuthenticator{inner: inner, ttl: opts.TTL, negTTL: opts.NegativeTTL, now: opts.Now}
	if c.ttl == 0 {
		c.ttl = DefaultCacheTTL
	}
	if c.negTTL == 0 {
		c.negTTL = DefaultNegativeCacheTTL
	}
	if c.now == nil {
		c.now = time.Now
	}
	size := opts.Size
	if size <= 0 {
		size = DefaultCacheSize
	}
	// lru.New fails only for a size below one.
	c.accepted, _ = lru.New[[sha256.Size]byte, cachedAnswer](size)
	c.refused, _ = lru.New[[sha256.Size]byte, cachedAnswer](size)
	return c
}

// Authenticate implements Authenticator.
func (c *CachingAuthenticator) Authenticate(ctx context.Context, token string) (Caller, error) {
	key := sha256.Sum256([]byte(token))
	if a, ok := c.lookup(key); ok {
		return a.caller, a.err
	}
	// The review runs on its own context so that one impatient caller does
	// not fail the others waiting for the same answer.
	ch := c.inflight.DoChan(string(key[:]), func() (any, error) {
		// A review that ended between the lookup above and now has left
		// its answer here.
		if a, ok := c.lookup(key); ok {
			return a.caller, a.err
		}
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), reviewTimeout)
		defer cancel()
		caller, err := c.inner.Authenticate(rctx, token)
		c.remember(key, token, caller, err)
		return caller, err
	})
	select {
	case <-ctx.Done():
		return Caller{}, ctx.Err()
	case r := <-ch:
		caller, _ := r.Val.(Caller)
		return caller, r.Err
	}
}

// lookup returns the answer remembered for key, if it is still current.
func (c *CachingAuthenticator) lookup(key [sha256.Size]byte) (cachedAnswer, bool) {
	for _, cache := range []*lru.Cache[[sha256.Size]byte, cachedAnswer]{c.accepted, c.refused} {
		a, ok := cache.Get(key)
		if !ok {
			continue
		}
		if !c.now().Before(a.expires) {
			cache.Remove(key)
			return cachedAnswer{}, false
		}
		return a, true
	}
	return cachedAnswer{}, false
}

func (c *CachingAuthenticator) remember(key [sha256.Size]byte, token string, caller Caller, err error) {
	now := c.now()
	var expires time.Time
	switch {
	case err == nil && c.ttl > 0:
		expires = now.Add(c.ttl)
		if exp, ok := tokenExpiry(token); ok && exp.Before(expires) {
			expires = exp
		}
	case errors.Is(err, ErrUnauthenticated) && c.negTTL > 0:
		expires = now.Add(c.negTTL)
	default:
		return
	}
	if !now.Before(expires) {
		return
	}
	if err == nil {
		c.accepted.Add(key, cachedAnswer{caller: caller, expires: expires})
		return
	}
	c.refused.Add(key, cachedAnswer{err: err, expires: expires})
}

// maxClaimsBytes bounds the JWT payload tokenExpiry decodes.
const maxClaimsBytes = 8 << 10

// tokenExpiry reads the "exp" claim of a JWT without verifying anything:
// it only ever shortens how long an answer about the token is remembered,
// and the answer came from an authenticator that checked the signature.
func tokenExpiry(token string) (time.Time, bool) {
	_, rest, ok := strings.Cut(token, ".")
	if !ok {
		return time.Time{}, false
	}
	payload, _, ok := strings.Cut(rest, ".")
	if !ok || base64.RawURLEncoding.DecodedLen(len(payload)) > maxClaimsBytes {
		return time.Time{}, false
	}
	raw, err := base64.RawURLEncoding.DecodeString(payload)
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp *float64 `json:"exp"`
	}
	if err := json.Unmarshal(raw, &claims); err != nil || claims.Exp == nil {
		return time.Time{}, false
	}
	exp := *claims.Exp
	if math.IsNaN(exp) || exp < 0 || exp > 1<<40 {
		return time.Time{}, false
	}
	sec, frac := math.Modf(exp)
	return time.Unix(int64(sec), int64(frac*1e9)), true
}
