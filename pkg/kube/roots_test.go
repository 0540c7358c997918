package kube

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	kubefake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/isthmus-mesh/isthmus/internal/pemutil"
	"github.com/isthmus-mesh/isthmus/internal/testlog"
	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/test/install"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// rootsFixture is a real kube-apiserver with deploy/'s RBAC, a real
// cluster CA, and a RootsPublisher running as the federator's user, so
// the RBAC the publisher needs is exercised for real.
type rootsFixture struct {
	admin kubernetes.Interface
	ca    *ca.CA
	p     *RootsPublisher
}

func startRootsPublisher(t *testing.T, before func(ctx context.Context, admin kubernetes.Interface)) *rootsFixture {
	t.Helper()
	env := localcluster.StartT(t, "a")
	a := env.Cluster("a")
	ctx := t.Context()
	adminCfg, err := a.RESTConfig(localcluster.UserAdmin)
	require.NoError(t, err)
	require.NoError(t, install.Isthmus(ctx, adminCfg, "system:isthmus:federator"))
	fed, err := a.ClientFor(localcluster.UserFederator)
	require.NoError(t, err)
	f := &rootsFixture{admin: a.Client()}
	if before != nil {
		before(ctx, f.admin)
	}

	// As the federator starts: the CA, its roots in its own namespace,
	// then the publisher.
	f.ca, err = ca.New(ctx, fed, ca.Options{TrustDomain: spiffeid.RequireTrustDomainFromString("a.mesh"), Namespace: "isthmus-system",
		PublishDelay: time.Hour, Logger: testlog.New(t)})
	require.NoError(t, err)
	require.NoError(t, f.ca.PublishRoots(ctx))
	f.p, err = NewRootsPublisher(fed, f.ca, RootsOptions{Logger: testlog.New(t), QPS: 200, Burst: 200})
	require.NoError(t, err)
	runUntilCleanup(t, "roots publisher", f.p.Run)
	return f
}

func (f *rootsFixture) createNamespace(t *testing.T, name string) {
	t.Helper()
	_, err := f.admin.CoreV1().Namespaces().Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	require.NoError(t, err)
}

func (f *rootsFixture) get(t *testing.T, ns string) (*corev1.ConfigMap, bool) {
	t.Helper()
	cm, err := f.admin.CoreV1().ConfigMaps(ns).Get(t.Context(), ca.RootsConfigMapName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, false
	}
	require.NoError(t, err)
	return cm, true
}

// wantPEM is what every copy must hold now: the CA's bundle, encoded as
// the CA encodes it in its own namespace.
func (f *rootsFixture) wantPEM() string {
	return string(pemutil.EncodeCertificates(f.ca.Bundle().X509Authorities()...))
}

// eventually waits until ns's ConfigMap satisfies cond, and returns it.
func (f *rootsFixture) eventually(t *testing.T, ns, what string, cond func(cm *corev1.ConfigMap, ok bool) bool) *corev1.ConfigMap {
	t.Helper()
	var last *corev1.ConfigMap
	require.Eventually(t, func() bool {
		cm, ok := f.get(t, ns)
		last = cm
		return cond(cm, ok)
	}, 30*time.Second, 20*time.Millisecond, "%s: ConfigMap %s/%s; last seen: %v", what, ns, ca.RootsConfigMapName, last)
	return last
}

// current is a condition: Isthmus's copy with the CA's current roots.
func (f *rootsFixture) current(cm *corev1.ConfigMap, ok bool) bool {
	return ok && cm.DeletionTimestamp == nil && cm.Labels[LabelManagedBy] == ManagedByIsthmus && cm.Data[ca.KeyRootCert] == f.wantPEM()
}

func rootsIn(t *testing.T, cm *corev1.ConfigMap) []*x509.Certificate {
	t.Helper()
	certs, err := pemutil.ParseCertificates([]byte(cm.Data[ca.KeyRootCert]))
	require.NoError(t, err)
	return certs
}

// TestRootsPublisher runs the publisher as the federator's user (with
// exactly deploy/'s RBAC) against a real kube-apiserver and
// kube-controller-manager, and a real cluster CA, through the life of a
// cluster: namespaces that exist at start and that come later, a root
// rotation as `federator ca rotate` starts it, a user's edit and
// deletion, someone else's ConfigMap of the same name, and a namespace
// being deleted.
func TestRootsPublisher(t *testing.T) {
	theirData := map[string]string{ca.KeyRootCert: "their own roots", "owner": "platform team"}
	f := startRootsPublisher(t, func(ctx context.Context, admin kubernetes.Interface) {
		for _, ns := range []string{"demo", "theirs"} {
			_, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
			require.NoError(t, err)
		}
		_, err := admin.CoreV1().ConfigMaps("theirs").Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: ca.RootsConfigMapName, Labels: map[string]string{"team": "platform"}},
			Data:       theirData,
		}, metav1.CreateOptions{})
		require.NoError(t, err)
	})
	ctx := t.Context()
	cms := func(ns string) interface {
		Update(context.Context, *corev1.ConfigMap, metav1.UpdateOptions) (*corev1.ConfigMap, error)
		Delete(context.Context, string, metav1.DeleteOptions) error
	} {
		return f.admin.CoreV1().ConfigMaps(ns)
	}

	// Every namespace that exists at start gets the CA's roots, the same
	// bytes the CA wrote in its own namespace.
	own, ok := f.get(t, "isthmus-system")
	require.True(t, ok)
	for _, ns := range []string{"default", "kube-system", "kube-public", "kube-node-lease", "demo", "isthmus-system"} {
		cm := f.eventually(t, ns, "published at start", f.current)
		require.Equal(t, own.Data[ca.KeyRootCert], cm.Data[ca.KeyRootCert], ns)
		require.Equal(t, f.ca.Bundle().X509Authorities(), rootsIn(t, cm), ns)
		require.Equal(t, "isthmus", cm.Labels["app.kubernetes.io/part-of"], ns)
	}

	t.Run("someone else's ConfigMap is left alone and reported", func(t *testing.T) {
		want := []RootsConflict{{Namespace: "theirs", Reason: "ConfigMap theirs/isthmus-ca-root-cert exists and is not managed by Isthmus " +
			"(no label app.kubernetes.io/managed-by=isthmus); left untouched, so pods in theirs do not get the CA's roots from it"}}
		require.Eventually(t, func() bool { return len(f.p.Conflicts()) == 1 }, 30*time.Second, 20*time.Millisecond)
		require.Equal(t, want, f.p.Conflicts())
		cm, ok := f.get(t, "theirs")
		require.True(t, ok)
		require.Equal(t, theirData, cm.Data)
		require.Equal(t, map[string]string{"team": "platform"}, cm.Labels)
	})

	t.Run("a new namespace gets it", func(t *testing.T) {
		f.createNamespace(t, "late")
		f.eventually(t, "late", "published in a new namespace", f.current)
	})

	t.Run("an edit is put right", func(t *testing.T) {
		cm, ok := f.get(t, "demo")
		require.True(t, ok)
		cm.Data[ca.KeyRootCert] = "-----BEGIN CERTIFICATE-----\nnot the CA\n-----END CERTIFICATE-----\n"
		cm.Data["note"] = "a key of the user's"
		_, err := cms("demo").Update(ctx, cm, metav1.UpdateOptions{})
		require.NoError(t, err)
		cm = f.eventually(t, "demo", "roots restored after an edit", f.current)
		require.Equal(t, "a key of the user's", cm.Data["note"], "other keys are left alone, as the CA does in its namespace")
	})

	t.Run("a deletion is put right", func(t *testing.T) {
		old, ok := f.get(t, "demo")
		require.True(t, ok)
		require.NoError(t, cms("demo").Delete(ctx, ca.RootsConfigMapName, metav1.DeleteOptions{}))
		cm := f.eventually(t, "demo", "re-created after a deletion", f.current)
		require.NotEqual(t, old.UID, cm.UID)
	})

	// A namespace being deleted, whose copy a finalizer keeps: the
	// namespace stays Terminating, and its copy must not be written.
	f.createNamespace(t, "leaving")
	f.eventually(t, "leaving", "published", f.current)
	_, err := f.admin.CoreV1().ConfigMaps("leaving").Patch(ctx, ca.RootsConfigMapName, types.MergePatchType,
		[]byte(`{"metadata":{"finalizers":["test.isthmus.dev/hold"]}}`), metav1.PatchOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		// Let the namespace go, so nothing outlives the test by design.
		_, _ = f.admin.CoreV1().ConfigMaps("leaving").Patch(context.WithoutCancel(ctx), ca.RootsConfigMapName, types.MergePatchType,
			[]byte(`{"metadata":{"finalizers":null}}`), metav1.PatchOptions{})
	})
	require.NoError(t, f.admin.CoreV1().Namespaces().Delete(ctx, "leaving", metav1.DeleteOptions{}))
	leaving := f.eventually(t, "leaving", "held by its finalizer while the namespace terminates", func(cm *corev1.ConfigMap, ok bool) bool {
		return ok && cm.DeletionTimestamp != nil
	})
	ns, err := f.admin.CoreV1().Namespaces().Get(ctx, "leaving", metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, corev1.NamespaceTerminating, ns.Status.Phase)

	t.Run("a root rotation reaches every namespace", func(t *testing.T) {
		before := f.ca.Bundle().X509Authorities()
		require.Len(t, before, 1)
		// What `federator ca rotate` does, then the step the running
		// federator's CA takes at its next sync: the new root is
		// published next to the old one before it signs anything.
		require.NoError(t, ca.RequestRotation(ctx, f.admin, "isthmus-system", ""))
		require.NoError(t, f.ca.Reconcile(ctx))
		require.Len(t, f.ca.Bundle().X509Authorities(), 2)
		for _, ns := range []string{"default", "kube-system", "kube-public", "kube-node-lease", "demo", "late", "isthmus-system"} {
			cm := f.eventually(t, ns, "rotated", f.current)
			require.Equal(t, f.ca.Bundle().X509Authorities(), rootsIn(t, cm), ns)
		}

		// The terminating namespace's copy was not touched: still the one
		// root, the same version.
		cm, ok := f.get(t, "leaving")
		require.True(t, ok)
		require.Equal(t, leaving.ResourceVersion, cm.ResourceVersion, "no write in a terminating namespace")
		require.Equal(t, before, rootsIn(t, cm))
		// Nor someone else's.
		cm, ok = f.get(t, "theirs")
		require.True(t, ok)
		require.Equal(t, theirData, cm.Data)
	})

	t.Run("once their ConfigMap goes, Isthmus's copy is written", func(t *testing.T) {
		require.NoError(t, cms("theirs").Delete(ctx, ca.RootsConfigMapName, metav1.DeleteOptions{}))
		f.eventually(t, "theirs", "published once the name is free", f.current)
		require.Eventually(t, func() bool { return len(f.p.Conflicts()) == 0 }, 30*time.Second, 20*time.Millisecond,
			"conflict cleared: %v", f.p.Conflicts())
	})

	t.Run("handing a copy over: unlabelled, it is left alone", func(t *testing.T) {
		cm, ok := f.get(t, "late")
		require.True(t, ok)
		delete(cm.Labels, LabelManagedBy)
		cm.Data[ca.KeyRootCert] = "ours now"
		_, err := cms("late").Update(ctx, cm, metav1.UpdateOptions{})
		require.NoError(t, err)
		require.Eventually(t, func() bool {
			c := f.p.Conflicts()
			return len(c) == 1 && c[0].Namespace == "late"
		}, 30*time.Second, 20*time.Millisecond, "reported: %v", f.p.Conflicts())
		cm, ok = f.get(t, "late")
		require.True(t, ok)
		require.Equal(t, "ours now", cm.Data[ca.KeyRootCert])
	})
}

// staticRoots is a RootsSource that never changes.
type staticRoots struct{ b *x509bundle.Bundle }

func (s staticRoots) Bundle() *x509bundle.Bundle           { return s.b }
func (s staticRoots) Subscribe() (<-chan struct{}, func()) { return make(chan struct{}), func() {} }

// TestRootsPublisherRateLimited: the writes of many namespaces at once
// (a start, a rotation) are paced by the token bucket, however many
// workers there are, so a big cluster's API server sees a trickle. The
// client-go fake is enough here: what is measured is when the publisher
// sends, not what the API server does with it.
func TestRootsPublisherRateLimited(t *testing.T) {
	const namespaces, qps = 12, 20
	var objs []runtime.Object
	for i := range namespaces {
		objs = append(objs, namespace(fmt.Sprintf("ns-%02d", i)))
	}
	kc := kubefake.NewClientset(objs...)
	var mu sync.Mutex
	var creates []time.Time
	kc.PrependReactor("create", "configmaps", func(k8stesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		creates = append(creates, time.Now())
		mu.Unlock()
		return false, nil, nil // the tracker stores it
	})
	authority := newTestAuthority(t)
	p, err := NewRootsPublisher(kc, staticRoots{authority}, RootsOptions{Logger: testlog.New(t), QPS: qps, Burst: 1, Workers: 4})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	defer func() {
		cancel()
		require.NoError(t, <-done)
	}()
	require.Eventually(t, func() bool {
		list, err := kc.CoreV1().ConfigMaps("").List(t.Context(), metav1.ListOptions{})
		return err == nil && len(list.Items) == namespaces
	}, 30*time.Second, 10*time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, creates, namespaces)
	// A bucket of one token refilled qps times a second: the last create
	// can come no sooner than (n-1)/qps after the first.
	spread := creates[len(creates)-1].Sub(creates[0])
	require.GreaterOrEqual(t, spread, time.Duration(namespaces-1)*time.Second/qps*9/10, "creates spread over %s", spread)
}

// newTestAuthority is a bundle of one self-signed root.
func newTestAuthority(t *testing.T) *x509bundle.Bundle {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test root"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return x509bundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString("a.mesh"), []*x509.Certificate{cert})
}
