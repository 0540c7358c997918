//go:build kind

package kind

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	"sigs.k8s.io/yaml"
)

const (
	// The images the suite builds and loads into every cluster. A tag
	// other than latest, so IfNotPresent never looks for them in a
	// registry.
	federatorImage = "isthmus.local/federator:e2e"
	gatewayImage   = "isthmus.local/eastwest-gw:e2e"
	echoImage      = "isthmus.local/echo:e2e"

	// What deploy/multicluster installs.
	systemNamespace = "isthmus-system"
	federatorName   = "isthmus-federator"
	gatewayName     = "isthmus-eastwest-gw"
	// federatorUpstreamImage and gatewayUpstreamImage are the images
	// deploy/multicluster names; the overlay replaces them with
	// federatorImage and gatewayImage.
	federatorUpstreamImage = "ghcr.io/isthmus-mesh/federator"
	gatewayUpstreamImage   = "ghcr.io/isthmus-mesh/eastwest-gw"
	monitoringPort         = 15014

	// The workload the tests export.
	demoNamespace = "demo"
	echoName      = "echo"
	echoReplicas  = 2
	// ghostName is a ServiceExport without a Service.
	ghostName = "ghost"

	// imageIDAnnotation on a pod template carries the ID of the image
	// loaded into the cluster, so a rebuilt image rolls the pods of a
	// reused cluster even though the tag stays the same.
	imageIDAnnotation = "isthmus.dev/e2e-image-id"
)

// clusterSpec is one kind cluster of the suite.
type clusterSpec struct {
	// Name is the cluster's name in the mesh (the federator's
	// CLUSTER_NAME): a, b.
	Name string
	// Region and Zone label the cluster's node (topology.kubernetes.io/…),
	// so endpoints have a locality.
	Region, Zone string
	// Distinct per cluster, as in a real multi-cluster mesh.
	PodSubnet, ServiceSubnet string
}

// KindName is the kind cluster's name; kind names its kubeconfig context
// kind-<KindName>.
func (s clusterSpec) KindName() string { return "isthmus-" + s.Name }

// Context is the kubeconfig context kind writes for the cluster.
func (s clusterSpec) Context() string { return "kind-" + s.KindName() }

var clusterSpecs = []clusterSpec{
	{Name: "a", Region: "region-a", Zone: "zone-a1", PodSubnet: "10.244.0.0/16", ServiceSubnet: "10.96.0.0/16"},
	{Name: "b", Region: "region-b", Zone: "zone-b1", PodSubnet: "10.245.0.0/16", ServiceSubnet: "10.97.0.0/16"},
}

// kindConfig is the kind cluster configuration for s: one node, which
// then takes workloads too (kind removes the control-plane taint when
// there are no workers), labelled with s's region and zone. kind turns
// node labels into the kubelet's --node-labels, which may set the
// topology.kubernetes.io labels.
func kindConfig(s clusterSpec) []byte {
	return fmt.Appendf(nil, `kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  podSubnet: %q
  serviceSubnet: %q
nodes:
  - role: control-plane
    labels:
      topology.kubernetes.io/region: %q
      topology.kubernetes.io/zone: %q
`, s.PodSubnet, s.ServiceSubnet, s.Region, s.Zone)
}

// writeOverlay writes, into dir, a kustomization over deploy/multicluster
// (base) that runs the e2e images (imageIDs by reference), never pulls
// them, and names the cluster.
func writeOverlay(dir, base string, s clusterSpec, imageIDs map[string]string) error {
	// kustomize refuses an absolute path to a base ("new root cannot be
	// absolute"); a relative one may leave the overlay's directory.
	rel, err := filepath.Rel(dir, base)
	if err != nil {
		return err
	}
	name, tag := splitImage(federatorImage)
	gwName, gwTag := splitImage(gatewayImage)
	k := fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - %s
images:
  - name: %s
    newName: %s
    newTag: %s
  - name: %s
    newName: %s
    newTag: %s
patches:
  - target:
      group: apps
      version: v1
      kind: Deployment
      name: %s
      namespace: %s
    patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata:
        name: %s
        namespace: %s
      spec:
        template:
          metadata:
            annotations:
              %s: %s
          spec:
            containers:
              - name: federator
                imagePullPolicy: IfNotPresent
                env:
                  - name: CLUSTER_NAME
                    value: %s
  - target:
      group: apps
      version: v1
      kind: Deployment
      name: %s
      namespace: %s
    patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata:
        name: %s
        namespace: %s
      spec:
        template:
          metadata:
            annotations:
              %s: %s
          spec:
            containers:
              - name: eastwest-gw
                imagePullPolicy: IfNotPresent
`, strconv.Quote(filepath.ToSlash(rel)), federatorUpstreamImage, name, tag, gatewayUpstreamImage, gwName, gwTag,
		federatorName, systemNamespace, federatorName, systemNamespace,
		imageIDAnnotation, strconv.Quote(imageIDs[federatorImage]), strconv.Quote(s.Name),
		gatewayName, systemNamespace, gatewayName, systemNamespace,
		imageIDAnnotation, strconv.Quote(imageIDs[gatewayImage]))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644)
}

// splitImage splits "name:tag" at the tag's colon.
func splitImage(ref string) (name, tag string) {
	for i := len(ref) - 1; i >= 0; i-- {
		switch ref[i] {
		case ':':
			return ref[:i], ref[i+1:]
		case '/':
			return ref, ""
		}
	}
	return ref, ""
}

// echoManifests is the demo namespace, two echo pods (a Deployment) and
// the echo Service (port 80 → 8080, appProtocol http) for cluster s; with
// export, also a ServiceExport of echo and one of ghost, which has no
// Service.
func echoManifests(s clusterSpec, imageID string, export bool) ([]byte, error) {
	labels := map[string]string{"app": echoName}
	fieldEnv := func(name, path string) corev1.EnvVar {
		return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{
			FieldRef: &corev1.ObjectFieldSelector{APIVersion: "v1", FieldPath: path}}}
	}
	objs := []any{
		&corev1.Namespace{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Namespace"},
			ObjectMeta: metav1.ObjectMeta{Name: demoNamespace},
		},
		&appsv1.Deployment{
			TypeMeta:   metav1.TypeMeta{APIVersion: "apps/v1", Kind: "Deployment"},
			ObjectMeta: metav1.ObjectMeta{Namespace: demoNamespace, Name: echoName, Labels: labels},
			Spec: appsv1.DeploymentSpec{
				Replicas: new(int32(echoReplicas)),
				Selector: &metav1.LabelSelector{MatchLabels: labels},
				Template: corev1.PodTemplateSpec{
					ObjectMeta: metav1.ObjectMeta{Labels: labels, Annotations: map[string]string{imageIDAnnotation: imageID}},
					Spec: corev1.PodSpec{
						SecurityContext: &corev1.PodSecurityContext{
							RunAsNonRoot:   new(true),
							SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
						},
						Containers: []corev1.Container{{
							Name:            echoName,
							Image:           echoImage,
							ImagePullPolicy: corev1.PullIfNotPresent,
							// echo listens on $POD_IP:8080.
							Env: []corev1.EnvVar{
								fieldEnv("POD_IP", "status.podIP"),
								fieldEnv("POD_NAME", "metadata.name"),
								fieldEnv("POD_NAMESPACE", "metadata.namespace"),
								{Name: "CLUSTER_NAME", Value: s.Name},
							},
							Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}},
							ReadinessProbe: &corev1.Probe{
								ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromString("http")}},
								PeriodSeconds: 2,
							},
							SecurityContext: &corev1.SecurityContext{
								AllowPrivilegeEscalation: new(false),
								ReadOnlyRootFilesystem:   new(true),
								Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
							},
							Resources: corev1.ResourceRequirements{
								Requests: corev1.ResourceList{
									corev1.ResourceCPU:    resource.MustParse("10m"),
									corev1.ResourceMemory: resource.MustParse("16Mi"),
								},
								Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Mi")},
							},
						}},
					},
				},
			},
		},
		&corev1.Service{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Service"},
			ObjectMeta: metav1.ObjectMeta{Namespace: demoNamespace, Name: echoName, Labels: labels},
			Spec: corev1.ServiceSpec{
				Selector: labels,
				Ports: []corev1.ServicePort{{
					Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080),
					Protocol: corev1.ProtocolTCP, AppProtocol: new("http"),
				}},
			},
		},
	}
	if export {
		for _, name := range []string{echoName, ghostName} {
			objs = append(objs, &mcsv1alpha1.ServiceExport{
				TypeMeta:   metav1.TypeMeta{APIVersion: mcsv1alpha1.GroupVersion.String(), Kind: "ServiceExport"},
				ObjectMeta: metav1.ObjectMeta{Namespace: demoNamespace, Name: name},
			})
		}
	}
	var out bytes.Buffer
	for _, o := range objs {
		b, err := yaml.Marshal(o)
		if err != nil {
			return nil, err
		}
		out.WriteString("---\n")
		out.Write(b)
	}
	return out.Bytes(), nil
}
