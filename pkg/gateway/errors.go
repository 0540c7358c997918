package gateway

import "errors"

// Errors of the ClientHello peeker. Each is a reason the gateway refuses a
// connection; errors.Is tells them apart (they are wrapped with detail).
var (
	// ErrNotTLS: the first bytes are not a TLS handshake record (plain
	// HTTP, SSLv2, anything else). Refused with a plain close.
	ErrNotTLS = errors.New("not a TLS handshake")
	// ErrNoSNI: a well-formed ClientHello without a host_name. Refused
	// with the TLS alert unrecognized_name.
	ErrNoSNI = errors.New("ClientHello has no server name")
	// ErrTooLarge: the ClientHello is longer than MaxClientHelloSize, or
	// split over more than MaxClientHelloRecords records. Refused with the
	// TLS alert handshake_failure.
	ErrTooLarge = errors.New("ClientHello too large")
	// ErrMalformed: TLS records that do not hold a valid ClientHello.
	// Refused with the TLS alert decode_error.
	ErrMalformed = errors.New("malformed ClientHello")
	// ErrClientHelloTimeout: the ClientHello did not arrive within
	// Config.ClientHelloTimeout. Refused with a plain close.
	ErrClientHelloTimeout = errors.New("timed out waiting for the ClientHello")

	// ErrClosedEarly: the client closed (or reset) the connection before
	// a whole ClientHello arrived, as TCP health checks and port scanners
	// do.
	ErrClosedEarly = errors.New("connection closed before a whole ClientHello")

	// errIncomplete: the bytes so far are a valid prefix; read more.
	errIncomplete = errors.New("incomplete ClientHello")
)
