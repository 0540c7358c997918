package authz

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"slices"
	"strings"
	"time"

	securityv1beta1 "istio.io/api/security/v1beta1"
)

// PeerPolicy is one PeerAuthentication as the cluster holds it.
type PeerPolicy struct {
	Namespace, Name string
	// Created is the policy's creationTimestamp: of two policies at the
	// same level, the older decides, as in Istio.
	Created time.Time
	// Spec is the policy's spec; never modified once given to a Store.
	Spec *securityv1beta1.PeerAuthentication
}

// Ref is "namespace/name".
func (p PeerPolicy) Ref() string { return p.Namespace + "/" + p.Name }

// Mode is what a pod's sidecar accepts inbound on a port.
type Mode uint8

const (
	// Strict accepts mutual TLS only: Isthmus's default, where Istio's
	// is PERMISSIVE (deny by default).
	Strict Mode = iota
	// Permissive accepts mutual TLS and plaintext. Istio's DISABLE is
	// read as Permissive: Isthmus's sidecars always call each other
	// with mutual TLS, across clusters too, so a port that refused it
	// would refuse every caller in the mesh.
	Permissive
)

func (m Mode) String() string {
	if m == Permissive {
		return "PERMISSIVE"
	}
	return "STRICT"
}

// MTLS is a pod's inbound mutual TLS, as its PeerAuthentications say.
// Comparable; the zero value is Strict on every port.
type MTLS struct {
	// Mode is every port's, but those in Ports.
	Mode Mode
	// ports lists, sorted, the ports whose mode differs from Mode
	// (the workload policy's portLevelMtls), Mode's opposite each.
	ports string
}

// Ports are the ports whose mode is not Mode, in increasing order.
func (m MTLS) Ports() []uint16 {
	out := make([]uint16, 0, len(m.ports)/2)
	for i := 0; i+1 < len(m.ports); i += 2 {
		out = append(out, binary.BigEndian.Uint16([]byte(m.ports[i:i+2])))
	}
	return out
}

// PortMode is port's mode.
func (m MTLS) PortMode(port uint16) Mode {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], port)
	for i := 0; i+1 < len(m.ports); i += 2 {
		if m.ports[i:i+2] == string(b[:]) {
			return 1 - m.Mode
		}
	}
	return m.Mode
}

// Plaintext reports whether any port accepts plaintext.
func (m MTLS) Plaintext() bool { return m.Mode == Permissive || m.ports != "" }

func (m MTLS) String() string {
	var b strings.Builder
	b.WriteString(m.Mode.String())
	for _, p := range m.Ports() {
		fmt.Fprintf(&b, ",%d=%s", p, 1-m.Mode)
	}
	return b.String()
}

// modeOf is a policy's mode for mtls; false when it is unset (the level
// above decides).
func modeOf(mtls *securityv1beta1.PeerAuthentication_MutualTLS) (Mode, bool) {
	switch mtls.GetMode() {
	case securityv1beta1.PeerAuthentication_MutualTLS_STRICT:
		return Strict, true
	case securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE, securityv1beta1.PeerAuthentication_MutualTLS_DISABLE:
		return Permissive, true
	}
	return Strict, false
}

type peerPolicy struct {
	PeerPolicy
	hash [sha256.Size]byte
}

// wide reports whether p applies to its whole namespace (the mesh's, in
// the root namespace): it has no selector, or one without labels.
func (p *peerPolicy) wide() bool { return len(p.Spec.GetSelector().GetMatchLabels()) == 0 }

// older orders policies as Istio picks among them: the oldest first,
// then by name.
func older(a, b *peerPolicy) int {
	return cmp.Or(a.Created.Compare(b.Created), strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
}

// SetPeerAuthentication adds p or replaces the PeerAuthentication of its
// name.
func (s *Store) SetPeerAuthentication(p PeerPolicy) {
	np := &peerPolicy{PeerPolicy: p, hash: specHash(p.Spec, binary.BigEndian.AppendUint64(nil, uint64(p.Created.UnixNano())))}
	s.mu.Lock()
	defer s.mu.Unlock()
	if put(s.peers, p.Namespace, p.Name, np) {
		s.policyChanged(p.Namespace)
		// Its notes may have changed.
		s.changed()
	}
}

// DeletePeerAuthentication forgets the PeerAuthentication
// namespace/name.
func (s *Store) DeletePeerAuthentication(namespace, name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if remove(s.peers, namespace, name) {
		s.policyChanged(namespace)
		s.changed()
	}
}

// mtlsOf is the inbound mutual TLS of a pod of namespace with labels, by
// Istio's composition of PeerAuthentications: the mesh's (the root
// namespace's without a selector), then the namespace's (without a
// selector), then the workload's (a selector of the pod's own
// namespace that matches it), each level's oldest policy deciding and
// an unset mode leaving the level above's; the workload policy's
// portLevelMtls last, an unset port mode being the workload's. With no
// policy, Strict.
func (s *Store) mtlsOf(namespace string, labels map[string]string) MTLS {
	var mesh, ns, wl *peerPolicy
	pick := func(cur, p *peerPolicy) *peerPolicy {
		if cur == nil || older(p, cur) < 0 {
			return p
		}
		return cur
	}
	for _, p := range s.peers[s.root] {
		if p.wide() {
			mesh = pick(mesh, p)
		}
	}
	for _, p := range s.peers[namespace] {
		switch {
		case p.wide():
			if namespace != s.root {
				ns = pick(ns, p)
			}
		case namespace != s.root && selectsLabels(p.Spec.GetSelector().GetMatchLabels(), labels):
			// Istio reads no selector of the root namespace's
			// PeerAuthentications.
			wl = pick(wl, p)
		}
	}
	mode := Strict
	for _, p := range []*peerPolicy{mesh, ns, wl} {
		if p == nil {
			continue
		}
		if m, ok := modeOf(p.Spec.GetMtls()); ok {
			mode = m
		}
	}
	out := MTLS{Mode: mode}
	if wl == nil {
		return out
	}
	var differ []uint16
	for port, mtls := range wl.Spec.GetPortLevelMtls() {
		if m, ok := modeOf(mtls); ok && m != mode && port > 0 && port <= 65535 {
			differ = append(differ, uint16(port))
		}
	}
	slices.Sort(differ)
	b := make([]byte, 0, 2*len(differ))
	for _, p := range differ {
		b = binary.BigEndian.AppendUint16(b, p)
	}
	out.ports = string(b)
	return out
}

// selectsLabels reports whether every one of match is among labels.
func selectsLabels(match, labels map[string]string) bool {
	for k, v := range match {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// peerNotes are what Isthmus reads differently from Istio in the
// PeerAuthentications, or ignores as Istio does, one note each.
func (s *Store) peerNotes() []Note {
	var notes []Note
	for ns, byName := range s.peers {
		var wide []*peerPolicy
		for _, p := range byName {
			ref := p.Ref()
			if p.Spec.GetMtls().GetMode() == securityv1beta1.PeerAuthentication_MutualTLS_DISABLE {
				notes = append(notes, Note{Policy: ref, Reason: "mode DISABLE is read as PERMISSIVE: the sidecars accept plaintext and still mutual TLS, which every caller in the mesh uses"})
			}
			for port, mtls := range p.Spec.GetPortLevelMtls() {
				if mtls.GetMode() == securityv1beta1.PeerAuthentication_MutualTLS_DISABLE {
					notes = append(notes, Note{Policy: ref, Reason: fmt.Sprintf("port %d: mode DISABLE is read as PERMISSIVE", port)})
				}
				if port == 0 || port > 65535 {
					notes = append(notes, Note{Policy: ref, Reason: fmt.Sprintf("portLevelMtls port %d is not a port: ignored", port)})
				}
			}
			switch {
			case p.wide():
				wide = append(wide, p)
				if len(p.Spec.GetPortLevelMtls()) > 0 {
					notes = append(notes, Note{Policy: ref, Reason: "portLevelMtls applies only with a workload selector (as in Istio): ignored"})
				}
			case ns == s.root:
				notes = append(notes, Note{Policy: ref, Reason: "a selector in the root namespace " + s.root + " selects nothing (as in Istio): ignored"})
			}
		}
		if len(wide) > 1 {
			slices.SortFunc(wide, older)
			for _, p := range wide[1:] {
				notes = append(notes, Note{Policy: p.Ref(), Reason: fmt.Sprintf("%s, older, is the namespace-wide policy of %s (as in Istio, the oldest decides): ignored", wide[0].Ref(), ns)})
			}
		}
	}
	slices.SortFunc(notes, func(a, b Note) int {
		return cmp.Or(strings.Compare(a.Policy, b.Policy), strings.Compare(a.Reason, b.Reason))
	})
	return notes
}
