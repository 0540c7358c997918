package authz

import (
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/prototext"
	securityv1beta1 "istio.io/api/security/v1beta1"
)

// Istio's address fields become Envoy's CIDR matchers: ipBlocks and
// source.ip the peer (direct_remote_ip), remoteIpBlocks and remote.ip
// the original client (remote_ip), destination.ip the original
// destination; a lone address is a range of itself, a range is masked;
// a value that is neither makes the field one the rule cannot match.
func TestTranslateAddresses(t *testing.T) {
	rules := []*securityv1beta1.Rule{
		{From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{
			IpBlocks: []string{"10.1.2.3", "10.1.2.3/8"}, NotIpBlocks: []string{"2001:db8::/32"},
			RemoteIpBlocks: []string{"192.168.0.0/16"}, NotRemoteIpBlocks: []string{"::ffff:192.168.1.1"},
		}}}},
		{When: []*securityv1beta1.Condition{
			{Key: "source.ip", Values: []string{"127.0.0.1"}},
			{Key: "remote.ip", NotValues: []string{"10.0.0.0/8"}},
			{Key: "destination.ip", Values: []string{"10.1.0.0/16"}, NotValues: []string{"10.1.9.9"}},
		}},
		{From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{IpBlocks: []string{"10.0.0.0/8", "not-an-ip"}}}}},
		{When: []*securityv1beta1.Condition{{Key: "destination.ip", Values: []string{"fe80::1%eth0"}}}},
	}
	set := &Set{Policies: []Policy{{Namespace: "demo", Name: "p", Spec: &securityv1beta1.AuthorizationPolicy{Rules: rules}}}}
	for _, level := range []Level{Connection, Request} {
		r := Translate(set, "a.mesh", level)
		require.Equal(t, []Note{
			{Policy: "demo/p", Reason: `rule 2 never matches: from.source.ipBlocks ("not-an-ip" is not an IP address or CIDR range)`},
			{Policy: "demo/p", Reason: `rule 3 never matches: when "destination.ip" values ("fe80::1%eth0" is not an IP address or CIDR range)`},
		}, r.Notes)
		require.Len(t, r.Allow, 2)
		text := ""
		for _, p := range r.Allow {
			text += prototext.MarshalOptions{}.Format(p) + "\n"
		}
		for _, want := range []string{
			`direct_remote_ip:{address_prefix:"10.1.2.3" prefix_len:{value:32}}`,
			`direct_remote_ip:{address_prefix:"10.0.0.0" prefix_len:{value:8}}`,
			`not_id:{direct_remote_ip:{address_prefix:"2001:db8::" prefix_len:{value:32}}}`,
			`remote_ip:{address_prefix:"192.168.0.0" prefix_len:{value:16}}`,
			`not_id:{remote_ip:{address_prefix:"192.168.1.1" prefix_len:{value:32}}}`,
			`direct_remote_ip:{address_prefix:"127.0.0.1" prefix_len:{value:32}}`,
			`not_id:{remote_ip:{address_prefix:"10.0.0.0" prefix_len:{value:8}}}`,
			`destination_ip:{address_prefix:"10.1.0.0" prefix_len:{value:16}}`,
			`not_rule:{destination_ip:{address_prefix:"10.1.9.9" prefix_len:{value:32}}}`,
		} {
			require.Contains(t, compact(text), compact(want))
		}
		for _, p := range r.Allow {
			require.NoError(t, p.Validate())
		}
	}
}

// compact is prototext's output without its spaces, which it varies.
func compact(s string) string {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		if s[i] != ' ' && s[i] != '\n' {
			out = append(out, s[i])
		}
	}
	return string(out)
}
