package ca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"
)

// Secret names and layouts. The self-signed CA and a plugged-in CA use
// Istio's file names, so operators can reuse their tooling.
const (
	// DefaultSecretName holds the self-signed CA the federator generates.
	DefaultSecretName = "isthmus-ca"
	// PluggedSecretName is the operator's own CA (Istio's "cacerts"
	// layout); when it exists it is used instead of a self-signed root.
	PluggedSecretName = "cacerts"

	KeyCACert    = "ca-cert.pem"    // the signing certificate
	KeyCAKey     = "ca-key.pem"     // its private key
	KeyRootCert  = "root-cert.pem"  // every trusted root (the bundle)
	KeyCertChain = "cert-chain.pem" // plugged-in only: ca-cert up to the root
	keyNextCert  = "next-ca-cert.pem"
	keyNextKey   = "next-ca-key.pem"

	// AnnotationRotate, set to "requested" on the CA Secret, starts a root
	// rotation (`federator ca rotate` sets it).
	AnnotationRotate = "ca.isthmus.dev/rotate"
	annPhase         = "ca.isthmus.dev/rotation-phase"
	annActivateAt    = "ca.isthmus.dev/activate-at"
	annRetireAt      = "ca.isthmus.dev/retire-at"
	annSequence      = "ca.isthmus.dev/bundle-sequence"

	rotateRequested = "requested"
	phasePrepared   = "prepared" // new root published, old still signs
	phaseActive     = "active"   // new root signs, old still trusted
)

// Options configures a CA.
type Options struct {
	// TrustDomain the CA issues for. Required.
	TrustDomain spiffeid.TrustDomain
	// Namespace holds the CA Secrets (the federator's namespace). Required.
	Namespace string
	// SecretName is the self-signed CA's Secret; default DefaultSecretName.
	SecretName string
	// Authority tunes certificate lifetimes and the clock.
	Authority AuthorityOptions
	// PublishDelay is how long a new root sits in the bundle before it
	// signs anything, so every peer and workload trusts it first; default
	// MinPublishDelay(Authority.MaxTTL).
	PublishDelay time.Duration
	// SyncInterval is how often the Secret is re-read and a due rotation
	// step taken; default 15s.
	SyncInterval time.Duration
	// Clock drives SyncInterval; default the real clock. It also becomes
	// Authority.Clock when that is nil.
	Clock clock.WithTicker
	// Logger; nil discards.
	Logger *slog.Logger
}

// MinPublishDelay is the shortest safe time between publishing a new root
// and signing with it: long enough for every workload to renew once (at
// half-life plus 10% jitter, at most 0.55 x maxTTL) and so learn the new
// root from its CA response before any peer presents a certificate signed
// by it. Zero maxTTL means DefaultMaxTTL.
func MinPublishDelay(maxTTL time.Duration) time.Duration {
	if maxTTL <= 0 {
		maxTTL = DefaultMaxTTL
	}
	return maxTTL * 55 / 100
}

// CA is the cluster's certificate authority: an Authority whose keys live
// in a Kubernetes Secret, so restarts and replicas share one root.
type CA struct {
	*Authority
	client kubernetes.Interface
	opts   Options
	log    *slog.Logger
	// plugged is set once at New and never changes.
	plugged bool
}

// New loads the CA: the plugged-in cacerts Secret if it exists, else the
// self-signed root in SecretName, generating and storing one at first
// start. An unusable cacerts Secret is an error; the CA never falls back
// to a self-signed root behind the operator's back.
func New(ctx context.Context, client kubernetes.Interface, opts Options) (*CA, error) {
	if opts.TrustDomain.IsZero() {
		return nil, errors.New("ca: trust domain is required")
	}
	if opts.Namespace == "" {
		return nil, errors.New("ca: namespace is required")
	}
	if opts.SecretName == "" {
		opts.SecretName = DefaultSecretName
	}
	if opts.PublishDelay <= 0 {
		opts.PublishDelay = MinPublishDelay(opts.Authority.MaxTTL)
	}
	if opts.SyncInterval <= 0 {
		opts.SyncInterval = 15 * time.Second
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	if opts.Authority.Clock == nil {
		opts.Authority.Clock = opts.Clock
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	c := &CA{
		Authority: newAuthority(opts.TrustDomain, opts.Authority),
		client:    client,
		opts:      opts,
		log:       opts.Logger.With("component", "ca", "trustDomain", opts.TrustDomain.Name()),
	}
	sec, err := client.CoreV1().Secrets(opts.Namespace).Get(ctx, PluggedSecretName, metav1.GetOptions{})
	switch {
	case err == nil:
		ks, err := pluggedKeySet(sec, opts.Authority.Clock.Now())
		if err != nil {
			return nil, fmt.Errorf("ca: Secret %s/%s: %w", opts.Namespace, PluggedSecretName, err)
		}
		if err := c.numberPlugged(ctx, ks); err != nil {
			return nil, fmt.Errorf("ca: %w", err)
		}
		c.plugged = true
		c.set(ks)
		c.log.Info("using plugged-in CA", "secret", PluggedSecretName, "signer", ks.cert.Subject.String(), "roots", len(ks.roots), "bundleSequence", ks.sequence)
		return c, nil
	case !apierrors.IsNotFound(err):
		return nil, fmt.Errorf("ca: read Secret %s/%s: %w", opts.Namespace, PluggedSecretName, err)
	}
	if err := c.Reconcile(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// Plugged reports whether the CA uses the operator's cacerts Secret.
func (c *CA) Plugged() bool { return c.plugged }

// Run re-reads the CA Secret every SyncInterval and takes any rotation
// step that is due, until ctx ends. Errors are logged and retried at the
// next interval: the current keys keep signing meanwhile.
func (c *CA) Run(ctx context.Context) error {
	ticker := c.opts.Clock.NewTicker(c.opts.SyncInterval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C():
			if err := c.Reconcile(ctx); err != nil && ctx.Err() == nil {
				c.log.Warn("CA sync failed; keeping current keys", "error", err)
			}
		}
	}
}

// Reconcile reads the CA Secret, takes a rotation step if one is due, and
// makes the Authority use what the Secret holds.
func (c *CA) Reconcile(ctx context.Context) error {
	secrets := c.client.CoreV1().Secrets(c.opts.Namespace)
	if c.plugged {
		sec, err := secrets.Get(ctx, PluggedSecretName, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("read Secret %s/%s: %w", c.opts.Namespace, PluggedSecretName, err)
		}
		ks, err := pluggedKeySet(sec, c.Authority.clock.Now())
		if err != nil {
			return fmt.Errorf("plugged-in CA Secret %s/%s: %w", c.opts.Namespace, PluggedSecretName, err)
		}
		if old := c.current.Load(); old.cert.Equal(ks.cert) && sameCerts(old.roots, ks.roots) {
			if !sameCerts(old.chain, ks.chain) {
				// The same signer and roots under a renewed intermediate
				// (cert-chain.pem): leaves carry the new chain from now.
				ks.sequence = old.sequence
				c.set(ks)
				c.log.Info("plugged-in CA's certificate chain changed", "signer", ks.cert.Subject.String(), "chain", len(ks.chain))
			}
			return nil
		}
		if err := c.numberPlugged(ctx, ks); err != nil {
			return err
		}
		c.set(ks)
		c.log.Info("plugged-in CA changed", "signer", ks.cert.Subject.String(), "roots", len(ks.roots))
		return nil
	}
	var st *state
	err := c.retryRaces(func() error {
		sec, err := secrets.Get(ctx, c.opts.SecretName, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			sec, err = c.createRoot(ctx, nil)
		case err == nil && !hasKeyMaterial(sec):
			// Only the bundle number, kept there while a plugged-in CA
			// was used: the root joins it, numbered after it.
			sec, err = c.createRoot(ctx, sec)
		}
		if err != nil {
			return fmt.Errorf("CA Secret %s/%s: %w", c.opts.Namespace, c.opts.SecretName, err)
		}
		if st, err = parseState(sec); err != nil {
			return fmt.Errorf("CA Secret %s/%s: %w", c.opts.Namespace, c.opts.SecretName, err)
		}
		changed, err := c.advance(st)
		if err != nil || !changed {
			return err
		}
		if _, err := c.putSecret(ctx, sec, st.write); err != nil {
			return fmt.Errorf("update CA Secret %s/%s: %w", c.opts.Namespace, c.opts.SecretName, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	c.set(st.keySet())
	return nil
}

// retryRaces runs fn, a read-modify-write of the CA Secret, again while
// it loses a race to another replica (a conflict, or the Secret created
// meanwhile), so that it reads what the winner wrote. Bounded.
func (c *CA) retryRaces(fn func() error) error {
	var err error
	for range 5 {
		if err = fn(); !apierrors.IsConflict(err) && !apierrors.IsAlreadyExists(err) {
			return err
		}
	}
	return fmt.Errorf("CA Secret %s/%s kept changing under us: %w", c.opts.Namespace, c.opts.SecretName, err)
}

// putSecret stores what write puts into sec: over sec, or in a new CA
// Secret when sec is nil.
func (c *CA) putSecret(ctx context.Context, sec *corev1.Secret, write func(*corev1.Secret)) (*corev1.Secret, error) {
	secrets := c.client.CoreV1().Secrets(c.opts.Namespace)
	if sec == nil {
		sec = &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{
				Namespace: c.opts.Namespace,
				Name:      c.opts.SecretName,
				Labels:    map[string]string{"app.kubernetes.io/part-of": "isthmus"},
			},
			Type: corev1.SecretTypeOpaque,
		}
		write(sec)
		return secrets.Create(ctx, sec, metav1.CreateOptions{})
	}
	write(sec)
	return secrets.Update(ctx, sec, metav1.UpdateOptions{})
}

// createRoot generates a self-signed root and stores it: in a new Secret
// when sec is nil, else in sec, which holds only a bundle number.
func (c *CA) createRoot(ctx context.Context, sec *corev1.Secret) (*corev1.Secret, error) {
	var num bundleNumber
	if sec != nil {
		var err error
		if num, err = readBundleNumber(sec); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidCA, err)
		}
	}
	now := c.Authority.clock.Now()
	key, cert, err := newRoot(c.opts.TrustDomain, now)
	if err != nil {
		return nil, err
	}
	st := &state{key: key, cert: cert, roots: []*x509.Certificate{cert}}
	st.number, _ = num.forRoots(st.roots, now)
	stored, err := c.putSecret(ctx, sec, st.write)
	if err == nil {
		c.log.Info("generated a new root CA", "secret", c.opts.SecretName, "notAfter", cert.NotAfter, "bundleSequence", st.number.sequence)
	}
	return stored, err
}

// advance takes the rotation step that is due, if any:
//
//	requested ─► prepared: a new root joins the bundle; the old root signs
//	prepared ─► active:    after PublishDelay the new root signs
//	active ─► done:        after MaxTTL (+ two sync intervals, for replicas
//	                       that have not noticed yet) everything the old
//	                       root signed has expired, and it leaves the bundle
func (c *CA) advance(st *state) (bool, error) {
	now := c.Authority.clock.Now()
	changed := false
	if st.rotate {
		st.rotate = false
		changed = true
		if st.phase == "" {
			key, cert, err := newRoot(c.opts.TrustDomain, now)
			if err != nil {
				return false, err
			}
			st.nextKey, st.nextCert = key, cert
			st.roots = append(st.roots, cert)
			st.phase = phasePrepared
			st.activateAt = now.Add(c.opts.PublishDelay)
			c.log.Info("root rotation: new root published; it signs from activateAt", "activateAt", st.activateAt)
		} else {
			c.log.Info("root rotation already in progress; request ignored", "phase", st.phase)
		}
	}
	if st.phase == phasePrepared && !now.Before(st.activateAt) {
		st.key, st.cert = st.nextKey, st.nextCert
		st.nextKey, st.nextCert = nil, nil
		st.phase = phaseActive
		st.retireAt = now.Add(c.Authority.maxTTL + backdate + 2*c.opts.SyncInterval)
		changed = true
		c.log.Info("root rotation: new root signs; old root retires at retireAt", "retireAt", st.retireAt)
	}
	if st.phase == phaseActive && !now.Before(st.retireAt) {
		st.roots = []*x509.Certificate{st.cert}
		st.phase = ""
		changed = true
		c.log.Info("root rotation: old root removed from the bundle")
	}
	if !slices.ContainsFunc(st.roots, st.cert.Equal) {
		st.roots = append(st.roots, st.cert)
		changed = true
	}
	// Renumbered whenever the roots change, and once for a number kept
	// before its roots were named.
	if n, renumbered := st.number.forRoots(st.roots, now); renumbered {
		st.number = n
		changed = true
	}
	return changed, nil
}

// RequestRotation asks the federators of a cluster to rotate their
// self-signed root, by annotating the CA Secret; the running federators
// take it from there.
func RequestRotation(ctx context.Context, client kubernetes.Interface, namespace, secretName string) error {
	if secretName == "" {
		secretName = DefaultSecretName
	}
	if _, err := client.CoreV1().Secrets(namespace).Get(ctx, PluggedSecretName, metav1.GetOptions{}); err == nil {
		return fmt.Errorf("this cluster uses a plugged-in CA (Secret %s/%s): rotate it by adding the new root to root-cert.pem first, then replacing the signing certificate", namespace, PluggedSecretName)
	}
	sec, err := client.CoreV1().Secrets(namespace).Get(ctx, secretName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("read CA Secret %s/%s: %w", namespace, secretName, err)
	}
	if p := sec.Annotations[annPhase]; p != "" {
		return fmt.Errorf("a root rotation is already in progress (phase %s)", p)
	}
	if sec.Annotations == nil {
		sec.Annotations = map[string]string{}
	}
	sec.Annotations[AnnotationRotate] = rotateRequested
	if _, err := client.CoreV1().Secrets(namespace).Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("request rotation on Secret %s/%s: %w", namespace, secretName, err)
	}
	return nil
}

// RotationStatus describes the CA's roots and a rotation in progress.
type RotationStatus struct {
	// Source is the Secret the CA comes from.
	Source     string    `json:"source"`
	Phase      string    `json:"phase,omitempty"`
	ActivateAt time.Time `json:"activateAt,omitzero"`
	RetireAt   time.Time `json:"retireAt,omitzero"`
	Roots      int       `json:"roots"`
	Sequence   uint64    `json:"sequence"`
}

// state is the self-signed CA as stored in its Secret.
type state struct {
	key                  crypto.Signer
	cert                 *x509.Certificate
	roots                []*x509.Certificate
	nextKey              crypto.Signer
	nextCert             *x509.Certificate
	phase                string
	activateAt, retireAt time.Time
	number               bundleNumber
	rotate               bool
}

func parseState(sec *corev1.Secret) (*state, error) {
	var errs []error
	st := &state{}
	var err error
	if st.key, err = parseKey(sec.Data[KeyCAKey]); err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", KeyCAKey, err))
	}
	certs, err := parseCerts(sec.Data[KeyCACert])
	if err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", KeyCACert, err))
	} else {
		st.cert = certs[0]
	}
	if st.roots, err = parseCerts(sec.Data[KeyRootCert]); err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", KeyRootCert, err))
	}
	if len(sec.Data[keyNextCert]) > 0 {
		if st.nextKey, err = parseKey(sec.Data[keyNextKey]); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", keyNextKey, err))
		}
		if certs, err := parseCerts(sec.Data[keyNextCert]); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", keyNextCert, err))
		} else {
			st.nextCert = certs[0]
		}
	}
	a := sec.Annotations
	st.phase = a[annPhase]
	st.rotate = a[AnnotationRotate] == rotateRequested
	for _, t := range []struct {
		key string
		dst *time.Time
	}{{annActivateAt, &st.activateAt}, {annRetireAt, &st.retireAt}} {
		if v := a[t.key]; v != "" {
			if *t.dst, err = time.Parse(time.RFC3339, v); err != nil {
				errs = append(errs, fmt.Errorf("annotation %s: %w", t.key, err))
			}
		}
	}
	if st.number, err = readBundleNumber(sec); err != nil {
		errs = append(errs, err)
	}
	// A phase without its time would take its next step at once: the new
	// root signing before workloads trust it, or the old one leaving the
	// bundle while leaves it signed are valid.
	switch st.phase {
	case "":
	case phaseActive:
		if st.retireAt.IsZero() {
			errs = append(errs, fmt.Errorf("rotation phase %q without annotation %s", phaseActive, annRetireAt))
		}
	case phasePrepared:
		if st.nextCert == nil || st.nextKey == nil {
			errs = append(errs, fmt.Errorf("rotation phase %q without %s and %s", phasePrepared, keyNextCert, keyNextKey))
		}
		if st.activateAt.IsZero() {
			errs = append(errs, fmt.Errorf("rotation phase %q without annotation %s", phasePrepared, annActivateAt))
		}
	default:
		errs = append(errs, fmt.Errorf("unknown rotation phase %q", st.phase))
	}
	if len(errs) == 0 {
		if err := matchKey(st.cert, st.key, KeyCACert, KeyCAKey); err != nil {
			errs = append(errs, err)
		}
		// Prepared, the next root must already be trusted everywhere the
		// bundle goes, and able to sign when its time comes: a bundle that
		// lost it (an edit, a truncated write) would have workloads
		// refuse every certificate it signs after activation.
		if st.phase == phasePrepared {
			if !slices.ContainsFunc(st.roots, st.nextCert.Equal) {
				errs = append(errs, fmt.Errorf("rotation phase %q: %s is not among the roots in %s", phasePrepared, keyNextCert, KeyRootCert))
			}
			if err := matchKey(st.nextCert, st.nextKey, keyNextCert, keyNextKey); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidCA, err)
	}
	return st, nil
}

func (st *state) write(sec *corev1.Secret) {
	key, _ := encodeKey(st.key) // keys we generated or parsed always encode
	sec.Data = map[string][]byte{
		KeyCACert:   encodeCerts(st.cert),
		KeyCAKey:    key,
		KeyRootCert: encodeCerts(st.roots...),
	}
	if st.nextCert != nil {
		nk, _ := encodeKey(st.nextKey)
		sec.Data[keyNextCert] = encodeCerts(st.nextCert)
		sec.Data[keyNextKey] = nk
	}
	if sec.Annotations == nil {
		sec.Annotations = map[string]string{}
	}
	for _, k := range []string{AnnotationRotate, annPhase, annActivateAt, annRetireAt} {
		delete(sec.Annotations, k)
	}
	st.number.write(sec)
	if st.phase != "" {
		sec.Annotations[annPhase] = st.phase
	}
	if st.phase == phasePrepared {
		sec.Annotations[annActivateAt] = st.activateAt.UTC().Format(time.RFC3339)
	}
	if st.phase == phaseActive {
		sec.Annotations[annRetireAt] = st.retireAt.UTC().Format(time.RFC3339)
	}
}

func (st *state) keySet() *keySet {
	return &keySet{key: st.key, cert: st.cert, roots: slices.Clone(st.roots), sequence: st.number.sequence}
}

// Status reports the rotation state as stored.
func (st *state) status(secretName string) RotationStatus {
	return RotationStatus{Source: secretName, Phase: st.phase, ActivateAt: st.activateAt, RetireAt: st.retireAt, Roots: len(st.roots), Sequence: st.number.sequence}
}

// RotationStatus reads the CA Secret and reports any rotation in progress.
func (c *CA) RotationStatus(ctx context.Context) (RotationStatus, error) {
	if c.plugged {
		ks := c.current.Load()
		return RotationStatus{Source: PluggedSecretName, Roots: len(ks.roots), Sequence: ks.sequence}, nil
	}
	return readSelfSignedStatus(ctx, c.client, c.opts.Namespace, c.opts.SecretName)
}

// ReadStatus reports on the CA of the cluster behind client, as the
// federators in namespace keep it.
func ReadStatus(ctx context.Context, client kubernetes.Interface, namespace string) (RotationStatus, error) {
	sec, err := client.CoreV1().Secrets(namespace).Get(ctx, PluggedSecretName, metav1.GetOptions{})
	if err == nil {
		roots, err := parseCerts(sec.Data[KeyRootCert])
		if err != nil {
			return RotationStatus{}, fmt.Errorf("plugged-in CA Secret %s/%s: %s: %w", namespace, PluggedSecretName, KeyRootCert, err)
		}
		st := RotationStatus{Source: PluggedSecretName, Roots: len(roots)}
		// The number the federators gave these roots, if they have yet.
		if num, err := client.CoreV1().Secrets(namespace).Get(ctx, DefaultSecretName, metav1.GetOptions{}); err == nil {
			if n, err := readBundleNumber(num); err == nil && n.digest == rootsDigest(roots) {
				st.Sequence = n.sequence
			}
		}
		return st, nil
	}
	if !apierrors.IsNotFound(err) {
		return RotationStatus{}, fmt.Errorf("read Secret %s/%s: %w", namespace, PluggedSecretName, err)
	}
	return readSelfSignedStatus(ctx, client, namespace, DefaultSecretName)
}

func readSelfSignedStatus(ctx context.Context, client kubernetes.Interface, namespace, name string) (RotationStatus, error) {
	sec, err := client.CoreV1().Secrets(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return RotationStatus{}, fmt.Errorf("read CA Secret %s/%s: %w", namespace, name, err)
	}
	st, err := parseState(sec)
	if err != nil {
		return RotationStatus{}, fmt.Errorf("CA Secret %s/%s: %w", namespace, name, err)
	}
	return st.status(name), nil
}

// newRoot makes a self-signed ECDSA P-256 root for td.
func newRoot(td spiffeid.TrustDomain, now time.Time) (crypto.Signer, *x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"Isthmus"}, CommonName: td.Name() + " root " + now.UTC().Format("2006-01-02T15:04:05Z")},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(DefaultRootTTL),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("create root certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	return key, cert, err
}

// matchKey checks that key (from the Secret's keyName) is the private key
// of cert (from certName).
func matchKey(cert *x509.Certificate, key crypto.Signer, certName, keyName string) error {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	pub, ok := key.Public().(equaler)
	if !ok || !pub.Equal(cert.PublicKey) {
		return fmt.Errorf("%s does not match the public key of %s", keyName, certName)
	}
	return nil
}

// pluggedKeySet validates an operator's cacerts Secret: the key matches
// the signing certificate, which is a CA and chains to one of the roots.
func pluggedKeySet(sec *corev1.Secret, now time.Time) (*keySet, error) {
	var errs []error
	key, err := parseKey(sec.Data[KeyCAKey])
	if err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", KeyCAKey, err))
	}
	certs, err := parseCerts(sec.Data[KeyCACert])
	if err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", KeyCACert, err))
	}
	roots, err := parseCerts(sec.Data[KeyRootCert])
	if err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", KeyRootCert, err))
	}
	var chain []*x509.Certificate
	if len(sec.Data[KeyCertChain]) > 0 {
		if chain, err = parseCerts(sec.Data[KeyCertChain]); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", KeyCertChain, err))
		}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%w: %w", ErrInvalidCA, errors.Join(errs...))
	}
	cert := certs[0]
	if err := matchKey(cert, key, KeyCACert, KeyCAKey); err != nil {
		errs = append(errs, err)
	}
	if !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		errs = append(errs, fmt.Errorf("%s is not a CA certificate allowed to sign certificates", KeyCACert))
	}
	if now.After(cert.NotAfter) {
		errs = append(errs, fmt.Errorf("%s expired at %s", KeyCACert, cert.NotAfter.UTC().Format(time.RFC3339)))
	}
	// Leaves carry ca-cert and the intermediates above it, never a root.
	isRoot := func(c *x509.Certificate) bool { return slices.ContainsFunc(roots, c.Equal) }
	var tail []*x509.Certificate
	if !isRoot(cert) {
		tail = append(tail, cert)
	}
	for _, c := range chain {
		if !c.Equal(cert) && !isRoot(c) {
			tail = append(tail, c)
		}
	}
	rootPool := x509.NewCertPool()
	for _, r := range roots {
		rootPool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range tail {
		inter.AddCert(c)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: rootPool, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		errs = append(errs, fmt.Errorf("%s does not chain to %s: %w", KeyCACert, KeyRootCert, err))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidCA, err)
	}
	// The sequence is numberPlugged's to give.
	return &keySet{key: key, cert: cert, chain: tail, roots: roots}, nil
}

// ReadRoots returns the roots of the cluster behind client as its
// federators keep them: from the plugged-in cacerts Secret if there is
// one, else from the self-signed CA's Secret.
func ReadRoots(ctx context.Context, client kubernetes.Interface, namespace string) ([]*x509.Certificate, error) {
	for _, name := range []string{PluggedSecretName, DefaultSecretName} {
		sec, err := client.CoreV1().Secrets(namespace).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read CA Secret %s/%s: %w", namespace, name, err)
		}
		roots, err := parseCerts(sec.Data[KeyRootCert])
		if err != nil {
			return nil, fmt.Errorf("CA Secret %s/%s: %s: %w", namespace, name, KeyRootCert, err)
		}
		return roots, nil
	}
	return nil, fmt.Errorf("no CA in namespace %s (neither %s nor %s): is the federator running in this cluster?", namespace, PluggedSecretName, DefaultSecretName)
}
