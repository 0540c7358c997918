package federation

import (
	"encoding/binary"
	"log/slog"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	"k8s.io/client-go/kubernetes/fake"
	clocktesting "k8s.io/utils/clock/testing"

	fedv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"
	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/trust"
)

// fuzzPeer is a peer whose messages are handled synchronously, without a
// stream, so every input is replayed deterministically.
func fuzzPeer(tb testing.TB) *peer {
	store := catalog.NewStore()
	local := trust.NewStore(spiffeid.RequireTrustDomainFromString("here.mesh"))
	c, err := ca.New(tb.Context(), fake.NewClientset(), ca.Options{TrustDomain: local.LocalTrustDomain(), Namespace: testNS})
	if err != nil {
		tb.Fatal(err)
	}
	local.SetLocal(c.Bundle().X509Authorities(), 1, 0)
	td := spiffeid.RequireTrustDomainFromString("evil.mesh")
	return newPeer("evil", td, spiffeid.RequireFromPath(td, "/fed"), clocktesting.NewFakeClock(time.Now()), newExports(store, local, []string{"gw.here.example:15443"}))
}

// splitMessages reads a sequence of length-prefixed encoded messages.
func splitMessages(data []byte) []*fedv1.ExchangeMessage {
	var out []*fedv1.ExchangeMessage
	for len(data) > 0 && len(out) < 16 {
		n, k := binary.Uvarint(data)
		if k <= 0 || n > uint64(len(data)-k) {
			return out
		}
		var m fedv1.ExchangeMessage
		if proto.Unmarshal(data[k:k+int(n)], &m) == nil {
			out = append(out, &m)
		}
		data = data[k+int(n):]
	}
	return out
}

func joinMessages(ms ...*fedv1.ExchangeMessage) []byte {
	var out []byte
	for _, m := range ms {
		b, _ := proto.Marshal(m)
		out = binary.AppendUvarint(out, uint64(len(b)))
		out = append(out, b...)
	}
	return out
}

func updateMsg(u *fedv1.Update) *fedv1.ExchangeMessage {
	return &fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Update{Update: u}}
}

// FuzzHandleMessages feeds sequences of arbitrary messages to a peer, as a
// hostile or broken peer could send them, and checks that nothing panics,
// every update is answered, and what is imported always matches the
// version this side reports holding.
func FuzzHandleMessages(f *testing.F) {
	good := versioned(&fedv1.Update{Nonce: "1", TypeUrl: TypeService, Resources: []*fedv1.Resource{evilService("demo", "a"), evilService("demo", "b")}})
	incr := &fedv1.Update{Nonce: "2", TypeUrl: TypeService, Removed: []string{"demo/a"}}
	bad := versioned(&fedv1.Update{Nonce: "3", TypeUrl: TypeService, Resources: []*fedv1.Resource{evilService("kube-system", "dns")}})
	f.Add(joinMessages(updateMsg(good)))
	f.Add(joinMessages(updateMsg(good), updateMsg(incr)))
	f.Add(joinMessages(updateMsg(bad), updateMsg(good)))
	f.Add(joinMessages(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Ack{Ack: &fedv1.Ack{TypeUrl: TypeService, Nonce: "9"}}}))
	f.Add(joinMessages(updateMsg(&fedv1.Update{TypeUrl: TypeBundle, FullSet: true, Nonce: "4",
		Resources: []*fedv1.Resource{{Name: "evil.mesh", Body: &fedv1.Resource_TrustBundle{TrustBundle: &fedv1.TrustBundle{TrustDomain: "evil.mesh", X509Authorities: [][]byte{{0x30, 0x03}}}}}}})))
	f.Add([]byte{0x05, 0x1a, 0x03, 0x0a, 0x01, 0x78})
	lim := Limits{MaxServices: 50}.withDefaults()
	log := slog.New(slog.DiscardHandler)
	f.Fuzz(func(t *testing.T, data []byte) {
		p := fuzzPeer(t)
		for _, m := range splitMessages(data) {
			reply, err := p.handle(t.Context(), m, lim, log)
			if u := m.GetUpdate(); u != nil {
				if err != nil || reply == nil {
					t.Fatalf("an update got no answer: %v", err)
				}
				if reply.GetNonce() != u.GetNonce() {
					t.Fatalf("answer nonce %q for update %q", reply.GetNonce(), u.GetNonce())
				}
			}
			p.importMu.Lock()
			in := p.in[TypeService]
			if got := setVersion(in.digests); got != in.version {
				t.Fatalf("holds version %q but its digests make %q", in.version, got)
			}
			if len(in.digests) != p.received.Len() {
				t.Fatalf("%d digests but %d imported services", len(in.digests), p.received.Len())
			}
			if len(in.digests) > lim.MaxServices {
				t.Fatalf("%d services imported, over the limit", len(in.digests))
			}
			p.importMu.Unlock()
			if n := p.exports.catalog.Get("evil").Len(); n != p.received.Len() {
				t.Fatalf("catalog has %d, received %d", n, p.received.Len())
			}
		}
	})
}
