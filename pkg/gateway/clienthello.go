package gateway

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"time"
)

// MaxClientHelloSize bounds the handshake message the gateway reads before
// routing (header included). A Go or OpenSSL ClientHello with a
// post-quantum key share is under 2 KiB; 16 KiB leaves room for large
// session tickets and many extensions and bounds what one unrouted
// connection costs.
const MaxClientHelloSize = 16 << 10

// peekBufferSize bounds the raw bytes (records with their headers) read
// before routing: a 16 KiB ClientHello split into records, or a small one
// followed by a client's early data.
const peekBufferSize = MaxClientHelloSize + 1<<10

const (
	recordTypeHandshake  = 22
	recordHeaderLen      = 5
	maxPlaintextRecord   = 1 << 14
	handshakeClientHello = 1
	extServerName        = 0
	sniHostName          = 0
)

// ClientHello is what the gateway reads from a TLS ClientHello.
type ClientHello struct {
	// ServerName is the SNI host_name, lowercased.
	ServerName string
}

// ParseClientHello parses the TLS records at the start of data, which must
// hold a whole ClientHello (possibly fragmented over at most
// MaxClientHelloRecords handshake records). It returns what it found and
// the length of the records that hold it. Errors wrap ErrNotTLS, ErrNoSNI,
// ErrTooLarge or ErrMalformed; a valid but short prefix returns an error
// for which errors.Is(err, io.ErrUnexpectedEOF) holds.
func ParseClientHello(data []byte) (ClientHello, int, error) {
	var p helloParser
	h, n, err := p.parse(data)
	if errors.Is(err, errIncomplete) {
		err = fmt.Errorf("%w: %w", errIncomplete, io.ErrUnexpectedEOF)
	}
	return h, n, err
}

// MaxClientHelloRecords bounds the handshake records a ClientHello may be
// split into. TLS stacks send one record below 16 KiB; a few clients split
// the ClientHello on purpose (to get past middleboxes) into a handful. A
// bound keeps a client that sends one byte per record from making the
// gateway do per-record work thousands of times for one connection.
const MaxClientHelloRecords = 64

// helloParser reassembles a ClientHello from handshake records as they
// arrive. Each parse call takes the bytes read so far (the previous call's
// data extended, never changed) and resumes where the previous call
// stopped: a record is taken once whole and its fragment copied once, so
// a client trickling its ClientHello costs work in proportion to its
// bytes, not to their square or cube. The zero value is ready.
type helloParser struct {
	// pos is the offset of the first record not yet taken.
	pos int
	// records counts the records taken.
	records int
	// msg is the handshake message gathered from the records taken, when
	// it spans several; the parser owns it. Empty when it sits whole in
	// the first record, which is then parsed in place.
	msg []byte
	// msgLen is the whole message's length, header included, once its
	// handshake header has been seen; 0 before.
	msgLen int
}

// parse continues with data (see helloParser) and returns what
// ParseClientHello returns, errIncomplete for a valid prefix.
func (p *helloParser) parse(data []byte) (ClientHello, int, error) {
	if len(data) > 0 && data[0] != recordTypeHandshake {
		return ClientHello{}, 0, fmt.Errorf("%w: first byte %#x", ErrNotTLS, data[0])
	}
	if len(data) > 1 && data[1] != 3 {
		return ClientHello{}, 0, fmt.Errorf("%w: record version major %d", ErrNotTLS, data[1])
	}
	for {
		if len(data)-p.pos < recordHeaderLen {
			return ClientHello{}, 0, errIncomplete
		}
		hdr := data[p.pos : p.pos+recordHeaderLen]
		if hdr[0] != recordTypeHandshake || hdr[1] != 3 {
			return ClientHello{}, 0, fmt.Errorf("%w: record of type %d version %d.%d amid the ClientHello", ErrMalformed, hdr[0], hdr[1], hdr[2])
		}
		rlen := int(hdr[3])<<8 | int(hdr[4])
		if rlen == 0 || rlen > maxPlaintextRecord {
			return ClientHello{}, 0, fmt.Errorf("%w: record length %d", ErrMalformed, rlen)
		}
		if p.records == MaxClientHelloRecords {
			return ClientHello{}, 0, fmt.Errorf("%w: more than %d records", ErrTooLarge, MaxClientHelloRecords)
		}
		start := p.pos + recordHeaderLen
		frag := data[start:min(start+rlen, len(data))]
		// The handshake header tells how long the message is: refuse a
		// wrong type or a huge length before reading it all.
		if p.msgLen == 0 {
			var h [4]byte
			k := copy(h[:], p.msg)
			if k += copy(h[k:], frag); k == len(h) {
				if h[0] != handshakeClientHello {
					return ClientHello{}, 0, fmt.Errorf("%w: handshake message type %d, not ClientHello", ErrMalformed, h[0])
				}
				mlen := 4 + (int(h[1])<<16 | int(h[2])<<8 | int(h[3]))
				if mlen > MaxClientHelloSize {
					return ClientHello{}, 0, fmt.Errorf("%w: %d bytes", ErrTooLarge, mlen)
				}
				p.msgLen = mlen
			}
		}
		if len(frag) < rlen {
			return ClientHello{}, 0, errIncomplete // take the record once whole
		}
		p.records++
		p.pos = start + rlen
		if p.records == 1 && p.msgLen > 0 && len(frag) >= p.msgLen {
			// Whole in the first record, as TLS stacks send it: no copy.
			return p.finish(frag[4:p.msgLen])
		}
		if p.msgLen > 0 {
			// Grow once to the message's length, and copy no byte past
			// it (the rest of the last record is not the ClientHello's).
			if cap(p.msg) < p.msgLen {
				p.msg = slices.Grow(p.msg, p.msgLen-len(p.msg))
			}
			frag = frag[:min(len(frag), p.msgLen-len(p.msg))]
		}
		p.msg = append(p.msg, frag...) // without msgLen, under 4 bytes
		if p.msgLen > 0 && len(p.msg) == p.msgLen {
			return p.finish(p.msg[4:])
		}
	}
}

func (p *helloParser) finish(body []byte) (ClientHello, int, error) {
	h, err := parseHelloBody(body)
	if err != nil {
		return ClientHello{}, 0, err
	}
	return h, p.pos, nil
}

// parseHelloBody reads a ClientHello body (RFC 8446 4.1.2, RFC 5246 7.4.1.2)
// up to its server_name extension (RFC 6066 3).
func parseHelloBody(b []byte) (ClientHello, error) {
	r := reader(b)
	var sessionID, suites, compression, exts []byte
	if !r.skip(2+32) || // legacy_version, random
		!r.vec8(&sessionID) || len(sessionID) > 32 ||
		!r.vec16(&suites) || len(suites) < 2 || len(suites)%2 != 0 ||
		!r.vec8(&compression) || len(compression) < 1 {
		return ClientHello{}, fmt.Errorf("%w: bad fixed fields", ErrMalformed)
	}
	if len(r) == 0 {
		return ClientHello{}, fmt.Errorf("%w: no extensions", ErrNoSNI)
	}
	if !r.vec16(&exts) || len(r) != 0 {
		return ClientHello{}, fmt.Errorf("%w: bad extensions block", ErrMalformed)
	}
	var name []byte
	seen := false
	for e := reader(exts); len(e) > 0; {
		var typ uint16
		var body []byte
		if !e.u16(&typ) || !e.vec16(&body) {
			return ClientHello{}, fmt.Errorf("%w: truncated extension", ErrMalformed)
		}
		if typ != extServerName {
			continue
		}
		if seen {
			return ClientHello{}, fmt.Errorf("%w: two server_name extensions", ErrMalformed)
		}
		seen = true
		s := reader(body)
		var list []byte
		if !s.vec16(&list) || len(s) != 0 || len(list) == 0 {
			return ClientHello{}, fmt.Errorf("%w: bad server_name list", ErrMalformed)
		}
		for l := reader(list); len(l) > 0; {
			var nameType uint8
			var n []byte
			if !l.u8(&nameType) || !l.vec16(&n) {
				return ClientHello{}, fmt.Errorf("%w: truncated server_name entry", ErrMalformed)
			}
			if nameType != sniHostName {
				continue
			}
			if name != nil {
				return ClientHello{}, fmt.Errorf("%w: two host_names", ErrMalformed)
			}
			if err := validServerName(n); err != nil {
				return ClientHello{}, fmt.Errorf("%w: %w", ErrMalformed, err)
			}
			name = n
		}
	}
	if name == nil {
		return ClientHello{}, ErrNoSNI
	}
	sni := string(name)
	if hasUpper(sni) {
		sni = strings.ToLower(sni)
	}
	return ClientHello{ServerName: sni}, nil
}

// reader is a byte cursor in the manner of cryptobyte.String: each method
// advances it and reports whether there were enough bytes.
type reader []byte

func (r *reader) skip(n int) bool {
	if len(*r) < n {
		return false
	}
	*r = (*r)[n:]
	return true
}

func (r *reader) u8(v *uint8) bool {
	if len(*r) < 1 {
		return false
	}
	*v = (*r)[0]
	*r = (*r)[1:]
	return true
}

func (r *reader) u16(v *uint16) bool {
	if len(*r) < 2 {
		return false
	}
	*v = uint16((*r)[0])<<8 | uint16((*r)[1])
	*r = (*r)[2:]
	return true
}

func (r *reader) vec8(v *[]byte) bool {
	var n uint8
	if !r.u8(&n) || len(*r) < int(n) {
		return false
	}
	*v, *r = (*r)[:n], (*r)[n:]
	return true
}

func (r *reader) vec16(v *[]byte) bool {
	var n uint16
	if !r.u16(&n) || len(*r) < int(n) {
		return false
	}
	*v, *r = (*r)[:n], (*r)[n:]
	return true
}

// readClientHello reads from c into buf until it holds a whole ClientHello
// or deadline passes. It returns the ClientHello and how many bytes of buf
// were read: all of them must be replayed to the upstream, as they may
// include bytes past the ClientHello. c's read deadline is cleared on
// success.
func readClientHello(c net.Conn, buf []byte, deadline time.Time) (ClientHello, int, error) {
	if err := c.SetReadDeadline(deadline); err != nil {
		return ClientHello{}, 0, err
	}
	var p helloParser // resumes where the previous read's bytes ended
	n := 0
	for {
		m, rerr := c.Read(buf[n:])
		n += m
		h, _, err := p.parse(buf[:n])
		switch {
		case err == nil:
			return h, n, c.SetReadDeadline(time.Time{})
		case !errors.Is(err, errIncomplete):
			return ClientHello{}, n, err
		case rerr != nil:
			if errors.Is(rerr, os.ErrDeadlineExceeded) {
				return ClientHello{}, n, fmt.Errorf("%w after %d bytes", ErrClientHelloTimeout, n)
			}
			return ClientHello{}, n, fmt.Errorf("%w after %d bytes: %w", ErrClosedEarly, n, rerr)
		case n == len(buf):
			return ClientHello{}, n, fmt.Errorf("%w: more than %d bytes of records", ErrTooLarge, len(buf))
		}
	}
}
