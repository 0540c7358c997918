package federation

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/duration"
	"k8s.io/client-go/dynamic"

	"github.com/isthmus-mesh/isthmus/internal/clip"
	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
)

// noPeersMessage is what `federator status` prints when the cluster has no
// FederationPeer.
const noPeersMessage = "no FederationPeers: link a cluster with `federator token create` / `federator join`"

// statusVersionLen is how much of a version `federator status` shows:
// enough to tell versions apart by eye, as git's short hashes do.
const statusVersionLen = 8

// PeerStatuses reads every FederationPeer of the cluster, sorted by name,
// as the running federator last wrote their status.
//
// One FederationPeer that cannot be read as v1alpha1 (a value stored
// before the CRD checked it, such as a staleness duration Go cannot
// parse) does not fail the list: it comes back with what could be read
// and an Accepted condition, False with reason InvalidSpec, naming each
// field and its value, whether or not its federator has said so yet.
func PeerStatuses(ctx context.Context, dyn dynamic.Interface) ([]v1alpha1.FederationPeer, error) {
	list, err := dyn.Resource(v1alpha1.Resource).List(ctx, metav1.ListOptions{})
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("list FederationPeers: %w: is Isthmus installed in this cluster (the FederationPeer CRD of deploy/crds)?", err)
	}
	if err != nil {
		return nil, fmt.Errorf("list FederationPeers: %w", err)
	}
	peers := make([]v1alpha1.FederationPeer, len(list.Items))
	for i := range list.Items {
		fp, err := decodePeer(&list.Items[i])
		if err != nil {
			meta.SetStatusCondition(&fp.Status.Conditions, metav1.Condition{
				Type: v1alpha1.ConditionAccepted, Status: metav1.ConditionFalse,
				Reason: v1alpha1.ReasonInvalidSpec, Message: clip.String(err.Error(), maxConditionMessage),
				ObservedGeneration: fp.Generation,
			})
		}
		peers[i] = *fp
	}
	slices.SortFunc(peers, func(a, b v1alpha1.FederationPeer) int { return strings.Compare(a.Name, b.Name) })
	return peers, nil
}

// WriteStatusTable prints one row per peer, ages relative to now:
//
//	NAME  STATE  TRUST DOMAIN  LAST HEARTBEAT  STALE  IMPORTED  EXPORTED  SENT/ACKED  BUNDLE
//
// STALE is how long the peer has been disconnected (its imports are
// drained staleness.keepFor after it), SENT/ACKED the short versions of the
// services this side last sent and the peer last acknowledged, BUNDLE the
// sequence and expiry of the peer's trust bundle as this side holds it.
// Below the table, every condition that is False is printed as
// "  <peer>: <Type>: <Reason>: <Message>": that is where a refused
// establishment, the last NACK either way, skipped imports and a spec the
// federator does not accept (Accepted) show, and a spec changed since the
// federator last wrote the status (its Accepted condition's
// observedGeneration is behind metadata.generation: the federator is
// down, or has not got to it). Without peers it says how to link one.
func WriteStatusTable(w io.Writer, peers []v1alpha1.FederationPeer, now time.Time) error {
	if len(peers) == 0 {
		_, err := fmt.Fprintln(w, noPeersMessage)
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATE\tTRUST DOMAIN\tLAST HEARTBEAT\tSTALE\tIMPORTED\tEXPORTED\tSENT/ACKED\tBUNDLE")
	for i := range peers {
		p := &peers[i]
		st := &p.Status
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\t%s\n",
			p.Name, statusOrDash(st.State), statusOrDash(p.Spec.TrustDomain),
			statusHeartbeat(st.LastHeartbeat, now), statusStale(st.DisconnectedSince, now),
			st.ImportedServices, st.ExportedServices,
			statusVersions(st.Sent[TypeService], st.Acknowledged[TypeService]),
			statusBundle(st.Bundle, now))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	var problems []string
	for i := range peers {
		p := &peers[i]
		if c := meta.FindStatusCondition(p.Status.Conditions, v1alpha1.ConditionAccepted); c != nil && c.ObservedGeneration > 0 && c.ObservedGeneration < p.Generation {
			problems = append(problems, fmt.Sprintf("  %s: the status is of spec generation %d and the spec is at %d: the federator has not acted on the change yet", p.Name, c.ObservedGeneration, p.Generation))
		}
		for _, c := range p.Status.Conditions {
			// False, and Unknown with a reason (a peer that has not
			// answered yet: AwaitingAcknowledgement, AwaitingUpdate).
			if c.Status == metav1.ConditionTrue || c.Status == metav1.ConditionUnknown && c.Reason == "" {
				continue
			}
			parts := []string{p.Name, c.Type}
			if c.Reason != "" {
				parts = append(parts, c.Reason)
			}
			if msg := strings.Join(strings.Fields(c.Message), " "); msg != "" {
				parts = append(parts, msg)
			}
			problems = append(problems, "  "+strings.Join(parts, ": "))
		}
	}
	if len(problems) == 0 {
		return nil
	}
	_, err := fmt.Fprintf(w, "\n%s\n", strings.Join(problems, "\n"))
	return err
}

// statusReport is the JSON form of `federator status -o json`. Its fields
// are a FederationPeer's own API fields, so the output is as stable as the
// v1alpha1 API: consumers may rely on them and on the order (by name).
type statusReport struct {
	Peers []peerReport `json:"peers"`
}

type peerReport struct {
	Name string `json:"name"`
	// Generation is metadata.generation, which the conditions'
	// observedGeneration is compared with.
	Generation int64                         `json:"generation"`
	Spec       v1alpha1.FederationPeerSpec   `json:"spec"`
	Status     v1alpha1.FederationPeerStatus `json:"status"`
}

// WriteStatusJSON prints the peers as one indented JSON document:
//
//	{"peers": [{"name": "b", "generation": 1, "spec": {...}, "status": {...}}, ...]}
//
// spec and status are the FederationPeer's, exactly as the API server
// holds them (see pkg/apis/federation/v1alpha1), but for a field that
// cannot be read: it is left out of spec and named, with its value, in a
// False Accepted condition (see PeerStatuses). "peers" is an empty list,
// never null, when there are none.
func WriteStatusJSON(w io.Writer, peers []v1alpha1.FederationPeer) error {
	r := statusReport{Peers: make([]peerReport, 0, len(peers))}
	for _, p := range peers {
		r.Peers = append(r.Peers, peerReport{Name: p.Name, Generation: p.Generation, Spec: p.Spec, Status: p.Status})
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

func statusOrDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// statusAge is how long before now t was, kubectl style ("3s", "5m2s",
// "2d3h"); a t in the future (clock skew between clusters' writers and
// this reader) counts as now.
func statusAge(t time.Time, now time.Time) string {
	return duration.HumanDuration(max(now.Sub(t), 0))
}

func statusHeartbeat(t *metav1.Time, now time.Time) string {
	if t == nil {
		return "never"
	}
	return statusAge(t.Time, now) + " ago"
}

func statusStale(since *metav1.Time, now time.Time) string {
	if since == nil {
		return "-"
	}
	return statusAge(since.Time, now)
}

func statusVersions(sent, acked string) string {
	if sent == "" && acked == "" {
		return "-"
	}
	short := func(v string) string {
		if v == "" {
			return "-"
		}
		return v[:min(len(v), statusVersionLen)]
	}
	return "sent=" + short(sent) + " acked=" + short(acked)
}

func statusBundle(b *v1alpha1.BundleStatus, now time.Time) string {
	if b == nil {
		return "-"
	}
	s := fmt.Sprintf("seq %d", b.Sequence)
	switch {
	case b.Expires == nil:
	case b.Expires.After(now):
		s += ", expires in " + duration.HumanDuration(b.Expires.Sub(now))
	default:
		s += ", expired " + statusAge(b.Expires.Time, now) + " ago"
	}
	return s
}
