package sidecar

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// headerReader reads a connection's frames as http2.Framer does with
// ReadMetaHeaders set: a HEADERS frame and its CONTINUATION frames come
// out as one *http2.MetaHeadersFrame of decoded, checked fields, with the
// same errors (a stream error for a malformed field or pseudo-header
// set, a connection error for a broken compression state or a block far
// over the limit). It does the decoding itself for what the Framer's
// costs per block: a fresh closure, and a Fields slice grown from nil
// (1, 2, 4, 8 fields...), about 1 KB a block, which was half of what a
// sidecar allocated per HTTP/2 request and so half of its garbage
// collections. Here the emit function is made once, and every block's
// fields are cut from a per-connection slab, each block's slice capped
// at its own length, so the slices a stream keeps (its request fields
// until the upstream stream opens, trailers) are never written again.
// A slab holds its fields' strings as long as anything holds the slab,
// so the reader lets go of a slab once its fields add up to
// slabRetainBytes: an idle connection keeps at most about that much of
// the headers it was sent, not a whole slab of large values.
type headerReader struct {
	fr  *http2.Framer
	dec *hpack.Decoder
	max uint32 // the header list limit (the Framer's MaxHeaderListSize)

	// The block being decoded: its fields are slab[start:].
	slab                      []hpack.HeaderField
	start                     int
	slabBytes, blockBytes     uint32 // HPACK sizes of the slab's fields, of the block's
	headersLeft, trailersLeft uint32
	sawRegular, truncated     bool
	invalid                   error
}

// slabFields is the size of a fresh slab, in fields: a request's block
// has about eight, a response's three or four. slabRetainBytes is what
// its fields may add up to (HPACK sizes: name, value and 32) before the
// reader starts a fresh one.
const (
	slabFields      = 64
	slabRetainBytes = 16 << 10
)

func newHeaderReader(fr *http2.Framer, maxList uint32) *headerReader {
	r := &headerReader{fr: fr, max: maxList}
	r.dec = hpack.NewDecoder(4096, r.emit)
	r.dec.SetMaxStringLength(int(maxList))
	return r
}

// ReadFrame is http2.Framer.ReadFrame with ReadMetaHeaders.
func (r *headerReader) ReadFrame() (http2.Frame, error) {
	f, err := r.fr.ReadFrame()
	if err != nil {
		return nil, err
	}
	if hf, ok := f.(*http2.HeadersFrame); ok {
		return r.readBlock(hf)
	}
	return f, nil
}

// readBlock decodes hf and the CONTINUATION frames that follow it (the
// Framer refuses any other frame between them).
func (r *headerReader) readBlock(hf *http2.HeadersFrame) (http2.Frame, error) {
	r.begin()
	var frag interface {
		HeaderBlockFragment() []byte
		HeadersEnded() bool
	} = hf
	for {
		b := frag.HeaderBlockFragment()
		// As the Framer: a fragment over twice the list bytes left (any
		// CONTINUATION once over the limit), or one after an invalid
		// field (whose block is no longer counted), ends the connection
		// before it is decoded.
		if int64(len(b)) > 2*int64(r.headersLeft+r.trailersLeft) || r.invalid != nil {
			r.end()
			return nil, http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if _, err := r.dec.Write(b); err != nil {
			r.end()
			return nil, http2.ConnectionError(http2.ErrCodeCompression)
		}
		if frag.HeadersEnded() {
			break
		}
		f, err := r.fr.ReadFrame()
		if err != nil {
			r.end()
			return nil, err
		}
		c, ok := f.(*http2.ContinuationFrame)
		if !ok { // cannot be: the Framer checks the frame order
			r.end()
			return nil, http2.ConnectionError(http2.ErrCodeProtocol)
		}
		frag = c
	}
	if err := r.dec.Close(); err != nil {
		r.end()
		return nil, http2.ConnectionError(http2.ErrCodeCompression)
	}
	fields, truncated, invalid := r.end()
	if invalid != nil {
		return nil, http2.StreamError{StreamID: hf.StreamID, Code: http2.ErrCodeProtocol, Cause: invalid}
	}
	mh := &http2.MetaHeadersFrame{HeadersFrame: hf, Fields: fields, Truncated: truncated}
	if err := checkPseudos(mh.PseudoFields()); err != nil {
		return nil, http2.StreamError{StreamID: hf.StreamID, Code: http2.ErrCodeProtocol, Cause: err}
	}
	return mh, nil
}

func (r *headerReader) begin() {
	r.start = len(r.slab)
	r.blockBytes = 0
	r.headersLeft, r.trailersLeft = r.max, r.max
	r.sawRegular, r.truncated, r.invalid = false, false, nil
	r.dec.SetEmitEnabled(true)
}

// end closes the block: its fields, capped at their length, and the
// slab moves past them, or is let go of once it holds slabRetainBytes.
func (r *headerReader) end() (fields []hpack.HeaderField, truncated bool, invalid error) {
	n := len(r.slab)
	if n > r.start {
		fields = r.slab[r.start:n:n]
	}
	r.start = n
	if r.slabBytes >= slabRetainBytes {
		r.slab, r.start, r.slabBytes = nil, 0, 0
	}
	return fields, r.truncated, r.invalid
}

// emit takes one decoded field, with the Framer's checks and its
// accounting of the header list size ("trailer" counted as the fields it
// announces).
func (r *headerReader) emit(hf hpack.HeaderField) {
	if !httpguts.ValidHeaderFieldValue(hf.Value) {
		// The value is not in the error: it may be a secret.
		r.invalid = fmt.Errorf("invalid value of header field %q", hf.Name)
	}
	if strings.HasPrefix(hf.Name, ":") {
		if r.sawRegular {
			r.invalid = errors.New("pseudo header field after regular")
		}
	} else {
		r.sawRegular = true
		if !validFieldName(hf.Name) {
			r.invalid = fmt.Errorf("invalid header field name %q", hf.Name)
		}
	}
	if r.invalid != nil {
		r.dec.SetEmitEnabled(false)
		return
	}
	left, size := &r.headersLeft, hf.Size()
	if hf.Name == "trailer" {
		n := uint32(strings.Count(hf.Value, ",") + 1)
		left, size = &r.trailersLeft, uint32(len(hf.Value))-n+1+n*hpack.HeaderField{}.Size()
	}
	if size > *left {
		r.dec.SetEmitEnabled(false)
		r.truncated = true
		r.headersLeft, r.trailersLeft = 0, 0
		return
	}
	*left -= size
	if len(r.slab) == cap(r.slab) {
		block := r.slab[r.start:]
		slab := make([]hpack.HeaderField, len(block), max(slabFields, 2*len(block)))
		copy(slab, block)
		r.slab, r.start, r.slabBytes = slab, 0, r.blockBytes
	}
	r.slab = append(r.slab, hf)
	r.blockBytes += size
	r.slabBytes += size
}

// validFieldName is a lower-case HTTP token, as HTTP/2 requires of a
// field name on the wire (RFC 9113 §8.2.1).
func validFieldName(name string) bool {
	if name == "" {
		return false
	}
	for _, c := range name {
		if !httpguts.IsTokenRune(c) || 'A' <= c && c <= 'Z' {
			return false
		}
	}
	return true
}

// checkPseudos refuses an unknown pseudo-header, a repeated one, and a
// mix of request and response pseudo-headers.
func checkPseudos(pseudo []hpack.HeaderField) error {
	var request, response bool
	for i, hf := range pseudo {
		switch hf.Name {
		case ":method", ":path", ":scheme", ":authority", ":protocol":
			request = true
		case ":status":
			response = true
		default:
			return fmt.Errorf("invalid pseudo-header %q", hf.Name)
		}
		for _, seen := range pseudo[:i] {
			if seen.Name == hf.Name {
				return fmt.Errorf("duplicate pseudo-header %q", hf.Name)
			}
		}
	}
	if request && response {
		return errors.New("mix of request and response pseudo headers")
	}
	return nil
}
