package caserver

import "errors"

// ErrUnauthenticated marks an Authenticator's refusal of a token (forged,
// expired, wrong audience, not a ServiceAccount, ...). Any other error from
// an Authenticator means it could not decide, and the request fails as
// Unavailable so that the caller retries.
var ErrUnauthenticated = errors.New("unauthenticated")
