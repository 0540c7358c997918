package federation

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	grpcpeer "google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/validation"

	fedv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"
	"github.com/isthmus-mesh/isthmus/internal/pemutil"
	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
)

// ReservedSNI is the TLS server name federation connections carry, so
// that an east-west gateway in front of the federator can tell them from
// service traffic and pass them through to the federator.
const ReservedSNI = "federation.isthmus.internal"

// keys of a peer's ConfigMap, which holds what this side learnt at
// establishment and keeps current from the stream: the peer's bundle.
const (
	keyBundle   = "bundle.pem"
	keySequence = "sequence"
	// keyClaimedBy in a token's claim (Secret <record>-claim) names the
	// joiner that presented its secret first (joinerClaim); only it may
	// complete the link.
	keyClaimedBy = "claimed-by"
	// keyPeerTrustDomain in a token record is the trust domain the joiner
	// must present.
	keyPeerTrustDomain = "peer-trust-domain"
)

func peerConfigMapName(peer string) string { return "isthmus-peer-" + peer }

// peerCertificates returns the certificates the client presented on the
// connection that carries ctx.
func peerCertificates(ctx context.Context) []*x509.Certificate {
	p, ok := grpcpeer.FromContext(ctx)
	if !ok {
		return nil
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return nil
	}
	return info.State.PeerCertificates
}

// serverTLS is the federation listener's TLS: the federator's SVID, and a
// client certificate requested but checked per call, since Establish
// comes from a joiner whose bundle arrives in the request.
func serverTLS(svid x509svid.Source) *tls.Config {
	cfg := tlsconfigServer(svid)
	cfg.ClientAuth = tls.RequestClientCert
	return cfg
}

// establishRequest checks an Establish call against this cluster's token
// record and returns what it learnt about the joiner. Nothing is written.
type joiner struct {
	name      string
	bundle    *spiffebundle.Bundle
	id        spiffeid.ID
	addresses []string
	record    *corev1.Secret
	// claimed: this joiner claimed the record before (a retry).
	claimed bool
}

// checkEstablish validates the request and the token record; every error
// is a gRPC status whose message names the problem.
func (m *Manager) checkEstablish(ctx context.Context, req *fedv1.EstablishRequest) (*joiner, error) {
	deny := func(format string, args ...any) error {
		return status.Errorf(codes.PermissionDenied, format, args...)
	}
	if len(req.GetTokenId()) != 16 || !isHex(req.GetTokenId()) {
		return nil, status.Error(codes.InvalidArgument, "malformed token ID")
	}
	if msgs := validation.IsDNS1123Label(req.GetClusterName()); len(msgs) > 0 {
		return nil, status.Errorf(codes.InvalidArgument, "cluster name %q: %s", req.GetClusterName(), strings.Join(msgs, "; "))
	}
	rec, err := m.kube.CoreV1().Secrets(m.cfg.Namespace).Get(ctx, "isthmus-token-"+req.GetTokenId(), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, deny("unknown or already used peering token %s", req.GetTokenId())
	}
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "read token record: %v", err)
	}
	if rec.Type != SecretTypeTokenRecord {
		return nil, deny("unknown or already used peering token %s", req.GetTokenId())
	}

	if !SecretMatches(req.GetSecret(), string(rec.Data[keySecretHash])) {
		return nil, deny("the token's secret does not match (was the token altered?)")
	}
	expires, err := time.Parse(time.RFC3339, string(rec.Data[keyExpires]))
	if err != nil || !m.clock.Now().Before(expires) {
		return nil, deny("the peering token expired at %s; create a new one", string(rec.Data[keyExpires]))
	}
	if want := rec.Labels[LabelTokenFor]; req.GetClusterName() != want {
		return nil, deny("the token was created for cluster %q, not %q", want, req.GetClusterName())
	}
	if req.GetClusterName() == m.cfg.ClusterName {
		return nil, deny("cluster %q is this cluster", req.GetClusterName())
	}
	wantTD := string(rec.Data[keyPeerTrustDomain])
	if got := req.GetTrustBundle().GetTrustDomain(); wantTD != "" && got != wantTD {
		return nil, deny("the joiner presents a bundle for trust domain %q; the token was created for %q", got, wantTD)
	}
	td, err := spiffeid.TrustDomainFromString(req.GetTrustBundle().GetTrustDomain())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "trust domain: %v", err)
	}
	if td == m.trust.LocalTrustDomain() {
		return nil, deny("the joiner's trust domain %s is this cluster's own; every cluster needs its own", td)
	}
	// A trust domain is one link's: a joiner that took another peer's
	// would replace that peer's roots in this cluster's trust.
	if holder := m.trustDomainHolder(req.GetClusterName(), td); holder != "" {
		return nil, deny("the joiner's trust domain %s belongs to this cluster's link with %q: a trust domain is one peer's, so %q cannot join with it", td, holder, req.GetClusterName())
	}
	bundle, err := parseBundle(req.GetTrustBundle(), td)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "trust bundle: %v", err)
	}
	id, err := spiffeid.FromString(req.GetFederatorId())
	if err != nil || !id.MemberOf(td) {
		return nil, status.Errorf(codes.InvalidArgument, "federator ID %q is not a SPIFFE ID in %s", req.GetFederatorId(), td)
	}
	// The joiner proves it holds the key of the identity it claims,
	// signed by the bundle it presents.
	certs := peerCertificates(ctx)
	if len(certs) == 0 {
		return nil, deny("no client certificate: the joiner must present its federator SVID")
	}
	got, _, err := x509svid.Verify(certs, x509bundle.FromX509Authorities(td, bundle.X509Authorities()))
	if err != nil {
		return nil, deny("the client certificate does not verify against the presented bundle: %v", err)
	}
	if got != id {
		return nil, deny("the client certificate is %s, the request claims %s", got, id)
	}
	for _, a := range req.GetAddresses() {
		if err := CheckAddress(a); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "addresses: %v", err)
		}
	}
	by, err := m.readClaim(ctx, rec.Name)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "read the token's claim: %v", err)
	}
	if by != "" && by != joinerClaim(id, bundle) {
		return nil, deny("the peering token %s was already used", req.GetTokenId())
	}
	return &joiner{name: req.GetClusterName(), bundle: bundle, id: id, addresses: req.GetAddresses(), record: rec, claimed: by != ""}, nil
}

// claimName is the Secret that records who claimed a token record.
func claimName(record string) string { return record + "-claim" }

// readClaim returns the joinerClaim a token record was claimed for, or ""
// when nobody claimed it.
func (m *Manager) readClaim(ctx context.Context, record string) (string, error) {
	s, err := m.kube.CoreV1().Secrets(m.cfg.Namespace).Get(ctx, claimName(record), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	if s.Type != SecretTypeTokenClaim {
		return "", fmt.Errorf("the Secret %s is not a token claim (type %q)", s.Name, s.Type)
	}
	return string(s.Data[keyClaimedBy]), nil
}

// Establish implements the acceptor's side of linking: it spends the
// one-time secret, stores the joiner's bundle and creates the
// FederationPeer for it. A refused call changes nothing.
//
// The secret is claimed for the joiner's federator ID first, and the
// record deleted only once the link is recorded: a call that fails half
// way leaves the token usable by the same joiner, whose retry completes
// the link, and by no one else. A joiner whose link is recorded (its
// answer was lost, or storing it on its side failed) is answered again,
// once its certificate verifies against the bundle stored for it.
func (m *Manager) Establish(ctx context.Context, req *fedv1.EstablishRequest) (*fedv1.EstablishResponse, error) {
	if msgs := validation.IsDNS1123Label(req.GetClusterName()); len(msgs) > 0 {
		return nil, status.Errorf(codes.InvalidArgument, "cluster name %q: %s", req.GetClusterName(), strings.Join(msgs, "; "))
	}
	// Before anything that costs a request: a flood of calls waits for
	// its own budget, never for the one the federator's work shares.
	if !m.establishLimit.AllowN(m.clock.Now(), 1) {
		return nil, status.Errorf(codes.ResourceExhausted, "this federator answers at most %g Establish calls a second (%d at once) and more are coming in: retry shortly",
			m.cfg.EstablishRate, m.cfg.EstablishBurst)
	}
	fp, linked := m.lookupPeerObject(ctx, req.GetClusterName())
	if linked && m.linkedJoiner(ctx, fp, req) {
		m.log.Info("answered a linked peer's Establish again", "peer", req.GetClusterName())
		return m.establishResponse()
	}
	// The token is checked before anything else is said: a caller
	// without one learns nothing about this cluster's links.
	j, err := m.checkEstablish(ctx, req)
	if err != nil {
		m.log.Warn("refused a peering", "cluster", req.GetClusterName(), "reason", status.Convert(err).Message())
		return nil, err
	}
	if linked {
		return nil, status.Errorf(codes.AlreadyExists, "this cluster is already linked with %q; delete its FederationPeer here to link again", j.name)
	}
	// Claim the secret: only the first create of the claim wins (a
	// Secret of its own, so that the federator needs no right to change
	// Secrets it did not make).
	rec := j.record
	secrets := m.kube.CoreV1().Secrets(m.cfg.Namespace)
	if !j.claimed {
		claim := joinerClaim(j.id, j.bundle)
		_, err := secrets.Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Namespace: m.cfg.Namespace, Name: claimName(rec.Name),
				Labels: map[string]string{LabelTokenFor: rec.Labels[LabelTokenFor], "app.kubernetes.io/part-of": "isthmus"}},
			Type: SecretTypeTokenClaim,
			Data: map[string][]byte{keyClaimedBy: []byte(claim)},
		}, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			if by, rerr := m.readClaim(ctx, rec.Name); rerr != nil || by != claim {
				return nil, status.Errorf(codes.PermissionDenied, "the peering token %s was already used", req.GetTokenId())
			}
			err = nil
		}
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "claim the token: %v", err)
		}
	}
	if err := m.recordJoiner(ctx, j); err != nil {
		return nil, err
	}
	// The link is recorded: the token is of no further use. Its claim
	// goes last, so that a record left behind stays claimed.
	uid := rec.UID
	if err := secrets.Delete(ctx, rec.Name, metav1.DeleteOptions{
		Preconditions: &metav1.Preconditions{UID: &uid},
	}); err != nil && !apierrors.IsNotFound(err) {
		m.log.Warn("delete the spent token's record; it stays claimed by the peer until it expires", "peer", j.name, "record", rec.Name, "err", err)
	} else if err := secrets.Delete(ctx, claimName(rec.Name), metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		m.log.Warn("delete the spent token's claim", "peer", j.name, "claim", claimName(rec.Name), "err", err)
	}
	m.log.Info("linked with a new peer", "peer", j.name, "trustDomain", j.bundle.TrustDomain().Name(), "federatorID", j.id.String())
	return m.establishResponse()
}

// recordJoiner stores the joiner's bundle and creates its
// FederationPeer. The sweep of leftover peer ConfigMaps waits for it, and
// the trust domain is checked again: another joiner may have taken it
// since checkEstablish.
func (m *Manager) recordJoiner(ctx context.Context, j *joiner) error {
	m.establishMu.Lock()
	defer m.establishMu.Unlock()
	td := j.bundle.TrustDomain()
	holder := m.trustDomainHolder(j.name, td)
	now := m.clock.Now()
	for name, r := range m.recorded {
		_, seen, _ := m.informer.GetStore().GetByKey(name)
		switch {
		case seen || now.Sub(r.at) > recordedFor:
			delete(m.recorded, name)
		case name != j.name && r.td == td && holder == "":
			holder = name
		}
	}
	if holder != "" {
		return status.Errorf(codes.PermissionDenied, "the joiner's trust domain %s belongs to this cluster's link with %q: a trust domain is one peer's, so %q cannot join with it",
			td, holder, j.name)
	}
	if err := m.storePeerBundle(ctx, j.name, j.bundle); err != nil {
		return status.Errorf(codes.Unavailable, "store the joiner's bundle: %v", err)
	}
	if err := m.createAcceptedPeer(ctx, j); err != nil {
		_ = m.deletePeerBundle(context.WithoutCancel(ctx), j.name)
		return status.Errorf(codes.Unavailable, "record the joiner: %v", err)
	}
	m.recorded[j.name] = recordedJoiner{td: td, at: now}
	return nil
}

// recordedJoiner is a joiner Establish recorded, until the informer shows
// its FederationPeer (at most recordedFor).
type recordedJoiner struct {
	td spiffeid.TrustDomain
	at time.Time
}

// recordedFor bounds how long a recorded joiner is remembered apart from
// the informer: far longer than the informer lags a create.
const recordedFor = time.Minute

// joinerClaim names a joiner by its federator ID and the roots it
// presented: a retry must come with both.
func joinerClaim(id spiffeid.ID, b *spiffebundle.Bundle) string {
	h := sha256.New()
	h.Write([]byte(id.String()))
	for _, c := range b.X509Authorities() {
		h.Write(c.Raw)
	}
	return id.String() + " " + hex.EncodeToString(h.Sum(nil))
}

func (m *Manager) establishResponse() (*fedv1.EstablishResponse, error) {
	local, err := m.trust.GetBundleForTrustDomain(m.trust.LocalTrustDomain())
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "local bundle: %v", err)
	}
	return &fedv1.EstablishResponse{
		ClusterName: m.cfg.ClusterName,
		TrustBundle: bundleResource(local).GetTrustBundle(),
		FederatorId: m.cfg.FederatorID.String(),
	}, nil
}

// linkedJoiner reports whether req comes from the joiner fp records on
// this (accepting) side: the same federator ID and trust domain, and a
// client certificate that verifies against the bundle stored for it.
func (m *Manager) linkedJoiner(ctx context.Context, fp *v1alpha1.FederationPeer, req *fedv1.EstablishRequest) bool {
	if fp == nil || fp.Spec.TokenSecretName != "" || fp.Spec.FederatorID != req.GetFederatorId() ||
		fp.Spec.TrustDomain != req.GetTrustBundle().GetTrustDomain() {
		return false
	}
	td, err := spiffeid.TrustDomainFromString(fp.Spec.TrustDomain)
	if err != nil {
		return false
	}
	certs := peerCertificates(ctx)
	if len(certs) == 0 {
		return false
	}
	// The trust store holds the linked peer's bundle, current, once its
	// link runs; the stored copy is read only before that.
	roots, err := m.trust.GetX509BundleForTrustDomain(td)
	if err != nil {
		b, found, err := m.loadPeerBundle(ctx, fp.Name, td)
		if err != nil || !found {
			return false
		}
		roots = b.X509Bundle()
	}
	id, _, err := x509svid.Verify(certs, roots)
	return err == nil && id.String() == fp.Spec.FederatorID
}

// createAcceptedPeer records the joiner as a FederationPeer on the
// accepting side. It has no token: the joiner dials in.
func (m *Manager) createAcceptedPeer(ctx context.Context, j *joiner) error {
	fp := &v1alpha1.FederationPeer{
		TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.GroupVersion.String(), Kind: "FederationPeer"},
		ObjectMeta: metav1.ObjectMeta{Name: j.name, Labels: map[string]string{"app.kubernetes.io/part-of": "isthmus"}},
		Spec: v1alpha1.FederationPeerSpec{
			TrustDomain: j.bundle.TrustDomain().Name(), FederatorID: j.id.String(), Addresses: j.addresses,
		},
	}
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(fp)
	if err != nil {
		return err
	}
	_, err = m.dyn.Resource(v1alpha1.Resource).Create(ctx, &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{})
	return err
}

// storePeerBundle writes the peer's bundle to its ConfigMap.
func (m *Manager) storePeerBundle(ctx context.Context, name string, b *spiffebundle.Bundle) error {
	seq, _ := b.SequenceNumber()
	data := map[string]string{
		keyTrustDomain: b.TrustDomain().Name(),
		keyBundle:      string(pemutil.EncodeCertificates(b.X509Authorities()...)),
		keySequence:    strconv.FormatUint(seq, 10),
	}
	cms := m.kube.CoreV1().ConfigMaps(m.cfg.Namespace)
	m.bundleMu.Lock()
	last := m.stored[name]
	m.bundleMu.Unlock()
	if last != nil {
		if maps.Equal(last.Data, data) {
			return nil
		}
		next := last.DeepCopy()
		next.Data = data
		out, err := cms.Update(ctx, next, metav1.UpdateOptions{})
		if err == nil {
			m.rememberBundle(name, out)
			return nil
		}
		m.forgetStoredBundle(name)
		if !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
			return err
		}
		// Changed or deleted by someone else: read it again.
	}
	cm, err := cms.Get(ctx, peerConfigMapName(name), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		cm, err = cms.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Namespace: m.cfg.Namespace, Name: peerConfigMapName(name),
				Labels: map[string]string{LabelPeer: name, "app.kubernetes.io/part-of": "isthmus"}},
			Data: data,
		}, metav1.CreateOptions{})
	} else if err == nil {
		cm.Data = data
		cm, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
	}
	if err != nil {
		return err
	}
	m.rememberBundle(name, cm)
	return nil
}

func (m *Manager) rememberBundle(name string, cm *corev1.ConfigMap) {
	m.bundleMu.Lock()
	defer m.bundleMu.Unlock()
	m.stored[name] = cm
}

func (m *Manager) forgetStoredBundle(name string) {
	m.bundleMu.Lock()
	defer m.bundleMu.Unlock()
	delete(m.stored, name)
}

// loadPeerBundle reads the peer's stored bundle; found is false before
// establishment.
func (m *Manager) loadPeerBundle(ctx context.Context, name string, td spiffeid.TrustDomain) (b *spiffebundle.Bundle, found bool, err error) {
	cm, err := m.kube.CoreV1().ConfigMaps(m.cfg.Namespace).Get(ctx, peerConfigMapName(name), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	if cm.Data[keyTrustDomain] != td.Name() {
		return nil, true, fmt.Errorf("ConfigMap %s holds a bundle for %q, the peer's trust domain is %s", cm.Name, cm.Data[keyTrustDomain], td)
	}
	roots, err := pemutil.ParseCertificates([]byte(cm.Data[keyBundle]))
	if err != nil {
		return nil, true, fmt.Errorf("ConfigMap %s: %w", cm.Name, err)
	}
	seq, _ := strconv.ParseUint(cm.Data[keySequence], 10, 64)
	b = spiffebundle.FromX509Authorities(td, roots)
	b.SetSequenceNumber(seq)
	return b, true, nil
}

func (m *Manager) deletePeerBundle(ctx context.Context, name string) error {
	m.forgetStoredBundle(name)
	err := m.kube.CoreV1().ConfigMaps(m.cfg.Namespace).Delete(ctx, peerConfigMapName(name), metav1.DeleteOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// establish is the joiner's side: it dials the acceptor, verified with
// the token's roots and federator ID, and presents the secret, its bundle
// and its own SVID. It returns the acceptor's bundle.
func (m *Manager) establish(ctx context.Context, tok Token) (*spiffebundle.Bundle, error) {
	td, err := spiffeid.TrustDomainFromString(tok.TrustDomain)
	if err != nil {
		return nil, permanent(fmt.Errorf("token trust domain: %w", err))
	}
	id, err := spiffeid.FromString(tok.FederatorID)
	if err != nil {
		return nil, permanent(fmt.Errorf("token federator ID: %w", err))
	}
	local, err := m.trust.GetBundleForTrustDomain(m.trust.LocalTrustDomain())
	if err != nil {
		return nil, err
	}
	roots := x509bundle.FromX509Authorities(td, tok.RootCertificates())
	var lastErr error
	for _, addr := range tok.Addresses {
		conn, err := m.dial(addr, roots, id)
		if err != nil {
			lastErr = err
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, m.cfg.DialTimeout)
		resp, err := fedv1.NewFederationServiceClient(conn).Establish(cctx, &fedv1.EstablishRequest{
			Secret: tok.Secret, TokenId: tok.ID, ClusterName: m.cfg.ClusterName,
			TrustBundle: bundleResource(local).GetTrustBundle(), FederatorId: m.cfg.FederatorID.String(),
			Addresses: m.cfg.AdvertiseAddresses,
		})
		cancel()
		_ = conn.Close()
		if err != nil {
			switch status.Code(err) {
			case codes.PermissionDenied, codes.InvalidArgument, codes.AlreadyExists:
				return nil, permanent(fmt.Errorf("%s refused the peering: %s", addr, status.Convert(err).Message()))
			}
			lastErr = fmt.Errorf("establish with %s: %w", addr, err)
			continue
		}
		if resp.GetClusterName() != tok.ClusterName || resp.GetFederatorId() != tok.FederatorID {
			return nil, permanent(fmt.Errorf("%s answered as cluster %q (%s); the token names %q (%s)", addr,
				resp.GetClusterName(), resp.GetFederatorId(), tok.ClusterName, tok.FederatorID))
		}
		b, err := parseBundle(resp.GetTrustBundle(), td)
		if err != nil {
			return nil, permanent(fmt.Errorf("%s sent a bad bundle: %w", addr, err))
		}
		return b, nil
	}
	if lastErr == nil {
		lastErr = errors.New("the token has no address")
	}
	return nil, lastErr
}

// permanentError marks an error that retrying cannot fix.
type permanentError struct{ err error }

func (e permanentError) Error() string { return e.err.Error() }
func (e permanentError) Unwrap() error { return e.err }

func permanent(err error) error { return permanentError{err} }

func isPermanent(err error) bool {
	var p permanentError
	return errors.As(err, &p)
}
