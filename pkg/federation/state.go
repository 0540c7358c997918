package federation

import (
	"fmt"
	"github.com/isthmus-mesh/isthmus/internal/clip"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	fedv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"
)

// outbound is what this side has told the peer about one resource type.
// At most one update per type is in flight: the peer's state is then
// always exactly the last acknowledged set, so the next update can be a
// diff against it.
//
// Owned by the session loop; not safe for concurrent use.
type outbound struct {
	typeURL string
	// acked is what the peer holds, by name, at ackedVersion; nil means
	// unknown, and the next update is a full set.
	acked        map[string]digest
	ackedVersion string
	// pending is the update in flight, if any.
	pending *pendingUpdate
	// rejected holds resources the peer NACKed, by the digest refused;
	// they are left out until their content changes, so one bad resource
	// never stalls the others.
	rejected map[string]digest
	// refused is set when the peer refused a whole update (say, over its
	// limits) of refusedVersion; it is not sent again until the set
	// changes.
	refused        bool
	refusedVersion string
	// lastSent is the version of the last update sent.
	lastSent string
	// lastNACK is the peer's last refusal, for status.
	lastNACK *fedv1.Error
	nonces   uint64
	// fullSets bounds how often the peer is sent a full set, over all
	// its streams. A full set costs this side the whole set, and the peer
	// can ask for one with a few bytes: a NACK, or a new stream that
	// claims to hold nothing.
	fullSets *rate.Limiter
}

// A peer gets fullSetBurst full sets of a type at once, then one every
// fullSetEvery: enough for a restart on either side and a few refused
// resources, while a peer asking for more gets about 1/fullSetEvery of
// this side's set per second, however it asks.
const (
	fullSetBurst = 5
	fullSetEvery = 10 * time.Second
)

type pendingUpdate struct {
	nonce   string
	version string
	set     map[string]digest
	// full is set for a full set.
	full bool
	// written is when the writer sent it (UnixNano), 0 until then.
	written atomic.Int64
}

// desired is the set this side wants the peer to hold.
type desired struct {
	resources map[string]*fedv1.Resource
	digests   map[string]digest
}

func newDesired(resources []*fedv1.Resource) (desired, error) {
	d := desired{resources: make(map[string]*fedv1.Resource, len(resources)), digests: make(map[string]digest, len(resources))}
	for _, r := range resources {
		dg, _, err := digestOf(r)
		if err != nil {
			return desired{}, fmt.Errorf("encode %s: %w", r.GetName(), err)
		}
		d.resources[r.GetName()] = r
		d.digests[r.GetName()] = dg
	}
	return d, nil
}

func newOutbound(typeURL string) *outbound {
	return &outbound{typeURL: typeURL, rejected: map[string]digest{}, fullSets: rate.NewLimiter(rate.Every(fullSetEvery), fullSetBurst)}
}

// resume is called when a stream opens and the peer says which version of
// this type it holds. When that is what the peer last acknowledged, or
// exactly what this side wants it to hold, nothing is resent.
func (o *outbound) resume(peerHolds string, want desired) {
	o.pending = nil
	o.refused = false
	switch {
	case peerHolds != "" && peerHolds == o.ackedVersion && o.acked != nil:
		// Same process, same peer state: carry on from the diff.
	case peerHolds != "" && peerHolds == setVersion(o.filter(want)):
		o.acked, o.ackedVersion = o.filter(want), peerHolds
	default:
		// The peer holds nothing or something unknown: a full set, even
		// an empty one, so it knows it is in sync.
		o.acked, o.ackedVersion = nil, ""
	}
}

// filter drops the resources the peer refused in exactly this content.
// The result is never modified.
func (o *outbound) filter(want desired) map[string]digest {
	if len(o.rejected) == 0 {
		return want.digests
	}
	out := make(map[string]digest, len(want.digests))
	for name, d := range want.digests {
		if r, ok := o.rejected[name]; ok && r == d {
			continue
		}
		out[name] = d
	}
	return out
}

// next returns the update that brings the peer to want, or nil when the
// peer already holds it, an update is in flight, or the set is one the
// peer refused. When the update would be a full set and the peer had its
// share of them, it returns nil and how long to wait before asking again.
func (o *outbound) next(want desired, now time.Time) (*fedv1.Update, time.Duration) {
	if o.pending != nil {
		return nil, 0
	}
	set := o.filter(want)
	version := setVersion(set)
	if o.acked != nil && version == o.ackedVersion {
		return nil, 0
	}
	if o.refused && version == o.refusedVersion {
		return nil, 0
	}
	if o.acked == nil {
		r := o.fullSets.ReserveN(now, 1)
		if wait := r.DelayFrom(now); wait > 0 {
			r.CancelAt(now)
			return nil, wait
		}
	}
	o.refused = false
	o.nonces++
	u := &fedv1.Update{TypeUrl: o.typeURL, Version: version, Nonce: strconv.FormatUint(o.nonces, 10)}
	if o.acked == nil {
		u.FullSet = true
		for name := range set {
			u.Resources = append(u.Resources, want.resources[name])
		}
	} else {
		for name, d := range set {
			if old, ok := o.acked[name]; !ok || old != d {
				u.Resources = append(u.Resources, want.resources[name])
			}
		}
		for name := range o.acked {
			if _, ok := set[name]; !ok {
				u.Removed = append(u.Removed, name)
			}
		}
	}
	sortUpdate(u)
	o.pending = &pendingUpdate{nonce: u.Nonce, version: version, set: set, full: u.FullSet}
	o.lastSent = version
	return u, 0
}

// ack handles the peer's answer to an update. It reports whether the
// answer matched the update in flight.
func (o *outbound) ack(a *fedv1.Ack) bool {
	p := o.pending
	if p == nil || a.GetNonce() != p.nonce {
		return false
	}
	o.pending = nil
	if a.GetError() == nil {
		o.acked, o.ackedVersion = p.set, p.version
		o.lastNACK = nil
		return true
	}
	o.lastNACK = a.GetError()
	if name := a.GetError().GetResource(); name != "" {
		if d, ok := p.set[name]; ok {
			o.rejected[name] = d
			return true
		}
	}
	if !p.full && a.GetVersion() != o.ackedVersion {
		// The peer holds something else than this side believes: start
		// again from a full set.
		o.acked, o.ackedVersion = nil, ""
		return true
	}
	// A full set does not depend on what the peer holds: sent again, it
	// would be refused again. (It was, in a loop, to a peer over its
	// limit that still held an older set.)
	o.refused, o.refusedVersion = true, p.version
	return true
}

// inbound is what this side holds from the peer for one resource type:
// the digests of the accepted set and their running XOR, so an
// incremental update is checked against the version the peer says it
// produces without rehashing the set.
type inbound struct {
	version string
	acc     digest
	digests map[string]digest
	// synced is set once an update was accepted in this process.
	synced bool
}

// nack builds a refusal naming the resource and the reason, each at most
// maxReasonBytes: both may quote the peer (a name it removed, a value it
// sent), which bounds them only by its message size.
func nack(u *fedv1.Update, held string, resource string, format string, args ...any) *fedv1.Ack {
	return &fedv1.Ack{TypeUrl: u.GetTypeUrl(), Nonce: u.GetNonce(), Version: held,
		Error: &fedv1.Error{Resource: clip.String(resource, maxReasonBytes), Reason: clip.String(fmt.Sprintf(format, args...), maxReasonBytes)}}
}

// apply checks u against what is held: the resulting count within
// maxResources and the resulting version the one u names. It changes
// nothing; the returned commit does, once the caller accepted every
// resource.
func (in *inbound) apply(u *fedv1.Update, maxResources int) (commit func(), refusal *fedv1.Ack) {
	upserts := make(map[string]digest, len(u.GetResources()))
	for _, r := range u.GetResources() {
		d, _, err := digestOf(r)
		if err != nil {
			return nil, nack(u, in.version, r.GetName(), "cannot encode: %v", err)
		}
		upserts[r.GetName()] = d
	}
	var acc digest
	n := 0
	if u.GetFullSet() {
		for _, d := range upserts {
			acc.xor(d)
		}
		n = len(upserts)
	} else {
		acc, n = in.acc, len(in.digests)
		for name, d := range upserts {
			if old, ok := in.digests[name]; ok {
				acc.xor(old)
			} else {
				n++
			}
			acc.xor(d)
		}
		for _, name := range u.GetRemoved() {
			if _, ok := upserts[name]; ok {
				return nil, nack(u, in.version, name, "both updated and removed in one update")
			}
			if old, ok := in.digests[name]; ok {
				acc.xor(old)
				n--
			}
		}
	}
	if n > maxResources {
		return nil, nack(u, in.version, "", "%d resources of type %s exceed this cluster's limit of %d per peer", n, u.GetTypeUrl(), maxResources)
	}
	if got := versionOf(acc, n); got != u.GetVersion() {
		return nil, nack(u, in.version, "", "version mismatch: applying the update gives %q, the update says %q; send a full set", got, u.GetVersion())
	}
	return func() {
		if u.GetFullSet() || in.digests == nil {
			if !u.GetFullSet() {
				in.digests = map[string]digest{}
			} else {
				in.digests = upserts
				upserts = nil
			}
		}
		for name, d := range upserts {
			in.digests[name] = d
		}
		for _, name := range u.GetRemoved() {
			delete(in.digests, name)
		}
		in.acc, in.version, in.synced = acc, u.GetVersion(), true
	}, nil
}
