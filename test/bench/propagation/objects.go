package main

import (
	"context"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
	mcsinformers "sigs.k8s.io/mcs-api/pkg/client/informers/externalversions"

	"github.com/isthmus-mesh/isthmus/test/bench/internal/bulk"
)

// servicePort is every service's one port; its SNI at the gateway is
// outbound_.8443_._.<name>.<namespace>.svc.cluster.local.
const servicePort = 8443

func measuredName(i int) string   { return fmt.Sprintf("prop-%03d", i) }
func backgroundName(i int) string { return fmt.Sprintf("bg-%04d", i) }

func (b *bench) ensureNamespace(ctx context.Context, ns string) error {
	_, err := b.kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %s: %w", ns, err)
	}
	return nil
}

// createServices creates n Services named name(0..n-1) in ns, each with
// one TCP port and no selector, and beside each the EndpointSlice that a
// controller would write: one ready endpoint, the backend. Untimed;
// transient errors are retried.
func (b *bench) createServices(ctx context.Context, ns string, name func(int) string, n, workers int) error {
	return bulk.ForEach(ctx, n, workers, func(ctx context.Context, i int) error {
		if err := bulk.Retry(ctx, func() error { return b.createService(ctx, ns, name(i)) }); err != nil {
			return fmt.Errorf("create Service %s/%s: %w", ns, name(i), err)
		}
		if err := bulk.Retry(ctx, func() error { return b.createSlice(ctx, ns, name(i)) }); err != nil {
			return fmt.Errorf("create the EndpointSlice of %s/%s: %w", ns, name(i), err)
		}
		return nil
	})
}

func (b *bench) createService(ctx context.Context, ns, name string) error {
	_, err := b.kube.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			{Name: "tls", Port: servicePort, Protocol: corev1.ProtocolTCP},
		}},
	}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

func (b *bench) createSlice(ctx context.Context, ns, name string) error {
	ready := true
	portName := "tls"
	protocol := corev1.ProtocolTCP
	_, err := b.kube.DiscoveryV1().EndpointSlices(ns).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name + "-bench", Labels: map[string]string{
			discoveryv1.LabelServiceName: name,
			// Not kube-controller-manager's: it leaves the slice alone.
			discoveryv1.LabelManagedBy: "bench-propagation",
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{
			Addresses:  []string{b.backend.ip},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready},
		}},
		Ports: []discoveryv1.EndpointPort{{Name: &portName, Port: &b.backend.port, Protocol: &protocol}},
	}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

// createExport is the timed Create: no retry.
func (b *bench) createExport(ctx context.Context, ns, name string) error {
	_, err := b.mcs.MulticlusterV1alpha1().ServiceExports(ns).Create(ctx,
		&mcsv1alpha1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create ServiceExport %s/%s: %w", ns, name, err)
	}
	return nil
}

// deleteExport is the timed Delete: no retry.
func (b *bench) deleteExport(ctx context.Context, ns, name string) error {
	err := b.mcs.MulticlusterV1alpha1().ServiceExports(ns).Delete(ctx, name, metav1.DeleteOptions{})
	if err != nil {
		return fmt.Errorf("delete ServiceExport %s/%s: %w", ns, name, err)
	}
	return nil
}

// exportEvents timestamps, with an informer in this process, the watch
// events of the ServiceExports of one namespace as they arrive: the
// earliest any controller, the federator included, can learn of a change.
type exportEvents struct {
	factory mcsinformers.SharedInformerFactory
	stop    chan struct{}

	// mu guards added and deleted: the latest time each name was added
	// or deleted.
	mu      sync.Mutex
	added   map[string]time.Time
	deleted map[string]time.Time
}

func watchExports(ctx context.Context, mcs mcsclient.Interface, ns string) (*exportEvents, error) {
	e := &exportEvents{
		factory: mcsinformers.NewSharedInformerFactoryWithOptions(mcs, 0, mcsinformers.WithNamespace(ns)),
		stop:    make(chan struct{}),
		added:   map[string]time.Time{},
		deleted: map[string]time.Time{},
	}
	record := func(m map[string]time.Time) func(obj any) {
		return func(obj any) {
			now := time.Now()
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			se, ok := obj.(*mcsv1alpha1.ServiceExport)
			if !ok {
				return
			}
			e.mu.Lock()
			m[se.Name] = now
			e.mu.Unlock()
		}
	}
	inf := e.factory.Multicluster().V1alpha1().ServiceExports().Informer()
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: record(e.added), DeleteFunc: record(e.deleted)}); err != nil {
		return nil, err
	}
	e.factory.Start(e.stop)
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if !cache.WaitForCacheSync(sctx.Done(), inf.HasSynced) {
		e.close()
		return nil, fmt.Errorf("ServiceExport informer did not sync: %w", sctx.Err())
	}
	return e, nil
}

func (e *exportEvents) close() {
	close(e.stop)
	e.factory.Shutdown()
}

// after waits, at most a few seconds, for an add (or delete) of name seen
// at or after t and returns when it was seen.
func (e *exportEvents) after(ctx context.Context, name string, deleted bool, t time.Time) (time.Time, bool) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for {
		e.mu.Lock()
		at, ok := e.added[name]
		if deleted {
			at, ok = e.deleted[name]
		}
		e.mu.Unlock()
		if ok && !at.Before(t) {
			return at, true
		}
		select {
		case <-ctx.Done():
			return time.Time{}, false
		case <-time.After(time.Millisecond):
		}
	}
}
