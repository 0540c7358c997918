package federation

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8stesting "k8s.io/client-go/testing"
	clocktesting "k8s.io/utils/clock/testing"

	fedv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"

	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
)

var updateGolden = flag.Bool("update", false, "rewrite the golden files under testdata/ from the output")

// golden compares got with testdata/name, or rewrites it with -update.
func golden(t testing.TB, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *updateGolden {
		require.NoError(t, os.MkdirAll("testdata", 0o755))
		require.NoError(t, os.WriteFile(path, got, 0o644))
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err, "run `go test ./pkg/federation -run %s -update` to create it", t.Name())
	require.Equal(t, string(want), string(got), "%s differs; rerun with -update if the change is intended", path)
}

// statusNow is the clock every status test reads ages against.
var statusNow = time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)

func ago(d time.Duration) *metav1.Time {
	t := metav1.NewTime(statusNow.Add(-d))
	return &t
}

func cond(typ string, status metav1.ConditionStatus, reason, msg string) metav1.Condition {
	return metav1.Condition{Type: typ, Status: status, Reason: reason, Message: msg, LastTransitionTime: *ago(time.Hour), ObservedGeneration: 1}
}

// statusPeers covers every state a peer's status can be in, by name.
func statusPeers() []v1alpha1.FederationPeer {
	peer := func(name string, st v1alpha1.FederationPeerStatus) v1alpha1.FederationPeer {
		return v1alpha1.FederationPeer{
			TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.GroupVersion.String(), Kind: "FederationPeer"},
			ObjectMeta: metav1.ObjectMeta{Name: name, Generation: 1},
			Spec: v1alpha1.FederationPeerSpec{
				TrustDomain: name + ".mesh", FederatorID: "spiffe://" + name + ".mesh/ns/isthmus-system/sa/isthmus-federator",
				Addresses: []string{name + ".example:15443"},
			},
			Status: st,
		}
	}
	versions := func(v string) map[string]string {
		return map[string]string{TypeService: v, TypeBundle: "b0b0b0b0b0b0b0b0"}
	}
	healthy := []metav1.Condition{
		cond(v1alpha1.ConditionEstablished, metav1.ConditionTrue, "Established", "the link was established and both bundles are held"),
		cond(v1alpha1.ConditionConnected, metav1.ConditionTrue, "StreamUp", "the exchange stream is up"),
		cond(v1alpha1.ConditionImportsAccepted, metav1.ConditionTrue, "Accepted", "the peer's last update was accepted"),
		cond(v1alpha1.ConditionExportsAccepted, metav1.ConditionTrue, "Accepted", "the peer accepted the last update"),
	}
	return []v1alpha1.FederationPeer{
		// Connected and in step: nothing below the table.
		peer("b", v1alpha1.FederationPeerStatus{
			State: v1alpha1.StateConnected, LastHeartbeat: ago(3 * time.Second),
			ImportedServices: 4, ExportedServices: 2,
			Sent: versions("3f9a1c2e7d4b5a60"), Acknowledged: versions("3f9a1c2e7d4b5a60"), Received: versions("77aa00bb11cc22dd"),
			Bundle:     &v1alpha1.BundleStatus{Sequence: 3, Roots: 2, Expires: ago(-89 * 24 * time.Hour)},
			Conditions: healthy,
		}),
		// Lost a while ago, one update unacknowledged, a NACK each way
		// (one message spread over lines), a bundle past its expiry.
		peer("c", v1alpha1.FederationPeerStatus{
			State: v1alpha1.StateDisconnected, LastHeartbeat: ago(5*time.Minute + 10*time.Second),
			DisconnectedSince: ago(5*time.Minute + 2*time.Second), ImportedServices: 1, ExportedServices: 2,
			Sent: versions("9e8d7c6b5a493827"), Acknowledged: versions("3f9a1c2e7d4b5a60"),
			Bundle: &v1alpha1.BundleStatus{Sequence: 2, Roots: 1, Expires: ago(2 * time.Hour)},
			Conditions: []metav1.Condition{
				healthy[0],
				cond(v1alpha1.ConditionConnected, metav1.ConditionFalse, "Disconnected", "dial c.example:15443: connection refused"),
				cond(v1alpha1.ConditionImportsAccepted, metav1.ConditionFalse, "Refused", "demo/echo:\n  300 identities, more than 256"),
				cond(v1alpha1.ConditionExportsAccepted, metav1.ConditionFalse, "RefusedByPeer", "demo/api: namespace demo is reserved"),
				cond(v1alpha1.ConditionImportsWritten, metav1.ConditionFalse, "Skipped", "shop/cart: no namespace shop"),
			},
		}),
		// Refused at establishment: never connected, nothing exchanged.
		peer("d", v1alpha1.FederationPeerStatus{
			State: v1alpha1.StateFailed,
			Conditions: []metav1.Condition{
				cond(v1alpha1.ConditionEstablished, metav1.ConditionFalse, "Refused", "invalid peering token: it expired at 2026-11-22T10:00:00Z"),
				cond(v1alpha1.ConditionConnected, metav1.ConditionUnknown, "", ""),
			},
		}),
		// Just joined: the federator has not written any status yet.
		peer("e", v1alpha1.FederationPeerStatus{}),
	}
}

func TestWriteStatusTable(t *testing.T) {
	var buf bytes.Buffer
	require.NoError(t, WriteStatusTable(&buf, statusPeers(), statusNow))
	golden(t, "status.txt", buf.Bytes())

	buf.Reset()
	require.NoError(t, WriteStatusTable(&buf, nil, statusNow))
	golden(t, "status-empty.txt", buf.Bytes())
}

func TestWriteStatusJSON(t *testing.T) {
	var buf bytes.Buffer
	require.NoError(t, WriteStatusJSON(&buf, statusPeers()))
	golden(t, "status.json", buf.Bytes())

	// What a script reads back is the FederationPeers' own spec and status.
	var got struct {
		Peers []struct {
			Name   string                        `json:"name"`
			Spec   v1alpha1.FederationPeerSpec   `json:"spec"`
			Status v1alpha1.FederationPeerStatus `json:"status"`
		} `json:"peers"`
	}
	require.NoError(t, json.Unmarshal(buf.Bytes(), &got))
	want := statusPeers()
	require.Len(t, got.Peers, len(want))
	for i, p := range got.Peers {
		require.Equal(t, want[i].Name, p.Name)
		require.Equal(t, want[i].Spec, p.Spec)
		require.Equal(t, want[i].Status.Sent, p.Status.Sent)
		require.Equal(t, want[i].Status.State, p.Status.State)
	}

	buf.Reset()
	require.NoError(t, WriteStatusJSON(&buf, nil))
	require.JSONEq(t, `{"peers": []}`, buf.String(), "no peers is an empty list, not null")
}

func TestPeerStatusesSortedByName(t *testing.T) {
	peers := statusPeers()
	var objs []runtime.Object
	for _, i := range []int{2, 0, 3, 1} {
		u, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&peers[i])
		require.NoError(t, err)
		objs = append(objs, &unstructured.Unstructured{Object: u})
	}
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{v1alpha1.Resource: "FederationPeerList"}, objs...)

	got, err := PeerStatuses(t.Context(), dyn)
	require.NoError(t, err)
	require.Len(t, got, len(peers))
	for i := range peers {
		require.Equal(t, peers[i].Name, got[i].Name)
		require.Equal(t, peers[i].Spec, got[i].Spec)
		require.Equal(t, peers[i].Status.State, got[i].Status.State)
		require.Equal(t, peers[i].Status.Sent, got[i].Status.Sent)
		if want := peers[i].Status.Bundle; want == nil {
			require.Nil(t, got[i].Status.Bundle)
		} else {
			require.Equal(t, want.Sequence, got[i].Status.Bundle.Sequence)
			require.True(t, want.Expires.Equal(got[i].Status.Bundle.Expires))
		}
		require.Len(t, got[i].Status.Conditions, len(peers[i].Status.Conditions))
	}

	// Without the CRD the error says what is missing.
	dyn.PrependReactor("list", "federationpeers", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewNotFound(v1alpha1.Resource.GroupResource(), "")
	})
	_, err = PeerStatuses(t.Context(), dyn)
	require.ErrorContains(t, err, "is Isthmus installed")
}

// One type's answer does not hide another type's standing refusal, in
// either direction.
func TestRefusalsKeptByType(t *testing.T) {
	tr := newTracker()
	tr.acked(TypeBundle, "", &fedv1.Error{Resource: "a.mesh", Reason: "bad root"}, 0)
	tr.acked(TypeService, "v1", nil, 3)
	require.Equal(t, "a.mesh: bad root", tr.Snapshot().LastNACKReceived)
	tr.acked(TypeBundle, "b1", nil, 0)
	require.Empty(t, tr.Snapshot().LastNACKReceived)

	tr.nackSent(TypeBundle, &fedv1.Error{Resource: "b.mesh", Reason: "no roots"})
	tr.received(TypeService, "v2")
	require.Equal(t, "b.mesh: no roots", tr.Snapshot().LastNACKSent)
	tr.nackSent(TypeService, &fedv1.Error{Resource: "demo/x", Reason: "no ports"})
	require.Equal(t, "demo/x: no ports; b.mesh: no roots", tr.Snapshot().LastNACKSent, "in type order")
	tr.received(TypeBundle, "b2")
	require.Equal(t, "demo/x: no ports", tr.Snapshot().LastNACKSent)
}

// Condition messages stay far inside the API's 32,768 bytes, whatever the
// peer sends or however many imports are skipped: a status the API server
// refuses is not written at all, and status froze.
func TestConditionMessagesBounded(t *testing.T) {
	var problems []string
	for i := range 600 {
		problems = append(problems, fmt.Sprintf("demo-%03d/svc: namespace demo-%03d does not exist in this cluster", i, i))
	}
	m := &Manager{cfg: Config{ImportProblems: func(string) []string { return problems }}}
	p := newPeer("a", spiffeid.RequireTrustDomainFromString("a.mesh"), spiffeid.RequireFromString("spiffe://a.mesh/fed"), clocktesting.NewFakeClock(statusNow), nil)
	p.tracker.acked(TypeService, "", &fedv1.Error{Resource: "demo/x", Reason: strings.Repeat("é", 40000)}, 0)
	st := m.peerStatus(&peerEntry{p: p}, statusNow)
	for _, c := range st.Conditions {
		require.LessOrEqual(t, len(c.Message), maxConditionMessage, c.Type)
		require.True(t, utf8.ValidString(c.Message), c.Type)
	}
	written := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionImportsWritten)
	require.True(t, strings.HasPrefix(written.Message, problems[0]+"; "+problems[1]), written.Message)
	require.Regexp(t, `; and \d+ more$`, written.Message)
	refused := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionExportsAccepted)
	require.LessOrEqual(t, len(refused.Message), maxReasonBytes)
	require.Regexp(t, `^demo/x: é+… \(\d+ more bytes\)$`, refused.Message)
}

// ImportsWritten says Writing while the import writer is still writing
// the peer's imports, Skipped (which takes precedence: it names what to
// fix) when something could not be written, and Written otherwise.
func TestImportsWrittenCondition(t *testing.T) {
	var problems []string
	writing := false
	m := &Manager{cfg: Config{
		ImportProblems: func(string) []string { return problems },
		ImportsWriting: func(peer string) bool { return writing && peer == "a" },
	}}
	p := newPeer("a", spiffeid.RequireTrustDomainFromString("a.mesh"), spiffeid.RequireFromString("spiffe://a.mesh/fed"), clocktesting.NewFakeClock(statusNow), nil)
	condition := func() (metav1.ConditionStatus, string) {
		c := meta.FindStatusCondition(m.peerStatus(&peerEntry{p: p}, statusNow).Conditions, v1alpha1.ConditionImportsWritten)
		return c.Status, c.Reason
	}
	for _, tc := range []struct {
		writing  bool
		problems []string
		status   metav1.ConditionStatus
		reason   string
	}{
		{false, nil, metav1.ConditionTrue, "Written"},
		{true, nil, metav1.ConditionFalse, "Writing"},
		{true, []string{"demo/x: namespace demo does not exist in this cluster"}, metav1.ConditionFalse, "Skipped"},
		{false, []string{"demo/x: namespace demo does not exist in this cluster"}, metav1.ConditionFalse, "Skipped"},
	} {
		writing, problems = tc.writing, tc.problems
		status, reason := condition()
		require.Equal(t, tc.status, status, "writing %t, problems %v", tc.writing, tc.problems)
		require.Equal(t, tc.reason, reason, "writing %t, problems %v", tc.writing, tc.problems)
	}
}

// A FederationPeer stored before the CRD checked its durations does not
// fail `federator status` for every peer: it is a row of its own, with
// the field and its value named below the table and in the JSON, and the
// other peers are shown as usual.
func TestPeerStatusesShowsAPeerItCannotRead(t *testing.T) {
	peers := statusPeers()
	var objs []runtime.Object
	for i := range peers {
		u, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&peers[i])
		require.NoError(t, err)
		objs = append(objs, &unstructured.Unstructured{Object: u})
	}
	// east: never reported on by a federator; west: its federator said
	// the spec is not accepted, with an older value.
	east, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&peers[0])
	require.NoError(t, err)
	east["metadata"] = map[string]any{"name": "east"}
	delete(east, "status")
	require.NoError(t, unstructured.SetNestedField(east, "10 minutes", "spec", "staleness", "keepFor"))
	west, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&peers[1])
	require.NoError(t, err)
	west["metadata"] = map[string]any{"name": "west"}
	require.NoError(t, unstructured.SetNestedField(west, "2 hours", "spec", "staleness", "drainFor"))
	require.NoError(t, unstructured.SetNestedField(west, "1h", "spec", "staleness", "keepFor"))
	require.NoError(t, unstructured.SetNestedSlice(west, []any{map[string]any{
		"type": v1alpha1.ConditionAccepted, "status": "False", "reason": v1alpha1.ReasonInvalidSpec,
		"message": "spec.staleness.drainFor: old", "lastTransitionTime": "2026-11-22T11:00:00Z",
	}}, "status", "conditions"))
	objs = append(objs, &unstructured.Unstructured{Object: east}, &unstructured.Unstructured{Object: west})
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{v1alpha1.Resource: "FederationPeerList"}, objs...)

	got, err := PeerStatuses(t.Context(), dyn)
	require.NoError(t, err)
	var names []string
	for _, p := range got {
		names = append(names, p.Name)
	}
	require.Equal(t, []string{"b", "c", "d", "e", "east", "west"}, names)
	byName := func(name string) v1alpha1.FederationPeer {
		for _, p := range got {
			if p.Name == name {
				return p
			}
		}
		t.Fatalf("no %s", name)
		return v1alpha1.FederationPeer{}
	}
	require.Nil(t, meta.FindStatusCondition(byName("b").Status.Conditions, v1alpha1.ConditionAccepted), "a peer that reads is left as it is")

	e := byName("east")
	require.Equal(t, "b.mesh", e.Spec.TrustDomain, "what reads is kept")
	require.Nil(t, e.Spec.Staleness.KeepFor)
	c := meta.FindStatusCondition(e.Status.Conditions, v1alpha1.ConditionAccepted)
	require.NotNil(t, c)
	require.Equal(t, metav1.ConditionFalse, c.Status)
	require.Equal(t, v1alpha1.ReasonInvalidSpec, c.Reason)
	require.Contains(t, c.Message, `spec.staleness.keepFor: "10 minutes" is not a duration`)

	w := byName("west")
	require.Equal(t, time.Hour, w.Spec.Staleness.KeepFor.Duration, "the field that reads is kept")
	c = meta.FindStatusCondition(w.Status.Conditions, v1alpha1.ConditionAccepted)
	require.Contains(t, c.Message, `spec.staleness.drainFor: "2 hours" is not a duration`, "the object as it is now")
	require.NotContains(t, c.Message, "keepFor")
	require.True(t, c.LastTransitionTime.Equal(ago(time.Hour)), "still False since the federator said so")
	require.Equal(t, v1alpha1.StateDisconnected, w.Status.State, "the status the federator wrote is kept")

	var buf bytes.Buffer
	require.NoError(t, WriteStatusTable(&buf, got, statusNow))
	out := buf.String()
	require.Regexp(t, `(?m)^east +- +b\.mesh +never `, out)
	require.Regexp(t, `(?m)^west +Disconnected +c\.mesh `, out)
	require.Contains(t, out, `  east: Accepted: InvalidSpec: spec.staleness.keepFor: "10 minutes" is not a duration`)
	require.Contains(t, out, `  west: Accepted: InvalidSpec: spec.staleness.drainFor: "2 hours" is not a duration`)

	buf.Reset()
	require.NoError(t, WriteStatusJSON(&buf, got))
	var report struct {
		Peers []struct {
			Name   string                        `json:"name"`
			Status v1alpha1.FederationPeerStatus `json:"status"`
		} `json:"peers"`
	}
	require.NoError(t, json.Unmarshal(buf.Bytes(), &report))
	require.Len(t, report.Peers, 6)
	require.Equal(t, "east", report.Peers[4].Name)
	c = meta.FindStatusCondition(report.Peers[4].Status.Conditions, v1alpha1.ConditionAccepted)
	require.NotNil(t, c)
	require.Contains(t, c.Message, `spec.staleness.keepFor: "10 minutes"`)
}

// A condition that is Unknown with a reason (a peer that has not answered
// yet) is listed below the table as a False one is; one without a reason
// (nothing known at all) is not.
func TestWriteStatusTableListsUnknownWithAReason(t *testing.T) {
	p := statusPeers()[0]
	p.Status.Conditions = []metav1.Condition{
		cond(v1alpha1.ConditionConnected, metav1.ConditionTrue, "StreamUp", "the exchange stream is up"),
		cond(v1alpha1.ConditionImportsAccepted, metav1.ConditionUnknown, "", ""),
		cond(v1alpha1.ConditionExportsAccepted, metav1.ConditionUnknown, "AwaitingAcknowledgement", "the peer has not answered yet"),
	}
	var buf bytes.Buffer
	require.NoError(t, WriteStatusTable(&buf, []v1alpha1.FederationPeer{p}, statusNow))
	require.Contains(t, buf.String(), "\n  b: ExportsAccepted: AwaitingAcknowledgement: the peer has not answered yet\n")
	require.NotContains(t, buf.String(), "ImportsAccepted")
	require.NotContains(t, buf.String(), "b: Connected")
}

// A spec changed since the federator last wrote the status (its
// Accepted condition observed an older generation) is said below the
// table; a current one, or one the federator never wrote, is not.
func TestWriteStatusTableSaysASpecIsNotActedOnYet(t *testing.T) {
	p := statusPeers()[0]
	p.Generation = 3
	accepted := cond(v1alpha1.ConditionAccepted, metav1.ConditionTrue, "Accepted", "the spec is valid and the link runs as it says")
	accepted.ObservedGeneration = 2
	p.Status.Conditions = []metav1.Condition{accepted}
	var buf bytes.Buffer
	require.NoError(t, WriteStatusTable(&buf, []v1alpha1.FederationPeer{p}, statusNow))
	require.Contains(t, buf.String(), "\n  b: the status is of spec generation 2 and the spec is at 3: the federator has not acted on the change yet\n")

	for _, g := range []int64{3, 0} {
		p.Status.Conditions[0].ObservedGeneration = g
		buf.Reset()
		require.NoError(t, WriteStatusTable(&buf, []v1alpha1.FederationPeer{p}, statusNow))
		require.NotContains(t, buf.String(), "has not acted", "observedGeneration %d", g)
	}
}
