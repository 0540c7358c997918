//go:build kind

package kind

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Environment knobs (README.md).
const (
	// envReuse=1: use isthmus-a and isthmus-b if they already exist
	// instead of refusing to touch them.
	envReuse = "ISTHMUS_KIND_REUSE"
	// envKeep=1: leave the clusters running at the end.
	envKeep = "ISTHMUS_KIND_KEEP"
	// envNodeImage: the kindest/node image to create clusters with (kind's
	// default when empty).
	envNodeImage = "ISTHMUS_KIND_NODE_IMAGE"
)

// Bounds on each step; every wait in the suite has one.
const (
	toolCheckTimeout = 30 * time.Second
	renderTimeout    = time.Minute
	federatorBuild   = 20 * time.Minute
	gatewayBuild     = 10 * time.Minute
	echoBuild        = 10 * time.Minute
	inspectTimeout   = 30 * time.Second
	createTimeout    = 6 * time.Minute
	nodeReadyWait    = "3m" // kind create cluster --wait
	deleteTimeout    = 3 * time.Minute
	loadTimeout      = 5 * time.Minute
	applyTimeout     = 2 * time.Minute
	crdWait          = 60 * time.Second
	rolloutWait      = 3 * time.Minute
	// The gateway's pods wait for ConfigMaps the federator writes at its
	// first start; the kubelet retries their volume with a backoff of up
	// to about two minutes.
	gatewayRolloutWait = 5 * time.Minute
	kubectlTimeout     = 30 * time.Second
	diagnosticsTimeout = 30 * time.Second
)

// suite is the two kind clusters with Isthmus installed.
type suite struct {
	root     string // repository root
	dir      string // the run's scratch directory (kind configs, kubeconfigs, overlays)
	run      *runner
	clusters map[string]*cluster // by mesh name: a, b
	imageIDs map[string]string   // by image reference
}

// cluster is one kind cluster, reached with its own kubeconfig file so the
// suite never touches the user's ~/.kube/config.
type cluster struct {
	clusterSpec
	kubeconfig string
	run        *runner
}

// kubectl runs kubectl against c.
func (c *cluster) kubectl(ctx context.Context, timeout time.Duration, stdin []byte, args ...string) (string, error) {
	return c.run.run(ctx, timeout, stdin, "kubectl",
		append([]string{"--kubeconfig", c.kubeconfig, "--context", c.Context()}, args...)...)
}

// getRaw GETs an API server path (kubectl get --raw): the API server's
// service proxy reaches the federator's monitoring port with no
// port-forward to clean up.
func (c *cluster) getRaw(ctx context.Context, path string) ([]byte, error) {
	out, err := c.kubectl(ctx, kubectlTimeout, nil, "get", "--raw", path, "--request-timeout=20s")
	return []byte(out), err
}

// setUp builds the images, creates (or reuses) the clusters, loads the
// images and installs deploy/multicluster in each; the clusters go away
// when t ends unless ISTHMUS_KIND_KEEP=1.
func setUp(t *testing.T) *suite {
	t.Helper()
	requireTools(t)
	ctx := t.Context()
	s := &suite{
		root:     repoRoot(t),
		dir:      t.TempDir(),
		run:      &runner{logf: t.Logf},
		clusters: map[string]*cluster{},
		imageIDs: map[string]string{},
	}
	for _, spec := range clusterSpecs {
		s.clusters[spec.Name] = &cluster{clusterSpec: spec, run: s.run,
			kubeconfig: filepath.Join(s.dir, "kubeconfig-"+spec.Name)}
	}
	logVersions(ctx, t, s.run)

	// Before anything slow: the manifests must build the way an operator
	// builds them (README: kubectl apply -k deploy/multicluster).
	base := filepath.Join(s.root, "deploy", "multicluster")
	if _, err := s.run.run(ctx, renderTimeout, nil, "kubectl", "kustomize", base); err != nil {
		t.Fatalf("deploy/multicluster does not build with kustomize, so `kubectl apply -k deploy/multicluster` "+
			"fails for operators too (kustomize refuses files outside a kustomization's directory: "+
			"reference other directories as kustomizations, not their files):\n%v", err)
	}

	// Clusters come up while the images build.
	keep, reuse := envFlag(t, envKeep), envFlag(t, envReuse)
	existing := s.existingClusters(t)
	var toCreate []*cluster
	for _, c := range s.orderedClusters() {
		if !slices.Contains(existing, c.KindName()) {
			toCreate = append(toCreate, c)
			continue
		}
		if !reuse {
			t.Fatalf("kind cluster %s already exists: delete it (kind delete cluster --name %s) or set %s=1 to reuse it",
				c.KindName(), c.KindName(), envReuse)
		}
		t.Logf("reusing kind cluster %s (%s=1)", c.KindName(), envReuse)
		if _, err := s.run.run(ctx, inspectTimeout, nil, "kind", "export", "kubeconfig",
			"--name", c.KindName(), "--kubeconfig", c.kubeconfig); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		if keep {
			t.Logf("%s=1: leaving kind clusters isthmus-a and isthmus-b running; "+
				"`kind export kubeconfig --name isthmus-a` gives kubectl access, "+
				"`kind delete cluster --name isthmus-a` (and -b) removes them", envKeep)
			return
		}
		s.deleteClusters(t)
	})
	var wg sync.WaitGroup
	createErrs := make([]error, len(toCreate))
	for i, c := range toCreate {
		wg.Go(func() { createErrs[i] = s.createCluster(ctx, c) })
	}
	buildErr := s.buildImages(ctx)
	wg.Wait()
	require.NoError(t, errors.Join(append(createErrs, buildErr)...))

	// From here on, a failure dumps what the clusters hold. Registered
	// after the deletion, so it runs before it.
	t.Cleanup(func() {
		if t.Failed() {
			for _, c := range s.orderedClusters() {
				c.dumpDiagnostics(t)
			}
		}
	})
	for _, c := range s.orderedClusters() {
		for _, img := range []string{federatorImage, gatewayImage, echoImage} {
			require.NoError(t, s.loadImage(ctx, c, img))
		}
	}
	for _, c := range s.orderedClusters() {
		require.NoError(t, s.installIsthmus(ctx, c, base))
	}
	return s
}

func (s *suite) orderedClusters() []*cluster {
	out := make([]*cluster, 0, len(clusterSpecs))
	for _, spec := range clusterSpecs {
		out = append(out, s.clusters[spec.Name])
	}
	return out
}

// requireTools fails the test, naming every missing tool, unless docker,
// kind and kubectl are on PATH and the Docker daemon answers.
func requireTools(t *testing.T) {
	t.Helper()
	hints := map[string]string{
		"docker":  "a container engine CLI: https://docs.docker.com/engine/install/",
		"kind":    "go install sigs.k8s.io/kind@latest, or https://kind.sigs.k8s.io/docs/user/quick-start/#installation",
		"kubectl": "https://kubernetes.io/docs/tasks/tools/",
	}
	var missing []string
	for _, tool := range []string{"docker", "kind", "kubectl"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, fmt.Sprintf("  %s: %s", tool, hints[tool]))
		}
	}
	if len(missing) > 0 {
		t.Fatalf("test/kind needs docker, kind and kubectl on PATH; missing:\n%s", strings.Join(missing, "\n"))
	}
	r := &runner{logf: t.Logf}
	if _, err := r.run(t.Context(), toolCheckTimeout, nil, "docker", "info", "--format", "{{.ServerVersion}}"); err != nil {
		t.Fatalf("docker is on PATH but its daemon does not answer (start Docker, or check DOCKER_HOST):\n%v", err)
	}
}

// repoRoot is the module root: go test runs in test/kind.
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	require.NoError(t, err)
	gomod, err := os.ReadFile(filepath.Join(root, "go.mod"))
	require.NoError(t, err, "test/kind must run from its package directory (go test ./test/kind/)")
	require.Contains(t, string(gomod), "module github.com/isthmus-mesh/isthmus\n", "%s is not the Isthmus repository root", root)
	return root
}

func envFlag(t *testing.T, name string) bool {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return false
	}
	b, err := strconv.ParseBool(v)
	require.NoError(t, err, "%s=%q: want 1 or 0", name, v)
	return b
}

func logVersions(ctx context.Context, t *testing.T, r *runner) {
	t.Helper()
	for _, argv := range [][]string{
		{"docker", "version", "--format", "client {{.Client.Version}}, server {{.Server.Version}}"},
		{"kind", "version"},
		{"kubectl", "version", "--client"},
	} {
		out, err := r.run(ctx, toolCheckTimeout, nil, argv[0], argv[1:]...)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %s", argv[0], strings.Join(strings.Fields(out), " "))
	}
}

// existingClusters lists the kind clusters on this machine.
func (s *suite) existingClusters(t *testing.T) []string {
	t.Helper()
	// kind prints the names on stdout and "No kind clusters found." on stderr.
	out, err := s.run.run(t.Context(), inspectTimeout, nil, "kind", "get", "clusters")
	require.NoError(t, err)
	return strings.Fields(out)
}

func (s *suite) createCluster(ctx context.Context, c *cluster) error {
	cfg := filepath.Join(s.dir, "kind-"+c.Name+".yaml")
	if err := os.WriteFile(cfg, kindConfig(c.clusterSpec), 0o644); err != nil {
		return err
	}
	args := []string{"create", "cluster", "--name", c.KindName(), "--config", cfg,
		"--kubeconfig", c.kubeconfig, "--wait", nodeReadyWait}
	if img := os.Getenv(envNodeImage); img != "" {
		args = append(args, "--image", img)
	}
	_, err := s.run.run(ctx, createTimeout, nil, "kind", args...)
	return err
}

// deleteClusters runs in a cleanup, when t.Context is already done.
func (s *suite) deleteClusters(t *testing.T) {
	for _, c := range s.orderedClusters() {
		ctx, cancel := context.WithTimeout(context.Background(), deleteTimeout)
		_, err := s.run.run(ctx, deleteTimeout, nil, "kind", "delete", "cluster",
			"--name", c.KindName(), "--kubeconfig", c.kubeconfig)
		cancel()
		if err != nil {
			t.Errorf("kind cluster %s may be left behind: %v", c.KindName(), err)
		}
	}
}

// buildImages builds the images from the repository's Dockerfiles, one
// after the other so the later ones reuse the first's module layer, and
// records their IDs.
func (s *suite) buildImages(ctx context.Context) error {
	for _, b := range []struct {
		image, dockerfile string
		timeout           time.Duration
	}{
		{federatorImage, "build/federator.Dockerfile", federatorBuild},
		{gatewayImage, "build/eastwest-gw.Dockerfile", gatewayBuild},
		{echoImage, "build/echo.Dockerfile", echoBuild},
	} {
		if _, err := s.run.run(ctx, b.timeout, nil, "docker", "build",
			"-f", filepath.Join(s.root, b.dockerfile), "-t", b.image,
			"--build-arg", "VERSION=kind-e2e", s.root); err != nil {
			return err
		}
		id, err := s.run.run(ctx, inspectTimeout, nil, "docker", "image", "inspect", "--format", "{{.Id}}", b.image)
		if err != nil {
			return err
		}
		s.imageIDs[b.image] = strings.TrimSpace(id)
	}
	return nil
}

// loadImage copies a locally built image into c's node. With Docker's
// containerd image store (the default from Docker 29), `kind load
// docker-image` can fail with "content digest … not found"
// (kubernetes-sigs/kind#3795); kind's documented workaround is to save the
// single platform the image was built for and load that archive.
func (s *suite) loadImage(ctx context.Context, c *cluster, image string) error {
	_, err := s.run.run(ctx, loadTimeout, nil, "kind", "load", "docker-image", image, "--name", c.KindName())
	if err == nil || !strings.Contains(err.Error(), "content digest") {
		return err
	}
	platform, perr := s.run.run(ctx, inspectTimeout, nil, "docker", "image", "inspect",
		"--format", "{{.Os}}/{{.Architecture}}", image)
	if perr != nil {
		return errors.Join(err, perr)
	}
	archive := filepath.Join(s.dir, strings.NewReplacer("/", "_", ":", "_").Replace(image)+".tar")
	defer os.Remove(archive)
	if _, serr := s.run.run(ctx, loadTimeout, nil, "docker", "image", "save",
		"--platform", strings.TrimSpace(platform), "-o", archive, image); serr != nil {
		return errors.Join(err, serr)
	}
	if _, lerr := s.run.run(ctx, loadTimeout, nil, "kind", "load", "image-archive", archive, "--name", c.KindName()); lerr != nil {
		return errors.Join(err, lerr)
	}
	return nil
}

// installIsthmus applies deploy/multicluster through an overlay that runs
// the e2e images under c's name, and waits until the federator is
// Available (its readiness probe is /readyz: informers synced, first
// catalog built), then the east-west gateway (its readiness probe turns
// 200 once it holds an SVID from the federator's CA, got with its
// projected token, and its routes over xDS).
func (s *suite) installIsthmus(ctx context.Context, c *cluster, base string) error {
	overlay := filepath.Join(s.dir, "overlay-"+c.Name)
	if err := writeOverlay(overlay, base, c.clusterSpec, s.imageIDs); err != nil {
		return err
	}
	if _, err := c.kubectl(ctx, applyTimeout, nil, "apply", "-k", overlay); err != nil {
		return err
	}
	if _, err := c.kubectl(ctx, crdWait+10*time.Second, nil, "wait", "--for=condition=Established",
		"crd/serviceexports.multicluster.x-k8s.io", "crd/serviceimports.multicluster.x-k8s.io",
		"--timeout="+crdWait.String()); err != nil {
		return err
	}
	// The overlay's image overrides match deploy/'s images by name; if
	// a name changes, the cluster would try to pull it from a registry.
	for _, d := range []struct{ deployment, container, image, upstream string }{
		{federatorName, "federator", federatorImage, federatorUpstreamImage},
		{gatewayName, "eastwest-gw", gatewayImage, gatewayUpstreamImage},
	} {
		var dep struct {
			Spec struct {
				Template struct {
					Spec struct {
						Containers []struct {
							Name, Image, ImagePullPolicy string
						}
					}
				}
			}
		}
		out, err := c.kubectl(ctx, kubectlTimeout, nil, "-n", systemNamespace, "get", "deployment", d.deployment, "-o", "json")
		if err != nil {
			return err
		}
		if err := json.Unmarshal([]byte(out), &dep); err != nil {
			return fmt.Errorf("cluster %s: deployment %s: %w", c.Name, d.deployment, err)
		}
		for _, ctr := range dep.Spec.Template.Spec.Containers {
			if ctr.Name == d.container && (ctr.Image != d.image || ctr.ImagePullPolicy != "IfNotPresent") {
				return fmt.Errorf("cluster %s: the overlay did not take: %s runs %s (pull %s), want %s (pull IfNotPresent); "+
					"does deploy/multicluster still name image %s?", c.Name, d.container, ctr.Image, ctr.ImagePullPolicy, d.image, d.upstream)
			}
		}
	}
	if err := c.waitRollout(ctx, systemNamespace, federatorName, rolloutWait); err != nil {
		return err
	}
	return c.waitRollout(ctx, systemNamespace, gatewayName, gatewayRolloutWait)
}

// waitRollout waits, at most bound, until the Deployment's newest pods
// are all updated, then until the Deployment is Available.
func (c *cluster) waitRollout(ctx context.Context, namespace, name string, bound time.Duration) error {
	if _, err := c.kubectl(ctx, bound+10*time.Second, nil, "-n", namespace, "rollout", "status",
		"deployment/"+name, "--timeout="+bound.String()); err != nil {
		return err
	}
	_, err := c.kubectl(ctx, crdWait+10*time.Second, nil, "-n", namespace, "wait", "--for=condition=Available",
		"deployment/"+name, "--timeout="+crdWait.String())
	return err
}

// dumpDiagnostics logs what a person debugging a failure looks at first.
// It runs in a cleanup, when t.Context is already done.
func (c *cluster) dumpDiagnostics(t *testing.T) {
	for _, args := range [][]string{
		{"get", "nodes", "-o", "wide", "--show-labels"},
		{"get", "pods", "-A", "-o", "wide"},
		{"-n", systemNamespace, "describe", "deployments,pods"},
		{"-n", systemNamespace, "logs", "deployment/" + federatorName, "--all-containers", "--tail=300"},
		{"-n", systemNamespace, "logs", "deployment/" + gatewayName, "--all-containers", "--tail=100"},
		{"-n", demoNamespace, "get", "deployments,pods,services,endpointslices", "-o", "wide"},
		{"-n", demoNamespace, "get", "serviceexports.multicluster.x-k8s.io", "-o", "yaml"},
		{"-n", demoNamespace, "describe", "pods"},
		{"get", "events", "-A", "--sort-by=.lastTimestamp"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), diagnosticsTimeout)
		out, err := c.kubectl(ctx, diagnosticsTimeout, nil, args...)
		cancel()
		if err != nil {
			t.Logf("cluster %s: kubectl %s: %v", c.Name, strings.Join(args, " "), err)
			continue
		}
		t.Logf("cluster %s: kubectl %s:\n%s", c.Name, strings.Join(args, " "), out)
	}
}
