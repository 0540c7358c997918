package federation

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
	"github.com/isthmus-mesh/isthmus/pkg/ca"
)

// Objects the peering CLI reads and writes, all in the federator's
// namespace unless cluster scoped.
const (
	// ClusterInfoConfigMap is published by the running federator: its
	// cluster name, trust domain and SPIFFE ID, for the CLI to read.
	ClusterInfoConfigMap = "isthmus-cluster"
	// LabelTokenFor marks an accepting side's token record with the peer
	// it was created for.
	LabelTokenFor = "federation.isthmus.dev/token-for"
	// LabelJoinToken marks a joining side's Secret holding a token.
	LabelJoinToken = "federation.isthmus.dev/join-token"
	// AnnotationTokenID is the ID of the token a joining side's Secret
	// holds, on the Secret and on the FederationPeer made from it: the
	// federator deletes the Secret with the link only if it still holds
	// that link's token.
	AnnotationTokenID = "federation.isthmus.dev/token-id"
	// SecretTypeTokenRecord is the type of an accepting side's record.
	SecretTypeTokenRecord corev1.SecretType = "federation.isthmus.dev/token-record"
	// SecretTypeTokenClaim is the type of the Secret that records which
	// joiner claimed a token record (<record>-claim).
	SecretTypeTokenClaim corev1.SecretType = "federation.isthmus.dev/token-claim"

	keyClusterName = "clusterName"
	keyTrustDomain = "trustDomain"
	keyFederatorID = "federatorID"
	keySecretHash  = "secret-sha256"
	keyExpires     = "expires"
	keyToken       = "token"

	// DefaultTokenTTL is how long a token's secret is honoured.
	DefaultTokenTTL = time.Hour
	// MinTokenTTL is the shortest: time to carry the token to the other
	// cluster and join with it.
	MinTokenTTL = time.Minute
	// MaxTokenTTL bounds it: a peering token is for linking now, not a
	// standing credential.
	MaxTokenTTL = 7 * 24 * time.Hour
)

// ClusterInfo is what a federator publishes about its cluster.
type ClusterInfo struct {
	ClusterName string
	TrustDomain spiffeid.TrustDomain
	FederatorID spiffeid.ID
}

// PublishClusterInfo writes the ClusterInfoConfigMap (the federator calls
// it at start).
func PublishClusterInfo(ctx context.Context, client kubernetes.Interface, namespace string, info ClusterInfo) error {
	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: ClusterInfoConfigMap,
			Labels: map[string]string{"app.kubernetes.io/part-of": "isthmus"}},
		Data: map[string]string{
			keyClusterName: info.ClusterName,
			keyTrustDomain: info.TrustDomain.Name(),
			keyFederatorID: info.FederatorID.String(),
		},
	}
	cms := client.CoreV1().ConfigMaps(namespace)
	old, err := cms.Get(ctx, ClusterInfoConfigMap, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = cms.Create(ctx, cm, metav1.CreateOptions{})
	case err == nil:
		if maps.Equal(old.Data, cm.Data) {
			return nil
		}
		old.Data = cm.Data
		_, err = cms.Update(ctx, old, metav1.UpdateOptions{})
	}
	if err != nil {
		return fmt.Errorf("publish ConfigMap %s/%s: %w", namespace, ClusterInfoConfigMap, err)
	}
	return nil
}

func readClusterInfo(ctx context.Context, client kubernetes.Interface, namespace string) (ClusterInfo, error) {
	cm, err := client.CoreV1().ConfigMaps(namespace).Get(ctx, ClusterInfoConfigMap, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return ClusterInfo{}, fmt.Errorf("ConfigMap %s/%s not found: is the federator running in this cluster?", namespace, ClusterInfoConfigMap)
	}
	if err != nil {
		return ClusterInfo{}, fmt.Errorf("read ConfigMap %s/%s: %w", namespace, ClusterInfoConfigMap, err)
	}
	td, err := spiffeid.TrustDomainFromString(cm.Data[keyTrustDomain])
	if err != nil {
		return ClusterInfo{}, fmt.Errorf("ConfigMap %s/%s: trust domain: %w", namespace, ClusterInfoConfigMap, err)
	}
	id, err := spiffeid.FromString(cm.Data[keyFederatorID])
	if err != nil {
		return ClusterInfo{}, fmt.Errorf("ConfigMap %s/%s: federator ID: %w", namespace, ClusterInfoConfigMap, err)
	}
	return ClusterInfo{ClusterName: cm.Data[keyClusterName], TrustDomain: td, FederatorID: id}, nil
}

// TokenOptions are the arguments of `federator token create`.
type TokenOptions struct {
	// Namespace is the federator's namespace.
	Namespace string
	// Peer names the cluster that will join with the token.
	Peer string
	// PeerTrustDomain is the trust domain the joiner must present, as a
	// name ("west.mesh") or a SPIFFE URI ("spiffe://west.mesh"); empty
	// means "<peer>.mesh", the default trust domain of a cluster so named.
	PeerTrustDomain string
	// TTL is how long the secret is honoured, from MinTokenTTL to
	// MaxTokenTTL; zero means DefaultTokenTTL. The expiry is rounded up
	// to the second.
	TTL time.Duration
	// Addresses reach this cluster's federation endpoint (host:port).
	Addresses []string
	// Now is the current time (for tests); zero means time.Now().
	Now time.Time
	// Notice, when set, is told of each earlier token record the new
	// token made useless and that was deleted (or could not be).
	Notice func(msg string)
	// Peers, when set, reads the FederationPeers, so that a trust domain
	// a FederationPeer made by hand holds is refused too. Without it the
	// links `federator join` and Establish made are checked (their
	// ConfigMaps and join Secrets); the federator refuses the rest at
	// Establish.
	Peers dynamic.Interface
}

// CreateToken records a new one-time secret (as a hash, with its expiry)
// in the accepting cluster and returns the token to hand to the peer.
func CreateToken(ctx context.Context, client kubernetes.Interface, opts TokenOptions) (Token, error) {
	var errs []error
	if msgs := validation.IsDNS1123Label(opts.Peer); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("--peer %q is not a cluster name: %s", opts.Peer, strings.Join(msgs, "; ")))
	}
	if opts.TTL == 0 {
		opts.TTL = DefaultTokenTTL
	}
	if opts.PeerTrustDomain == "" {
		opts.PeerTrustDomain = opts.Peer + ".mesh"
	}
	// Stored and compared by name: "spiffe://west.mesh", which go-spiffe
	// accepts, would otherwise make a token no joiner can ever use.
	if td, err := parseTrustDomain(opts.PeerTrustDomain); err != nil {
		errs = append(errs, fmt.Errorf("--peer-trust-domain %q: %v", opts.PeerTrustDomain, err))
	} else {
		opts.PeerTrustDomain = td.Name()
	}
	switch {
	case opts.TTL < MinTokenTTL:
		errs = append(errs, fmt.Errorf("--ttl %s is shorter than %s: the joining cluster needs time to use the token", opts.TTL, MinTokenTTL))
	case opts.TTL > MaxTokenTTL:
		errs = append(errs, fmt.Errorf("--ttl %s is longer than %s: a peering token is for linking now, not a standing credential", opts.TTL, MaxTokenTTL))
	}
	if len(opts.Addresses) == 0 {
		errs = append(errs, errors.New("--address is required: where the peer reaches this cluster (host:port of the east-west gateway or the federator)"))
	}
	for _, a := range opts.Addresses {
		if err := CheckAddress(a); err != nil {
			errs = append(errs, fmt.Errorf("--address: %w", err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return Token{}, err
	}
	if opts.Now.IsZero() {
		opts.Now = time.Now()
	}
	info, err := readClusterInfo(ctx, client, opts.Namespace)
	if err != nil {
		return Token{}, err
	}
	if info.ClusterName == opts.Peer {
		return Token{}, fmt.Errorf("--peer %q is this cluster's own name", opts.Peer)
	}
	if opts.PeerTrustDomain == info.TrustDomain.Name() {
		return Token{}, fmt.Errorf("--peer-trust-domain %s is this cluster's own: every cluster needs its own", opts.PeerTrustDomain)
	}
	holder, err := trustDomainLink(ctx, client, opts.Peers, opts.Namespace, opts.Peer, opts.PeerTrustDomain)
	if err != nil {
		return Token{}, err
	}
	if holder != "" {
		return Token{}, fmt.Errorf("--peer-trust-domain %s belongs to this cluster's link with %q: a trust domain is one peer's, and a joiner with it would replace that peer's roots; give %s's own trust domain, or unlink %q first (delete its FederationPeer)",
			opts.PeerTrustDomain, holder, opts.Peer, holder)
	}
	roots, err := ca.ReadRoots(ctx, client, opts.Namespace)
	if err != nil {
		return Token{}, err
	}
	id, secret, err := newSecret()
	if err != nil {
		return Token{}, err
	}
	t := Token{
		ClusterName: info.ClusterName, TrustDomain: info.TrustDomain.Name(), FederatorID: info.FederatorID.String(),
		Addresses: slices.Clone(opts.Addresses), Peer: opts.Peer, PeerTrustDomain: opts.PeerTrustDomain, ID: id, Secret: secret,
		Expires: ceilSecond(opts.Now.Add(opts.TTL).UTC()),
	}
	for _, r := range roots {
		t.Roots = append(t.Roots, r.Raw)
	}
	if err := t.Validate(); err != nil {
		return Token{}, err
	}
	record := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: opts.Namespace, Name: "isthmus-token-" + id,
			Labels: map[string]string{LabelTokenFor: opts.Peer, "app.kubernetes.io/part-of": "isthmus"},
		},
		Type: SecretTypeTokenRecord,
		Data: map[string][]byte{
			keySecretHash: []byte(HashSecret(secret)),
			keyExpires:    []byte(t.Expires.Format(time.RFC3339)),
			// The trust domain the joiner must present at Establish.
			keyPeerTrustDomain: []byte(opts.PeerTrustDomain),
		},
	}
	if _, err := client.CoreV1().Secrets(opts.Namespace).Create(ctx, record, metav1.CreateOptions{}); err != nil {
		return Token{}, fmt.Errorf("record token: %w", err)
	}
	sweepTokens(ctx, client, opts.Namespace, opts.Peer, record.Name, opts.Now, opts.Notice)
	return t, nil
}

// trustDomainLink returns the peer, other than peer, whose link in this
// cluster has trust domain td: a peer ConfigMap (an established link), a
// join token's Secret (a link being made from this side), or, with peers,
// a FederationPeer. Each is one link's; "" when none has it.
func trustDomainLink(ctx context.Context, client kubernetes.Interface, peers dynamic.Interface, namespace, peer, td string) (string, error) {
	cms, err := client.CoreV1().ConfigMaps(namespace).List(ctx, metav1.ListOptions{LabelSelector: LabelPeer})
	if err != nil {
		return "", fmt.Errorf("read this cluster's links (peer ConfigMaps) to check --peer-trust-domain: %w", err)
	}
	for _, cm := range cms.Items {
		if name := cm.Labels[LabelPeer]; name != peer && cm.Data[keyTrustDomain] == td {
			return name, nil
		}
	}
	secrets, err := client.CoreV1().Secrets(namespace).List(ctx, metav1.ListOptions{LabelSelector: LabelJoinToken})
	if err != nil {
		return "", fmt.Errorf("read this cluster's links (join token Secrets) to check --peer-trust-domain: %w", err)
	}
	for _, sec := range secrets.Items {
		name := sec.Labels[LabelJoinToken]
		if name == peer {
			continue
		}
		if t, err := DecodeToken(string(sec.Data[keyToken])); err == nil && t.TrustDomain == td {
			return name, nil
		}
	}
	if peers == nil {
		return "", nil
	}
	list, err := peers.Resource(v1alpha1.Resource).List(ctx, metav1.ListOptions{})
	if err != nil {
		return "", fmt.Errorf("read this cluster's FederationPeers to check --peer-trust-domain: %w", err)
	}
	for i := range list.Items {
		if u := &list.Items[i]; u.GetName() != peer && specTrustDomain(u).Name() == td {
			return u.GetName(), nil
		}
	}
	return "", nil
}

// parseTrustDomain reads a trust domain given as a name ("west.mesh") or
// as a SPIFFE URI ("spiffe://west.mesh"). A SPIFFE ID with a path, which
// go-spiffe would take for its trust domain, is refused: it names a
// workload, so it is more likely a mistake than a trust domain.
func parseTrustDomain(s string) (spiffeid.TrustDomain, error) {
	td, err := spiffeid.TrustDomainFromString(s)
	if err != nil {
		return td, err
	}
	if id, err := spiffeid.FromString(s); err == nil && id.Path() != "" {
		return spiffeid.TrustDomain{}, fmt.Errorf("a SPIFFE ID with a path is not a trust domain: give %s or %s", td.Name(), td.IDString())
	}
	return td, nil
}

// ceilSecond rounds t up to the second: a token's expiry is stored to
// the second, and must not come before the TTL asked for is over.
func ceilSecond(t time.Time) time.Time {
	if c := t.Truncate(time.Second); c.Before(t) {
		return c.Add(time.Second)
	}
	return t
}

// sweepTokens deletes the token records nobody can use any more: the
// peer's earlier tokens that no link is being made with (a new token for
// a peer replaces its unused ones, as Consul's generate-token does), and
// expired records of any peer, with their claims; and claims whose record
// is gone. The new token stands whatever happens here; notice hears what
// was done.
func sweepTokens(ctx context.Context, client kubernetes.Interface, namespace, peer, keep string, now time.Time, notice func(string)) {
	if notice == nil {
		notice = func(string) {}
	}
	secrets := client.CoreV1().Secrets(namespace)
	list, err := secrets.List(ctx, metav1.ListOptions{LabelSelector: LabelTokenFor})
	if err != nil {
		notice(fmt.Sprintf("earlier tokens were not looked for: %v", err))
		return
	}
	records, claims := map[string]bool{}, map[string]*corev1.Secret{}
	for i, s := range list.Items {
		switch s.Type {
		case SecretTypeTokenRecord:
			records[s.Name] = true
		case SecretTypeTokenClaim:
			claims[s.Name] = &list.Items[i]
		}
	}
	del := func(s *corev1.Secret, what, why string) {
		// Only this exact Secret: one a joiner claims meanwhile stays.
		uid, rv := s.UID, s.ResourceVersion
		err := secrets.Delete(ctx, s.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid, ResourceVersion: &rv}})
		switch {
		case err == nil:
			notice(fmt.Sprintf("deleted %s: %s", what, why))
		case apierrors.IsNotFound(err) || apierrors.IsConflict(err):
		default:
			notice(fmt.Sprintf("could not delete %s (%s): %v", what, why, err))
		}
	}
	for i := range list.Items {
		s := &list.Items[i]
		if s.Name == keep {
			continue
		}
		switch s.Type {
		case SecretTypeTokenClaim:
			if rec := strings.TrimSuffix(s.Name, "-claim"); !records[rec] {
				del(s, "the claim of token "+strings.TrimPrefix(rec, "isthmus-token-"), "its token is gone")
			}
		case SecretTypeTokenRecord:
			id := strings.TrimPrefix(s.Name, "isthmus-token-")
			expires, err := time.Parse(time.RFC3339, string(s.Data[keyExpires]))
			switch {
			case err != nil || !now.Before(expires):
				del(s, "token "+id, "it expired")
				if c := claims[claimName(s.Name)]; c != nil {
					del(c, "the claim of token "+id, "its token expired")
				}
			case s.Labels[LabelTokenFor] == peer && claims[claimName(s.Name)] == nil:
				del(s, "token "+id, "the new token for "+peer+" replaces it")
			}
		}
	}
}

// JoinOptions are the arguments of `federator join`.
type JoinOptions struct {
	// Namespace is the federator's namespace.
	Namespace string
	// Name is what this cluster calls the peer; it must be the name in
	// the token.
	Name string
	// Token is the token text from the peer's `federator token create`.
	Token string
	// Now is the current time (for tests); zero means time.Now().
	Now time.Time
}

// Join stores a peer's token in a Secret and creates the FederationPeer
// that makes this cluster's federator dial the peer. Nothing is half
// applied: if the FederationPeer cannot be created, the Secret is removed.
func Join(ctx context.Context, client kubernetes.Interface, dyn dynamic.Interface, opts JoinOptions) (*v1alpha1.FederationPeer, error) {
	t, err := DecodeToken(opts.Token)
	if err != nil {
		return nil, err
	}
	if opts.Now.IsZero() {
		opts.Now = time.Now()
	}
	if t.Expired(opts.Now) {
		return nil, fmt.Errorf("%w: it expired at %s; ask the peer for a new one (`federator token create`)", ErrInvalidToken, t.Expires.Format(time.RFC3339))
	}
	if opts.Name == "" {
		return nil, fmt.Errorf("--name is required: the name of the cluster that created the token (--name %s for this one)", t.ClusterName)
	}
	if opts.Name != t.ClusterName {
		return nil, fmt.Errorf("--name %q does not match the cluster that created the token (%q)", opts.Name, t.ClusterName)
	}
	info, err := readClusterInfo(ctx, client, opts.Namespace)
	if err != nil {
		return nil, err
	}
	if t.Peer != info.ClusterName {
		return nil, fmt.Errorf("%w: it was created for cluster %q, this cluster is %q", ErrInvalidToken, t.Peer, info.ClusterName)
	}
	if t.PeerTrustDomain != info.TrustDomain.Name() {
		return nil, fmt.Errorf("%w: it was created for a cluster in trust domain %s, this cluster's is %s (`federator token create --peer-trust-domain`)", ErrInvalidToken, t.PeerTrustDomain, info.TrustDomain.Name())
	}
	if t.TrustDomain == info.TrustDomain.Name() {
		return nil, fmt.Errorf("%w: the peer's trust domain %s is this cluster's own; every cluster needs its own", ErrInvalidToken, t.TrustDomain)
	}
	peers := dyn.Resource(v1alpha1.Resource)
	if _, err := peers.Get(ctx, opts.Name, metav1.GetOptions{}); err == nil {
		return nil, fmt.Errorf("FederationPeer %q already exists; delete it first to link again", opts.Name)
	} else if !apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("read FederationPeer %q: %w", opts.Name, err)
	}

	sec, peer := joinObjects(&t, opts.Namespace, opts.Token)
	secretName := sec.Name
	if err := storeJoinSecret(ctx, client, sec); err != nil {
		return nil, fmt.Errorf("store token in Secret %s/%s: %w", opts.Namespace, secretName, err)
	}
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(peer)
	if err == nil {
		_, err = peers.Create(ctx, &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{})
	}
	if err != nil {
		_ = client.CoreV1().Secrets(opts.Namespace).Delete(context.WithoutCancel(ctx), secretName, metav1.DeleteOptions{})
		return nil, fmt.Errorf("create FederationPeer %q: %w", opts.Name, err)
	}
	return peer, nil
}

// joinObjects are what Join writes for token t (text, encoded): the
// Secret holding it, in namespace, and the FederationPeer naming that
// Secret, both annotated with the token's ID.
func joinObjects(t *Token, namespace, text string) (*corev1.Secret, *v1alpha1.FederationPeer) {
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: "isthmus-join-" + t.ClusterName,
			Labels:      map[string]string{LabelJoinToken: t.ClusterName, "app.kubernetes.io/part-of": "isthmus"},
			Annotations: map[string]string{AnnotationTokenID: t.ID}},
		Data: map[string][]byte{keyToken: []byte(strings.TrimSpace(text))},
	}
	peer := &v1alpha1.FederationPeer{
		TypeMeta: metav1.TypeMeta{APIVersion: v1alpha1.GroupVersion.String(), Kind: "FederationPeer"},
		ObjectMeta: metav1.ObjectMeta{Name: t.ClusterName, Labels: map[string]string{"app.kubernetes.io/part-of": "isthmus"},
			Annotations: map[string]string{AnnotationTokenID: t.ID}},
		Spec: v1alpha1.FederationPeerSpec{
			TrustDomain: t.TrustDomain, FederatorID: t.FederatorID,
			Addresses: t.Addresses, TokenSecretName: sec.Name,
		},
	}
	return sec, peer
}

// storeJoinSecret creates the join token's Secret, or replaces one a
// link to the same peer left behind (its FederationPeer is gone: Join
// checked). A Secret of that name that `federator join` did not write is
// left alone.
func storeJoinSecret(ctx context.Context, client kubernetes.Interface, sec *corev1.Secret) error {
	secrets := client.CoreV1().Secrets(sec.Namespace)
	_, err := secrets.Create(ctx, sec, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		return err
	}
	old, gerr := secrets.Get(ctx, sec.Name, metav1.GetOptions{})
	if gerr != nil {
		return gerr
	}
	if old.Labels[LabelJoinToken] != sec.Labels[LabelJoinToken] {
		return fmt.Errorf("%w, and it does not hold a join token for %q (label %s): delete or rename it", err, sec.Labels[LabelJoinToken], LabelJoinToken)
	}
	old.Data, old.Labels, old.Annotations = sec.Data, sec.Labels, sec.Annotations
	_, err = secrets.Update(ctx, old, metav1.UpdateOptions{})
	return err
}
