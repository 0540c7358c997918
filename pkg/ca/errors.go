package ca

import "errors"

// Errors a Signer wraps, so that callers can tell bad requests from bad
// callers and from their own faults.
var (
	// ErrInvalidCSR: the CSR cannot be used (not a CSR, bad signature,
	// unsupported key type or size, extra SANs). Not retryable.
	ErrInvalidCSR = errors.New("invalid certificate signing request")
	// ErrIdentityMismatch: the CSR asks for an identity other than the
	// caller's. Not retryable.
	ErrIdentityMismatch = errors.New("requested identity does not match the caller")
	// ErrInvalidCA: the CA material (a plugged-in cacerts Secret, or a
	// stored root) is unusable; the message names what is wrong.
	ErrInvalidCA = errors.New("invalid CA material")
)
