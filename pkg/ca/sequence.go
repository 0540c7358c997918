package ca

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// annRootsDigest names the roots that annSequence numbers (rootsDigest).
const annRootsDigest = "ca.isthmus.dev/bundle-roots-sha256"

// bundleNumber is the trust bundle's sequence number and the roots it
// numbers. Peers refuse a bundle numbered lower than one they hold, for
// good, so the number must never go down: not across restarts, not when
// the CA moves between a plugged-in and a self-signed root, not when the
// CA Secret is recreated.
//
// It is kept in the annotations of the self-signed CA's Secret
// (SecretName), whichever source the roots come from: with a plugged-in CA
// that Secret holds only the number until a self-signed root is needed.
// The same roots keep their number (restarts and replicas agree); other
// roots get a higher one, at least the current Unix time, so that a number
// lost with its Secret, or one from before it was kept (a plugged-in CA
// used to be numbered with the time it was loaded), is still exceeded.
type bundleNumber struct {
	sequence uint64
	// digest is rootsDigest of the roots numbered sequence; empty when
	// unknown.
	digest string
}

// rootsDigest identifies a set of roots regardless of their order.
func rootsDigest(roots []*x509.Certificate) string {
	sums := make([][sha256.Size]byte, len(roots))
	for i, r := range roots {
		sums[i] = sha256.Sum256(r.Raw)
	}
	slices.SortFunc(sums, func(a, b [sha256.Size]byte) int { return bytes.Compare(a[:], b[:]) })
	h := sha256.New()
	for _, s := range sums {
		h.Write(s[:])
	}
	return hex.EncodeToString(h.Sum(nil))
}

// forRoots returns the number of roots: n itself if it numbers them,
// else a higher one; and whether it changed.
func (n bundleNumber) forRoots(roots []*x509.Certificate, now time.Time) (bundleNumber, bool) {
	d := rootsDigest(roots)
	if n.sequence > 0 && n.digest == d {
		return n, false
	}
	return bundleNumber{sequence: max(n.sequence+1, uint64(max(now.Unix(), 0))), digest: d}, true
}

// readBundleNumber reads the number kept in sec's annotations.
func readBundleNumber(sec *corev1.Secret) (bundleNumber, error) {
	var n bundleNumber
	if v := sec.Annotations[annSequence]; v != "" {
		var err error
		if n.sequence, err = strconv.ParseUint(v, 10, 64); err != nil {
			return bundleNumber{}, fmt.Errorf("annotation %s: %w", annSequence, err)
		}
	}
	n.digest = sec.Annotations[annRootsDigest]
	if n.digest == "" && n.sequence > 0 {
		// Kept before the digest was: the number was the self-signed
		// CA's own, for the roots in the Secret.
		if roots, err := parseCerts(sec.Data[KeyRootCert]); err == nil {
			n.digest = rootsDigest(roots)
		}
	}
	return n, nil
}

func (n bundleNumber) write(sec *corev1.Secret) {
	if sec.Annotations == nil {
		sec.Annotations = map[string]string{}
	}
	sec.Annotations[annSequence] = strconv.FormatUint(n.sequence, 10)
	sec.Annotations[annRootsDigest] = n.digest
}

// hasKeyMaterial reports whether sec holds a self-signed CA rather than
// only the bundle number a plugged-in CA left there.
func hasKeyMaterial(sec *corev1.Secret) bool {
	return len(sec.Data[KeyCAKey]) > 0 || len(sec.Data[KeyCACert]) > 0 || len(sec.Data[KeyRootCert]) > 0
}

// numberPlugged sets ks.sequence for a plugged-in CA's roots from the
// number kept in SecretName, creating or updating it when the roots are
// new. A self-signed root in that Secret is left alone.
func (c *CA) numberPlugged(ctx context.Context, ks *keySet) error {
	return c.retryRaces(func() error {
		sec, err := c.client.CoreV1().Secrets(c.opts.Namespace).Get(ctx, c.opts.SecretName, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			sec = nil
		} else if err != nil {
			return fmt.Errorf("read bundle number in Secret %s/%s: %w", c.opts.Namespace, c.opts.SecretName, err)
		}
		var cur bundleNumber
		if sec != nil {
			if cur, err = readBundleNumber(sec); err != nil {
				return fmt.Errorf("%w: Secret %s/%s: %w", ErrInvalidCA, c.opts.Namespace, c.opts.SecretName, err)
			}
		}
		next, changed := cur.forRoots(ks.roots, c.Authority.clock.Now())
		if changed {
			if _, err := c.putSecret(ctx, sec, next.write); err != nil {
				return fmt.Errorf("keep bundle number in Secret %s/%s: %w", c.opts.Namespace, c.opts.SecretName, err)
			}
		}
		ks.sequence = next.sequence
		return nil
	})
}
