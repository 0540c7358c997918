package federation

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/isthmus-mesh/isthmus/internal/clip"
	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
)

// heartbeatWriteInterval is how stale status.lastHeartbeat may get before
// it alone is worth a write.
const heartbeatWriteInterval = 30 * time.Second

// peerStatus turns what the tracker saw into the FederationPeer status.
func (m *Manager) peerStatus(e *peerEntry, now time.Time) v1alpha1.FederationPeerStatus {
	s := e.p.tracker.Snapshot()
	st := v1alpha1.FederationPeerStatus{
		State:            s.State,
		ImportedServices: int32(s.Imported),
		ExportedServices: int32(s.Exported),
		Sent:             s.Sent, Acknowledged: s.Acknowledged, Received: s.Received,
	}
	if !s.LastHeartbeat.IsZero() {
		t := metav1.NewTime(s.LastHeartbeat.Truncate(time.Second))
		st.LastHeartbeat = &t
	}
	if !s.DisconnectedSince.IsZero() && s.State != v1alpha1.StateConnected {
		t := metav1.NewTime(s.DisconnectedSince.Truncate(time.Second))
		st.DisconnectedSince = &t
	}
	if s.BundleRoots > 0 {
		st.Bundle = &v1alpha1.BundleStatus{Sequence: s.BundleSequence, Roots: int32(s.BundleRoots)}
		if !s.BundleExpires.IsZero() {
			t := metav1.NewTime(s.BundleExpires)
			st.Bundle.Expires = &t
		}
	}
	conds := append([]metav1.Condition(nil), e.conditions...)
	gen := e.generation.Load()
	setStatus := func(t string, status metav1.ConditionStatus, reason, msg string) {
		meta.SetStatusCondition(&conds, metav1.Condition{Type: t, Status: status, Reason: reason, Message: clip.String(msg, maxConditionMessage),
			LastTransitionTime: metav1.NewTime(now), ObservedGeneration: gen})
	}
	set := func(t string, ok bool, reason, msg string) {
		status := metav1.ConditionTrue
		if !ok {
			status = metav1.ConditionFalse
		}
		setStatus(t, status, reason, msg)
	}
	// A refused spec is said once, in Accepted; the conditions it stops
	// point there.
	const notRun = "the link is not run: the spec is not accepted (see the Accepted condition)"
	if e.specErr != nil {
		set(v1alpha1.ConditionAccepted, false, v1alpha1.ReasonInvalidSpec, e.specErr.Error())
	} else {
		set(v1alpha1.ConditionAccepted, true, "Accepted", "the spec is valid and the link runs as it says")
	}
	switch {
	case s.Established:
		set(v1alpha1.ConditionEstablished, true, "Established", "the link was established and both bundles are held")
	case e.specErr != nil:
		set(v1alpha1.ConditionEstablished, false, v1alpha1.ReasonInvalidSpec, notRun)
	case s.Terminated:
		set(v1alpha1.ConditionEstablished, false, "Terminated", s.Reason)
	case s.State == v1alpha1.StateFailed:
		set(v1alpha1.ConditionEstablished, false, "Refused", s.Reason)
	default:
		set(v1alpha1.ConditionEstablished, false, "Pending", orDefault(s.Reason, "not linked yet"))
	}
	switch {
	case e.specErr != nil:
		set(v1alpha1.ConditionConnected, false, v1alpha1.ReasonInvalidSpec, notRun)
	case s.State == v1alpha1.StateConnected:
		set(v1alpha1.ConditionConnected, true, "StreamUp", "the exchange stream is up")
	case s.State == v1alpha1.StateFailed:
		set(v1alpha1.ConditionConnected, false, "Failed", s.Reason)
	default:
		set(v1alpha1.ConditionConnected, false, "Disconnected", orDefault(s.Reason, "no stream yet"))
	}
	// Until there is an answer either way, neither True nor False is
	// known: a peer that never sent or never acknowledged anything has
	// accepted nothing.
	switch {
	case s.LastNACKSent != "":
		set(v1alpha1.ConditionImportsAccepted, false, "Refused", s.LastNACKSent)
	case s.UpdatesReceived == 0:
		setStatus(v1alpha1.ConditionImportsAccepted, metav1.ConditionUnknown, "AwaitingUpdate", "the peer has sent no update yet")
	default:
		set(v1alpha1.ConditionImportsAccepted, true, "Accepted", "the peer's last update was accepted")
	}
	switch {
	case s.LastNACKReceived != "":
		set(v1alpha1.ConditionExportsAccepted, false, "RefusedByPeer", s.LastNACKReceived)
	case !answered(s):
		setStatus(v1alpha1.ConditionExportsAccepted, metav1.ConditionUnknown, "AwaitingAcknowledgement", "awaiting the peer's acknowledgement of this side's first update")
	default:
		set(v1alpha1.ConditionExportsAccepted, true, "Accepted", "the peer accepted the last update")
	}
	if m.cfg.ImportProblems != nil {
		switch problems := m.cfg.ImportProblems(e.p.name); {
		case len(problems) > 0:
			set(v1alpha1.ConditionImportsWritten, false, "Skipped", summarize(problems, maxReasonBytes))
		case m.cfg.ImportsWriting != nil && m.cfg.ImportsWriting(e.p.name):
			set(v1alpha1.ConditionImportsWritten, false, "Writing", "the imports are still being written to this cluster")
		default:
			set(v1alpha1.ConditionImportsWritten, true, "Written", "every import is written to this cluster")
		}
	}
	st.Conditions = conds
	return st
}

// answered reports whether the peer answered an update of every type
// this side sent it, and of at least one.
func answered(s PeerStatus) bool {
	if len(s.Acknowledged) == 0 {
		return false
	}
	for t := range s.Sent {
		if _, ok := s.Acknowledged[t]; !ok {
			return false
		}
	}
	return true
}

// maxConditionMessage bounds a condition's message well inside the API's
// 32,768 bytes: a status the API server refuses is not written at all.
const maxConditionMessage = 4096

// summarize joins items while they fit in about n bytes, then counts the
// rest.
func summarize(items []string, n int) string {
	var b strings.Builder
	for i, it := range items {
		if i > 0 && b.Len()+len(it) > n {
			fmt.Fprintf(&b, "; and %d more", len(items)-i)
			break
		}
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(it)
	}
	return b.String()
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// writeStatus patches the FederationPeer's status when it changed.
func (m *Manager) writeStatus(ctx context.Context, e *peerEntry, now time.Time) {
	st := m.peerStatus(e, now)
	if old := e.written; old != nil {
		cmp := st.DeepCopy()
		cmp.LastHeartbeat = old.LastHeartbeat
		heartbeatFresh := st.LastHeartbeat == nil || (old.LastHeartbeat != nil && st.LastHeartbeat.Sub(old.LastHeartbeat.Time) < heartbeatWriteInterval)
		if heartbeatFresh && equality.Semantic.DeepEqual(cmp, old) {
			return
		}
	}
	body, err := statusPatch(st)
	if err == nil {
		_, err = m.dyn.Resource(v1alpha1.Resource).Patch(ctx, e.p.name, types.MergePatchType, body, metav1.PatchOptions{}, "status")
	}
	if err != nil {
		// Said once per distinct failure: status is written every
		// StatusInterval.
		if msg := err.Error(); msg != e.writeErr {
			m.log.Warn("write FederationPeer status", "peer", e.p.name, "err", fmt.Errorf("patch: %w", err))
			e.writeErr = msg
		}
		return
	}
	e.writeErr = ""
	e.written = &st
	e.conditions = st.Conditions
}

// statusPatch is a JSON merge patch that sets the status to st, with
// explicit nulls for the optional fields st leaves out, since a merge
// patch would otherwise keep their old values.
func statusPatch(st v1alpha1.FederationPeerStatus) ([]byte, error) {
	raw, err := json.Marshal(st)
	if err != nil {
		return nil, err
	}
	var fields map[string]any
	if err := json.Unmarshal(raw, &fields); err != nil {
		return nil, err
	}
	for _, k := range []string{"lastHeartbeat", "disconnectedSince", "bundle"} {
		if _, ok := fields[k]; !ok {
			fields[k] = nil
		}
	}
	// Counts are omitted when zero, and a zero must overwrite the old count.
	for _, k := range []string{"importedServices", "exportedServices"} {
		if _, ok := fields[k]; !ok {
			fields[k] = 0
		}
	}
	return json.Marshal(map[string]any{"status": fields})
}
