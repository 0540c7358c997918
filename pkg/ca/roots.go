package ca

import (
	"context"
	"fmt"
	"maps"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// RootsConfigMapName is the ConfigMap, in the CA's namespace, that holds
// the cluster's trusted roots under KeyRootCert (PEM). It is how a proxy
// pod bootstraps: it mounts the ConfigMap as a file (the east-west
// gateway's --ca-roots-file) and verifies the CA with it before it holds
// any credential, so it needs no access to the Kubernetes API. Istio's
// istio-ca-root-cert plays the same part. Roots are public; the keys stay
// in the CA Secret.
const RootsConfigMapName = "isthmus-ca-root-cert"

// PublishRoots writes the current bundle's roots into RootsConfigMapName,
// creating it if needed, and writes nothing when it already holds them.
// Call it after every change of the bundle (Subscribe): during a root
// rotation the ConfigMap carries the old and the new root, so a pod that
// starts then trusts whichever signs the CA's certificate. Keys other
// than KeyRootCert are left alone.
//
// The ConfigMap is labelled app.kubernetes.io/managed-by=isthmus, as the
// federator's copies in every other namespace are (kube.RootsPublisher,
// which keeps this one current too once the federator runs): in its own
// namespace the CA takes the name whoever created it.
func (c *CA) PublishRoots(ctx context.Context) error {
	pemRoots := string(encodeCerts(c.Bundle().X509Authorities()...))
	cms := c.client.CoreV1().ConfigMaps(c.opts.Namespace)
	cm, err := cms.Get(ctx, RootsConfigMapName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = cms.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Namespace: c.opts.Namespace, Name: RootsConfigMapName, Labels: RootsLabels()},
			Data:       map[string]string{KeyRootCert: pemRoots},
		}, metav1.CreateOptions{})
	case err == nil:
		labelled := true
		for k, v := range RootsLabels() {
			labelled = labelled && cm.Labels[k] == v
		}
		if cm.Data[KeyRootCert] == pemRoots && labelled {
			return nil
		}
		if cm.Data == nil {
			cm.Data = map[string]string{}
		}
		cm.Data[KeyRootCert] = pemRoots
		if cm.Labels == nil {
			cm.Labels = map[string]string{}
		}
		maps.Copy(cm.Labels, RootsLabels())
		_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
	}
	if err != nil {
		return fmt.Errorf("publish roots in ConfigMap %s/%s: %w", c.opts.Namespace, RootsConfigMapName, err)
	}
	return nil
}

// RootsLabels mark a roots ConfigMap as Isthmus's, in the CA's namespace
// and in every other (kube.RootsPublisher changes only ConfigMaps that
// carry them).
func RootsLabels() map[string]string {
	return map[string]string{"app.kubernetes.io/part-of": "isthmus", "app.kubernetes.io/managed-by": "isthmus"}
}
