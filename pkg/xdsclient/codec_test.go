package xdsclient

import (
	"slices"
	"testing"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// requireUnmarshalsAsProto checks unmarshalResponse against
// proto.Unmarshal on b: both fail, or both give the same response.
func requireUnmarshalsAsProto(t testing.TB, b []byte) *discoveryv3.DiscoveryResponse {
	var want, got discoveryv3.DiscoveryResponse
	wantErr := proto.Unmarshal(b, &want)
	gotErr := unmarshalResponse(append([]byte(nil), b...), &got)
	if wantErr != nil {
		require.Error(t, gotErr, "proto.Unmarshal: %v", wantErr)
		return nil
	}
	require.NoError(t, gotErr)
	require.True(t, proto.Equal(&want, &got), "want %v\ngot  %v", &want, &got)
	return &got
}

func TestResponseCodecUnmarshalsAsProto(t *testing.T) {
	res := buildGateway(t, "10.0.0.5", echo, api).anys(t)
	full, err := proto.Marshal(&discoveryv3.DiscoveryResponse{
		VersionInfo: "v1", TypeUrl: TypeCluster, Nonce: "7", Resources: res,
	})
	require.NoError(t, err)
	anyBytes := func(fields ...[]byte) []byte {
		var b []byte
		for _, f := range fields {
			b = append(b, f...)
		}
		return protowire.AppendBytes(protowire.AppendTag(nil, 2, protowire.BytesType), b)
	}
	str := func(num protowire.Number, s string) []byte {
		return protowire.AppendString(protowire.AppendTag(nil, num, protowire.BytesType), s)
	}
	for name, b := range map[string][]byte{
		"a response": full,
		"empty":      nil,
		"truncated":  full[:len(full)-3],
		"an Any with an unknown field": append(slices.Clone(full), anyBytes(str(1, TypeCluster), str(2, "x"),
			protowire.AppendVarint(protowire.AppendTag(nil, 9, protowire.VarintType), 1))...),
		"an Any's fields twice": append(slices.Clone(full), anyBytes(str(1, "other"), str(2, "a"), str(1, TypeSecret), str(2, "b"))...),
		"a type URL not UTF-8":  append(slices.Clone(full), anyBytes(str(1, "\xff"))...),
		"an empty Any":          append(slices.Clone(full), anyBytes()...),
		"resources with the wrong wire type": append(slices.Clone(full),
			protowire.AppendVarint(protowire.AppendTag(nil, 2, protowire.VarintType), 3)...),
		"an unknown field": protowire.AppendVarint(protowire.AppendTag(slices.Clone(full), 99, protowire.VarintType), 1),
		"a malformed Any":  append(slices.Clone(full), protowire.AppendBytes(protowire.AppendTag(nil, 2, protowire.BytesType), []byte{0x0a, 0x05})...),
	} {
		t.Run(name, func(t *testing.T) {
			requireUnmarshalsAsProto(t, b)
		})
	}

	// Through the codec, from gRPC's chunks: the values are slices of one
	// buffer, capped so that appending to one never writes into the next.
	var chunks mem.BufferSlice
	for rest := full; len(rest) > 0; {
		n := min(len(rest), 100)
		chunks = append(chunks, mem.SliceBuffer(rest[:n]))
		rest = rest[n:]
	}
	var resp discoveryv3.DiscoveryResponse
	require.NoError(t, newResponseCodec().Unmarshal(chunks, &resp))
	require.Len(t, resp.GetResources(), len(res))
	for i, r := range resp.GetResources() {
		require.True(t, proto.Equal(res[i], r))
		require.Equal(t, len(r.GetValue()), cap(r.GetValue()))
	}
	require.Equal(t, "proto", newResponseCodec().Name())
	var other anypb.Any
	data, err := newResponseCodec().Marshal(res[0])
	require.NoError(t, err)
	require.NoError(t, newResponseCodec().Unmarshal(data, &other), "other messages as gRPC's codec has them")
	require.True(t, proto.Equal(res[0], &other))
}
