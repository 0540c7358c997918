package authz

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	securityv1beta1 "istio.io/api/security/v1beta1"
)

func peer(mode securityv1beta1.PeerAuthentication_MutualTLS_Mode) *securityv1beta1.PeerAuthentication_MutualTLS {
	return &securityv1beta1.PeerAuthentication_MutualTLS{Mode: mode}
}

const (
	unset      = securityv1beta1.PeerAuthentication_MutualTLS_UNSET
	disable    = securityv1beta1.PeerAuthentication_MutualTLS_DISABLE
	permissive = securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE
	strict     = securityv1beta1.PeerAuthentication_MutualTLS_STRICT
)

// mtlsOfPod is the MTLS of pod's set; the zero MTLS when it has none.
func mtlsOfPod(t *testing.T, s *Store, pod string) MTLS {
	t.Helper()
	set, ok := s.Snapshot().Pod(pod)
	if !ok {
		return MTLS{}
	}
	return set.MTLS
}

// Istio's composition of PeerAuthentications: mesh (root namespace, no
// selector), then namespace, then workload, an unset mode inheriting;
// the oldest of a level decides; portLevelMtls only from the workload
// policy, an unset port inheriting; a root-namespace selector selects
// nothing; DISABLE reads as PERMISSIVE; with none, STRICT (Isthmus's
// default, where Istio's is PERMISSIVE).
func TestPeerAuthenticationComposes(t *testing.T) {
	s := NewStore("mesh-root")
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s.SetPod("demo", "web-0", map[string]string{"app": "web"})
	s.SetPod("demo", "db-0", map[string]string{"app": "db"})
	s.SetPod("other", "web-0", map[string]string{"app": "web"})
	s.SetPod("mesh-root", "x-0", map[string]string{"app": "web"})
	require.Equal(t, "STRICT", mtlsOfPod(t, s, "demo/web-0").String())
	_, ok := s.Snapshot().Pod("demo/web-0")
	require.False(t, ok, "no policy: no set")

	s.SetPeerAuthentication(PeerPolicy{Namespace: "mesh-root", Name: "mesh", Created: t0,
		Spec: &securityv1beta1.PeerAuthentication{Mtls: peer(permissive)}})
	for _, pod := range []string{"demo/web-0", "demo/db-0", "other/web-0", "mesh-root/x-0"} {
		require.Equal(t, "PERMISSIVE", mtlsOfPod(t, s, pod).String(), pod)
	}
	// The namespace's overrides the mesh's; unset inherits it.
	s.SetPeerAuthentication(PeerPolicy{Namespace: "demo", Name: "ns", Created: t0,
		Spec: &securityv1beta1.PeerAuthentication{Mtls: peer(strict)}})
	s.SetPeerAuthentication(PeerPolicy{Namespace: "other", Name: "ns", Created: t0,
		Spec: &securityv1beta1.PeerAuthentication{Mtls: peer(unset)}})
	require.Equal(t, "STRICT", mtlsOfPod(t, s, "demo/web-0").String())
	require.Equal(t, "PERMISSIVE", mtlsOfPod(t, s, "other/web-0").String())
	// A newer namespace-wide policy does not decide.
	s.SetPeerAuthentication(PeerPolicy{Namespace: "demo", Name: "a-newer", Created: t0.Add(time.Hour),
		Spec: &securityv1beta1.PeerAuthentication{Mtls: peer(permissive)}})
	require.Equal(t, "STRICT", mtlsOfPod(t, s, "demo/web-0").String())

	// The workload's, with ports: an unset port inherits (so changes
	// nothing), DISABLE is PERMISSIVE.
	s.SetPeerAuthentication(PeerPolicy{Namespace: "demo", Name: "web", Created: t0,
		Spec: &securityv1beta1.PeerAuthentication{Selector: selector("web"), Mtls: peer(unset),
			PortLevelMtls: map[uint32]*securityv1beta1.PeerAuthentication_MutualTLS{
				8080: peer(disable), 9000: peer(unset), 9090: peer(strict), 7070: peer(permissive),
			}}})
	m := mtlsOfPod(t, s, "demo/web-0")
	require.Equal(t, "STRICT,7070=PERMISSIVE,8080=PERMISSIVE", m.String())
	require.Equal(t, []uint16{7070, 8080}, m.Ports())
	require.Equal(t, Permissive, m.PortMode(8080))
	require.Equal(t, Strict, m.PortMode(9000))
	require.True(t, m.Plaintext())
	require.Equal(t, "STRICT", mtlsOfPod(t, s, "demo/db-0").String())
	// A root-namespace selector selects nothing, not even there.
	s.SetPeerAuthentication(PeerPolicy{Namespace: "mesh-root", Name: "webs", Created: t0,
		Spec: &securityv1beta1.PeerAuthentication{Selector: selector("web"), Mtls: peer(strict)}})
	require.Equal(t, "PERMISSIVE", mtlsOfPod(t, s, "other/web-0").String())
	require.Equal(t, "PERMISSIVE", mtlsOfPod(t, s, "mesh-root/x-0").String())

	// Pods with the same policies and mTLS share a set; mTLS alone
	// makes one, and a different mTLS another.
	s.SetPod("demo", "web-1", map[string]string{"app": "web"})
	a, _ := s.Snapshot().Pod("demo/web-0")
	b, _ := s.Snapshot().Pod("demo/web-1")
	require.Same(t, a, b)
	require.Empty(t, a.Policies)
	c, _ := s.Snapshot().Pod("other/web-0")
	require.NotEqual(t, a.Key, c.Key)

	notes := s.Snapshot().PeerNotes()
	var refs []string
	for _, n := range notes {
		refs = append(refs, n.Policy+": "+n.Reason)
	}
	require.Len(t, notes, 3, refs)
	require.Contains(t, refs[0], "demo/a-newer: demo/ns, older, is the namespace-wide policy of demo")
	require.Contains(t, refs[1], "demo/web: port 8080: mode DISABLE is read as PERMISSIVE")
	require.Contains(t, refs[2], "mesh-root/webs: a selector in the root namespace")

	// Deleting returns the pods to the defaults, and to no set.
	v := s.Snapshot().Version
	s.DeletePeerAuthentication("mesh-root", "mesh")
	require.NotEqual(t, v, s.Snapshot().Version)
	require.Equal(t, "STRICT", mtlsOfPod(t, s, "other/web-0").String())
	_, ok = s.Snapshot().Pod("other/web-0")
	require.False(t, ok)
	s.DeletePeerAuthentication("demo", "web")
	_, ok = s.Snapshot().Pod("demo/web-0")
	require.False(t, ok)
}

// BenchmarkPeerAuthenticationChange is the store's work when a
// namespace-wide PeerAuthentication of one of 10 namespaces is set and
// deleted in turn, with 30,000 pods (each change gives the namespace's
// 3,000 pods another set), and the snapshot after it. Run with
//
//	go test -run '^$' -bench PeerAuthenticationChange -benchmem ./pkg/authz/
func BenchmarkPeerAuthenticationChange(b *testing.B) {
	s := NewStore("")
	for i := range 30000 {
		s.SetPod(fmt.Sprintf("ns-%02d", i%10), fmt.Sprintf("pod-%d", i), map[string]string{"app": fmt.Sprintf("app-%d", i%1000)})
	}
	s.SetSynced()
	p := PeerPolicy{Namespace: "ns-00", Name: "default", Spec: &securityv1beta1.PeerAuthentication{Mtls: peer(permissive)}}
	i := 0
	for b.Loop() {
		if i%2 == 0 {
			s.SetPeerAuthentication(p)
		} else {
			s.DeletePeerAuthentication(p.Namespace, p.Name)
		}
		_ = s.Snapshot()
		i++
	}
}
