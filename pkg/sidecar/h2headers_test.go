package sidecar

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// headerSeeds are frame sequences that reach every outcome of a header
// block: whole, split over CONTINUATION, truncated over the list limit,
// a malformed field (stream error), broken HPACK (connection error), a
// fragment far over the limit, a frame between HEADERS and its
// CONTINUATION, and fields indexed from the dynamic table of an earlier
// block.
func headerSeeds(t testing.TB) [][]byte {
	block := func(fields ...hpack.HeaderField) []byte {
		var b bytes.Buffer
		enc := hpack.NewEncoder(&b)
		for _, f := range fields {
			require.NoError(t, enc.WriteField(f))
		}
		return b.Bytes()
	}
	req := []hpack.HeaderField{
		{Name: ":method", Value: "GET"}, {Name: ":scheme", Value: "http"},
		{Name: ":authority", Value: "echo.demo"}, {Name: ":path", Value: "/"},
		{Name: "user-agent", Value: "fuzz"}, {Name: "trailer", Value: "a, b"},
	}
	frames := func(write func(fr *http2.Framer)) []byte {
		var b bytes.Buffer
		write(http2.NewFramer(&b, nil))
		return b.Bytes()
	}
	headers := func(fr *http2.Framer, id uint32, end bool, frag []byte) {
		require.NoError(t, fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: frag, EndStream: end, EndHeaders: true}))
	}
	whole := block(req...)
	var twice bytes.Buffer // one encoder: the second block indexes the first's fields
	enc := hpack.NewEncoder(&twice)
	for _, f := range req {
		require.NoError(t, enc.WriteField(f))
	}
	first := bytes.Clone(twice.Bytes())
	twice.Reset()
	for _, f := range req {
		require.NoError(t, enc.WriteField(f))
	}
	return [][]byte{
		frames(func(fr *http2.Framer) { headers(fr, 1, true, whole) }),
		frames(func(fr *http2.Framer) { headers(fr, 1, true, first); headers(fr, 3, true, twice.Bytes()) }),
		frames(func(fr *http2.Framer) {
			require.NoError(t, fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: whole[:5]}))
			require.NoError(t, fr.WriteContinuation(1, false, whole[5:9]))
			require.NoError(t, fr.WriteContinuation(1, true, whole[9:]))
			require.NoError(t, fr.WriteData(1, true, []byte("x")))
		}),
		frames(func(fr *http2.Framer) {
			headers(fr, 1, false, block(append(req, hpack.HeaderField{Name: "big", Value: strings.Repeat("v", 900)})...))
		}),
		frames(func(fr *http2.Framer) { headers(fr, 1, true, block(hpack.HeaderField{Name: "Upper", Value: "x"})) }),
		frames(func(fr *http2.Framer) { headers(fr, 1, true, block(hpack.HeaderField{Name: "x", Value: "a\x00b"})) }),
		frames(func(fr *http2.Framer) {
			headers(fr, 1, true, block(hpack.HeaderField{Name: "x", Value: "1"}, hpack.HeaderField{Name: ":path", Value: "/"}))
			headers(fr, 3, true, whole)
		}),
		frames(func(fr *http2.Framer) {
			headers(fr, 1, true, block(hpack.HeaderField{Name: ":status", Value: "200"}, hpack.HeaderField{Name: ":path", Value: "/"}))
		}),
		frames(func(fr *http2.Framer) { headers(fr, 1, true, block(req[0], req[0])) }),
		frames(func(fr *http2.Framer) { headers(fr, 1, true, block(hpack.HeaderField{Name: ":bogus", Value: "1"})) }),
		frames(func(fr *http2.Framer) { headers(fr, 1, true, []byte{0xff, 0xff, 0xff, 0xff}) }),
		frames(func(fr *http2.Framer) { headers(fr, 1, true, bytes.Repeat([]byte{0x40, 1, 'a', 1, 'b'}, 600)) }),
		frames(func(fr *http2.Framer) {
			require.NoError(t, fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: whole[:5]}))
			require.NoError(t, fr.WritePing(false, [8]byte{}))
		}),
		frames(func(fr *http2.Framer) { require.NoError(t, fr.WriteContinuation(1, true, whole)) }),
	}
}

// The header reader decodes exactly as http2.Framer does with
// ReadMetaHeaders: the same frames, fields and truncation, and errors of
// the same kind and code, over any bytes. Its limit is set low (1 KiB)
// so that truncation and the too-large cut-off are reached.
func FuzzHeaderReader(f *testing.F) {
	for _, s := range headerSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		const limit = 1 << 10
		theirs := http2.NewFramer(nil, bytes.NewReader(data))
		theirs.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		theirs.MaxHeaderListSize = limit
		ours := newHeaderReader(http2.NewFramer(nil, bytes.NewReader(data)), limit)
		for i := 0; ; i++ {
			// Every frame takes at least its 9-byte header.
			require.LessOrEqual(t, i, len(data)/9+1, "frames read past the input")
			want, wantErr := theirs.ReadFrame()
			got, gotErr := ours.ReadFrame()
			require.Equal(t, describeErr(wantErr), describeErr(gotErr), "frame %d", i)
			if wantErr != nil {
				var se http2.StreamError
				if errors.As(wantErr, &se) {
					continue // the stream is reset; the connection reads on
				}
				return
			}
			require.Equal(t, describeFrame(want), describeFrame(got), "frame %d", i)
		}
	})
}

func TestHeaderReaderSeeds(t *testing.T) {
	var outcomes []string
	for _, s := range headerSeeds(t) {
		ours := newHeaderReader(http2.NewFramer(nil, bytes.NewReader(s)), 1<<10)
		f, err := ours.ReadFrame()
		if err != nil {
			outcomes = append(outcomes, describeErr(err))
			continue
		}
		outcomes = append(outcomes, describeFrame(f))
	}
	// Each seed reaches the outcome it was written for (FuzzHeaderReader
	// runs them against the Framer too).
	for _, want := range []string{
		"HEADERS stream 1 end true fields [:method=GET :scheme=http :authority=echo.demo :path=/ user-agent=fuzz trailer=a, b] truncated false",
		"HEADERS stream 1 end false fields [:method=GET :scheme=http :authority=echo.demo :path=/ user-agent=fuzz trailer=a, b] truncated true",
		"stream error 1 PROTOCOL_ERROR",
		"connection error COMPRESSION_ERROR",
		"connection error PROTOCOL_ERROR",
	} {
		require.Contains(t, outcomes, want)
	}
}

func describeErr(err error) string {
	var se http2.StreamError
	var ce http2.ConnectionError
	switch {
	case err == nil:
		return "<nil>"
	case errors.As(err, &se):
		return fmt.Sprintf("stream error %d %v", se.StreamID, se.Code)
	case errors.As(err, &ce):
		return fmt.Sprintf("connection error %v", http2.ErrCode(ce))
	}
	return err.Error()
}

func describeFrame(f http2.Frame) string {
	if mh, ok := f.(*http2.MetaHeadersFrame); ok {
		var fields []string
		for _, hf := range mh.Fields {
			fields = append(fields, hf.Name+"="+hf.Value)
		}
		return fmt.Sprintf("HEADERS stream %d end %v fields %v truncated %v", mh.StreamID, mh.StreamEnded(), fields, mh.Truncated)
	}
	return fmt.Sprintf("%v", f.Header())
}

// The reader lets go of a slab whose fields add up to slabRetainBytes,
// so an idle connection does not keep large header values alive; the
// fields it handed out stay intact, and small blocks share a slab.
func TestHeaderReaderLetsGoOfLargeSlabs(t *testing.T) {
	var b bytes.Buffer
	enc := hpack.NewEncoder(&b)
	var wire bytes.Buffer
	wfr := http2.NewFramer(&wire, nil)
	block := func(id uint32, fields ...hpack.HeaderField) {
		b.Reset()
		for _, f := range fields {
			require.NoError(t, enc.WriteField(f))
		}
		require.NoError(t, wfr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: b.Bytes(), EndStream: true, EndHeaders: true}))
	}
	small := hpack.HeaderField{Name: ":status", Value: "200"}
	big := hpack.HeaderField{Name: "x-big", Value: strings.Repeat("v", slabRetainBytes)}
	block(1, small)
	block(3, small)
	block(5, small, big)
	block(7, small)
	r := newHeaderReader(http2.NewFramer(nil, &wire), h2ReadHeaderList)
	read := func() *http2.MetaHeadersFrame {
		f, err := r.ReadFrame()
		require.NoError(t, err)
		return f.(*http2.MetaHeadersFrame)
	}
	first, second := read(), read()
	require.Same(t, &first.Fields[0], &r.slab[0], "small blocks share the reader's slab")
	require.Same(t, &second.Fields[0], &r.slab[1])
	require.Equal(t, 1, cap(first.Fields), "a block's slice is capped at its length")
	withBig := read()
	require.Nil(t, r.slab, "the slab is let go of once it holds slabRetainBytes")
	require.Equal(t, []hpack.HeaderField{small, big}, withBig.Fields)
	last := read()
	require.Equal(t, []hpack.HeaderField{small}, last.Fields)
	require.Equal(t, []hpack.HeaderField{small}, first.Fields, "fields handed out are never written again")
	require.Same(t, &last.Fields[0], &r.slab[0], "the next block starts a fresh slab")
}
