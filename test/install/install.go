// Package install applies Isthmus's manifests from deploy/ to a cluster,
// the way `kubectl apply` would (server-side apply), for the local
// multi-cluster tests and the demo. Using the embedded manifests means the
// tests exercise exactly the CRDs and RBAC an operator installs.
package install

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"

	"github.com/isthmus-mesh/isthmus/deploy"
)

const fieldManager = "isthmus-install"

// IstioServiceEntryCRD is Istio's own ServiceEntry CRD, copied from the
// istio.io/api module by `make generate`. Isthmus does not install it (a
// cluster's Istio does); tests apply it to prove that what Isthmus writes
// passes Istio's schema unchanged.
//
//go:embed istio/networking.istio.io_serviceentries.yaml
var IstioServiceEntryCRD []byte

// IstioAuthorizationPolicyCRD is Istio's own AuthorizationPolicy CRD,
// copied the same way. The federator reads the policies (pkg/kube);
// tests apply it wherever a cluster's Istio would have it.
//
//go:embed istio/security.istio.io_authorizationpolicies.yaml
var IstioAuthorizationPolicyCRD []byte

// IstioPeerAuthenticationCRD is Istio's own PeerAuthentication CRD,
// copied the same way. The federator reads the policies (pkg/kube);
// tests apply it wherever a cluster's Istio would have it.
//
//go:embed istio/security.istio.io_peerauthentications.yaml
var IstioPeerAuthenticationCRD []byte

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// Apply server-side-applies every object in the YAML documents, in order.
// CRDs are waited for until Established, so later documents may use them.
func Apply(ctx context.Context, cfg *rest.Config, manifests ...[]byte) error {
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return err
	}
	cached := memory.NewMemCacheClient(dc)
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(cached)
	for _, m := range manifests {
		dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(m), 4096)
		for {
			var obj unstructured.Unstructured
			if err := dec.Decode(&obj.Object); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				return fmt.Errorf("decode manifest: %w", err)
			}
			if len(obj.Object) == 0 {
				continue
			}
			gvk := obj.GroupVersionKind()
			mapping, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
			if err != nil {
				return fmt.Errorf("%s %s: %w", gvk.Kind, obj.GetName(), err)
			}
			data, err := obj.MarshalJSON()
			if err != nil {
				return err
			}
			var ri dynamic.ResourceInterface = dyn.Resource(mapping.Resource)
			if ns := obj.GetNamespace(); ns != "" {
				ri = dyn.Resource(mapping.Resource).Namespace(ns)
			}
			if _, err := ri.Patch(ctx, obj.GetName(), types.ApplyPatchType, data,
				metav1.PatchOptions{FieldManager: fieldManager, Force: new(true), FieldValidation: "Strict"}); err != nil {
				return fmt.Errorf("apply %s %s: %w", gvk.Kind, obj.GetName(), err)
			}
			if mapping.Resource == crdGVR {
				if err := waitEstablished(ctx, dyn, obj.GetName()); err != nil {
					return err
				}
				cached.Invalidate()
				mapper.Reset()
			}
		}
	}
	return nil
}

func waitEstablished(ctx context.Context, dyn dynamic.Interface, name string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		crd, err := dyn.Resource(crdGVR).Get(ctx, name, metav1.GetOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("CRD %s: %w", name, err)
		}
		if err == nil {
			conds, _, _ := unstructured.NestedSlice(crd.Object, "status", "conditions")
			for _, c := range conds {
				m, _ := c.(map[string]any)
				if m["type"] == "Established" && m["status"] == "True" {
					return nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("CRD %s not established: %w", name, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Isthmus installs the CRDs, the isthmus-system namespace and the
// federator's RBAC from deploy/, then binds the federator's ClusterRole to
// user as well (and its Role in isthmus-system): in the local harness the federator runs as a process with
// that user's token rather than as a pod with the ServiceAccount, and must
// get exactly the ServiceAccount's permissions.
func Isthmus(ctx context.Context, cfg *rest.Config, user string) error {
	binding := fmt.Sprintf(`apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: isthmus-federator-harness-user
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: isthmus-federator
subjects:
  - apiGroup: rbac.authorization.k8s.io
    kind: User
    name: %[1]q
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: isthmus-federator-harness-user
  namespace: isthmus-system
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: isthmus-federator
subjects:
  - apiGroup: rbac.authorization.k8s.io
    kind: User
    name: %[1]q
`, user)
	return Apply(ctx, cfg, deploy.ServiceExportCRD, deploy.ServiceImportCRD, deploy.FederationPeerCRD, deploy.Namespace, deploy.FederatorRBAC, []byte(binding))
}
