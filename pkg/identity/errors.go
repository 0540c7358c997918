package identity

import "errors"

var (
	// ErrClosed is returned by a Source after Close.
	ErrClosed = errors.New("identity source is closed")
	// ErrExpired is returned by GetX509SVID once the held SVID has expired
	// and no renewal has succeeded: a handshake fails clearly here rather
	// than with the peer's "certificate expired".
	ErrExpired = errors.New("SVID has expired")
)
