package federation

import (
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"

	fedv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"
	"github.com/isthmus-mesh/isthmus/internal/clip"
	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
)

// PeerStatus is what this federator observes about one peer: the source
// of FederationPeer status, metrics and /debug/federation.
type PeerStatus struct {
	Name  string `json:"name"`
	State string `json:"state"`
	// Established is false until the peering secret was spent and both
	// bundles exchanged.
	Established bool `json:"established"`
	// Terminated is set when the peer ended the link with Terminate,
	// until the link is established again. Its bundle is dropped then:
	// Established is false, and the Bundle fields are zero.
	Terminated bool `json:"terminated,omitempty"`
	// Reason says why the peer is not connected, when it is not.
	Reason            string            `json:"reason,omitempty"`
	ConnectedSince    time.Time         `json:"connectedSince,omitzero"`
	LastHeartbeat     time.Time         `json:"lastHeartbeat,omitzero"`
	DisconnectedSince time.Time         `json:"disconnectedSince,omitzero"`
	Sent              map[string]string `json:"sent,omitempty"`
	Acknowledged      map[string]string `json:"acknowledged,omitempty"`
	Received          map[string]string `json:"received,omitempty"`
	// LastNACKSent is this side's last refusal of the peer's data;
	// LastNACKReceived the peer's last refusal of this side's.
	LastNACKSent     string `json:"lastNACKSent,omitempty"`
	LastNACKReceived string `json:"lastNACKReceived,omitempty"`
	// UpdatesSent and UpdatesReceived count updates over every stream.
	UpdatesSent     int    `json:"updatesSent"`
	UpdatesReceived int    `json:"updatesReceived"`
	Imported        int    `json:"imported"`
	Exported        int    `json:"exported"`
	BundleSequence  uint64 `json:"bundleSequence,omitempty"`
	BundleRoots     int    `json:"bundleRoots,omitempty"`
	// BundleExpires is the earliest expiry among the peer's roots.
	BundleExpires time.Time `json:"bundleExpires,omitzero"`
}

// tracker holds one peer's status; sessions, the establisher and the
// staleness clock write it, the status writer reads it.
type tracker struct {
	// mu guards st and the refusals by type, which Snapshot joins into
	// LastNACKSent and LastNACKReceived: one type's answer never hides
	// another's refusal.
	mu            sync.Mutex
	st            PeerStatus
	nacksSent     map[string]string
	nacksReceived map[string]string
}

func newTracker() *tracker {
	return &tracker{st: PeerStatus{State: v1alpha1.StatePending, Sent: map[string]string{},
		Acknowledged: map[string]string{}, Received: map[string]string{}},
		nacksSent: map[string]string{}, nacksReceived: map[string]string{}}
}

func (t *tracker) update(f func(*PeerStatus)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	f(&t.st)
}

// Snapshot returns a copy of the status.
func (t *tracker) Snapshot() PeerStatus {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.st
	s.Sent, s.Acknowledged, s.Received = maps.Clone(s.Sent), maps.Clone(s.Acknowledged), maps.Clone(s.Received)
	s.LastNACKSent, s.LastNACKReceived = joinNACKs(t.nacksSent), joinNACKs(t.nacksReceived)
	return s
}

func (t *tracker) established() {
	t.update(func(s *PeerStatus) {
		s.Established, s.Terminated = true, false
		if s.State == v1alpha1.StateFailed {
			s.State, s.Reason = v1alpha1.StatePending, ""
		}
	})
}

func (t *tracker) connected(now time.Time) {
	t.update(func(s *PeerStatus) {
		s.State, s.Reason, s.Established, s.Terminated = v1alpha1.StateConnected, "", true, false
		s.ConnectedSince, s.LastHeartbeat, s.DisconnectedSince = now, now, time.Time{}
	})
}

func (t *tracker) heard(now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.st.LastHeartbeat = now
}

// disconnected records a session's end. A link the peer terminated is
// failed, and no longer established: the manager drops the peer's bundle
// and imports. Any other end leaves the peer disconnected (and its
// imports ageing).
func (t *tracker) disconnected(now time.Time, err error) {
	t.update(func(s *PeerStatus) {
		if s.State == v1alpha1.StateConnected || s.DisconnectedSince.IsZero() {
			s.DisconnectedSince = now
		}
		s.State = v1alpha1.StateDisconnected
		if errors.Is(err, ErrTerminated) {
			s.State, s.Established, s.Terminated = v1alpha1.StateFailed, false, true
			s.BundleSequence, s.BundleRoots, s.BundleExpires = 0, 0, time.Time{}
		}
		if err != nil {
			s.Reason = err.Error()
		}
	})
}

// failed records a problem that needs the operator.
func (t *tracker) failed(now time.Time, err error) {
	t.update(func(s *PeerStatus) {
		if s.DisconnectedSince.IsZero() && s.State == v1alpha1.StateConnected {
			s.DisconnectedSince = now
		}
		s.State, s.Reason = v1alpha1.StateFailed, err.Error()
	})
}

// unreachable records a failed connection attempt.
func (t *tracker) unreachable(now time.Time, err error) {
	t.update(func(s *PeerStatus) {
		if s.State == v1alpha1.StateConnected {
			s.DisconnectedSince = now
		}
		if s.State != v1alpha1.StatePending || s.Established {
			s.State = v1alpha1.StateDisconnected
		}
		if s.DisconnectedSince.IsZero() && s.Established {
			s.DisconnectedSince = now
		}
		s.Reason = err.Error()
	})
}

// lostSince is when the peer was lost, if it is.
func (t *tracker) lostSince() (time.Time, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.st.State == v1alpha1.StateConnected || t.st.DisconnectedSince.IsZero() {
		return time.Time{}, false
	}
	return t.st.DisconnectedSince, true
}

func (t *tracker) sent(typeURL, version string) {
	t.update(func(s *PeerStatus) {
		s.Sent[typeURL] = version
		s.UpdatesSent++
	})
}

func (t *tracker) acked(typeURL, version string, nack *fedv1.Error, n int) {
	t.update(func(s *PeerStatus) {
		s.Acknowledged[typeURL] = version
		t.nacksReceived[typeURL] = describeNACK(nack)
		if typeURL == TypeService {
			s.Exported = n
		}
	})
}

func (t *tracker) received(typeURL, version string) {
	t.update(func(s *PeerStatus) {
		s.UpdatesReceived++
		s.Received[typeURL] = version
		t.nacksSent[typeURL] = ""
	})
}

// nackSent records this side's refusal of the peer's update of typeURL,
// and reports whether it differs from the one standing.
func (t *tracker) nackSent(typeURL string, e *fedv1.Error) (changed bool) {
	t.update(func(*PeerStatus) {
		d := describeNACK(e)
		changed = t.nacksSent[typeURL] != d
		t.nacksSent[typeURL] = d
	})
	return changed
}

// joinNACKs joins the standing refusals, in type order.
func joinNACKs(byType map[string]string) string {
	var out []string
	for _, typ := range slices.Sorted(maps.Keys(byType)) {
		if byType[typ] != "" {
			out = append(out, byType[typ])
		}
	}
	return strings.Join(out, "; ")
}

func (t *tracker) imported(n int) {
	t.update(func(s *PeerStatus) { s.Imported = n })
}

func (t *tracker) bundle(b *spiffebundle.Bundle) {
	t.update(func(s *PeerStatus) {
		s.BundleSequence, _ = b.SequenceNumber()
		s.BundleRoots = len(b.X509Authorities())
		s.BundleExpires = time.Time{}
		for _, c := range b.X509Authorities() {
			if s.BundleExpires.IsZero() || c.NotAfter.Before(s.BundleExpires) {
				s.BundleExpires = c.NotAfter
			}
		}
	})
}

// describeNACK is a refusal as status shows it, at most maxReasonBytes:
// the reason comes from the peer, which bounds it only by its message
// size.
func describeNACK(e *fedv1.Error) string {
	if e == nil {
		return ""
	}
	if e.GetResource() == "" {
		return clip.String(e.GetReason(), maxReasonBytes)
	}
	return clip.String(e.GetResource()+": "+e.GetReason(), maxReasonBytes)
}

// maxReasonBytes bounds a reason shown in status and logs.
const maxReasonBytes = 1024
