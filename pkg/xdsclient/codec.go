package xdsclient

import (
	"fmt"
	"unicode/utf8"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/encoding"
	encproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// responseCodec is the ADS stream's codec. Requests go as gRPC's proto
// codec sends them. A response is read into one buffer the client owns
// and its resources' values are slices of it: gRPC's codec would copy
// the received bytes into a pooled buffer and proto.Unmarshal copy every
// resource out of that again, thousands of allocations for a
// state-of-the-world response. The resources are never kept once
// decoded (entries keep digests), so the buffer lives as long as the
// response is being handled.
type responseCodec struct{ proto encoding.CodecV2 }

var _ encoding.CodecV2 = responseCodec{}

func newResponseCodec() responseCodec {
	return responseCodec{proto: encoding.GetCodecV2(encproto.Name)}
}

// Name is the proto codec's: the content-subtype stays "proto".
func (c responseCodec) Name() string { return c.proto.Name() }

func (c responseCodec) Marshal(v any) (mem.BufferSlice, error) { return c.proto.Marshal(v) }

func (c responseCodec) Unmarshal(data mem.BufferSlice, v any) error {
	resp, ok := v.(*discoveryv3.DiscoveryResponse)
	if !ok {
		return c.proto.Unmarshal(data, v)
	}
	return unmarshalResponse(data.Materialize(), resp)
}

// unmarshalResponse is proto.Unmarshal of a DiscoveryResponse, except
// that the resources' values alias b, and their type URLs are the
// constants when they are one of the client's types.
func unmarshalResponse(b []byte, resp *discoveryv3.DiscoveryResponse) error {
	const resourcesField = 2
	n := 0
	for rest := b; len(rest) > 0; {
		num, typ, tagLen := protowire.ConsumeTag(rest)
		if tagLen < 0 {
			return proto.Unmarshal(b, resp) // for its error
		}
		vLen := protowire.ConsumeFieldValue(num, typ, rest[tagLen:])
		if vLen < 0 {
			return proto.Unmarshal(b, resp)
		}
		if num == resourcesField && typ == protowire.BytesType {
			n++
		}
		rest = rest[tagLen+vLen:]
	}
	var other []byte
	anys := make([]anypb.Any, n)
	resources := make([]*anypb.Any, 0, n)
	for rest := b; len(rest) > 0; {
		num, typ, tagLen := protowire.ConsumeTag(rest)
		vLen := protowire.ConsumeFieldValue(num, typ, rest[tagLen:])
		if num == resourcesField && typ == protowire.BytesType {
			v, _ := protowire.ConsumeBytes(rest[tagLen:])
			a := &anys[len(resources)]
			if !parseAny(v, a) {
				// Anything but type_url and value, or a type URL that is
				// not UTF-8: as proto.Unmarshal has it (a copy), or its
				// error.
				if err := proto.Unmarshal(v, a); err != nil {
					return fmt.Errorf("resources[%d]: %w", len(resources), err)
				}
			}
			resources = append(resources, a)
		} else {
			other = append(other, rest[:tagLen+vLen]...)
		}
		rest = rest[tagLen+vLen:]
	}
	if err := proto.Unmarshal(other, resp); err != nil {
		return err
	}
	resp.Resources = resources
	return nil
}

// parseAny fills a from an Any's bytes that hold only a type_url (valid
// UTF-8) and a value, the last occurrence of each winning as in
// proto.Unmarshal; false for anything else.
func parseAny(b []byte, a *anypb.Any) bool {
	var typeURL, value []byte
	for len(b) > 0 {
		num, typ, tagLen := protowire.ConsumeTag(b)
		if tagLen < 0 || typ != protowire.BytesType || (num != 1 && num != 2) {
			return false
		}
		v, vLen := protowire.ConsumeBytes(b[tagLen:])
		if vLen < 0 {
			return false
		}
		if num == 1 {
			typeURL = v
		} else {
			value = v
		}
		b = b[tagLen+vLen:]
	}
	if !utf8.Valid(typeURL) {
		return false
	}
	switch string(typeURL) {
	case TypeListener:
		a.TypeUrl = TypeListener
	case TypeRouteConfiguration:
		a.TypeUrl = TypeRouteConfiguration
	case TypeCluster:
		a.TypeUrl = TypeCluster
	case TypeClusterLoadAssignment:
		a.TypeUrl = TypeClusterLoadAssignment
	case TypeSecret:
		a.TypeUrl = TypeSecret
	default:
		a.TypeUrl = string(typeURL)
	}
	if len(value) > 0 {
		a.Value = value[:len(value):len(value)]
	}
	return true
}
