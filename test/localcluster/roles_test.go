package localcluster

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	clientcmdv1 "k8s.io/client-go/tools/clientcmd/api/v1"
	"sigs.k8s.io/yaml"
)

// The test binary doubles as the workload: with roleEnv set, TestMain runs
// that role instead of the tests, so workloads need nothing installed.
const roleEnv = "LOCALCLUSTER_TEST_ROLE"

const (
	roleServe  = "serve"  // HTTP on $POD_IP:8080, answering $POD_NAME
	roleIdle   = "idle"   // sleep until killed (a pod to run probes from)
	roleFetch  = "fetch"  // GET $FETCH_URL, print the body
	roleDial   = "dial"   // TCP connect to $DIAL_ADDR
	roleWhoAmI = "whoami" // SelfSubjectReview with $KUBECONFIG, print the username
	// roleHarness starts a one-cluster environment with a workload, prints
	// its run id, work dir and child pids as JSON, and hangs: a test run
	// that is about to be killed.
	roleHarness = "harness"
)

// probeDeadline bounds each reachability probe.
const probeDeadline = 2 * time.Second

func TestMain(m *testing.M) {
	role := os.Getenv(roleEnv)
	if role == "" {
		os.Exit(m.Run())
	}
	if err := runRole(role); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", role, err)
		os.Exit(1)
	}
	os.Exit(0)
}

func runRole(role string) error {
	switch role {
	case roleServe:
		ln, err := net.Listen("tcp", net.JoinHostPort(os.Getenv("POD_IP"), "8080"))
		if err != nil {
			return err
		}
		name := os.Getenv("POD_NAME")
		srv := &http.Server{
			Handler:           http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, name) }),
			ReadHeaderTimeout: 5 * time.Second,
		}
		return srv.Serve(ln)
	case roleIdle:
		// Bounded even if nobody kills it.
		time.Sleep(10 * time.Minute)
		return nil
	case roleFetch:
		client := &http.Client{Timeout: probeDeadline}
		resp, err := client.Get(os.Getenv("FETCH_URL"))
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %d: %s", resp.StatusCode, body)
		}
		_, err = os.Stdout.Write(body)
		return err
	case roleDial:
		conn, err := net.DialTimeout("tcp", os.Getenv("DIAL_ADDR"), probeDeadline)
		if err != nil {
			return err
		}
		return conn.Close()
	case roleWhoAmI:
		cfg, err := restConfigFromKubeconfig(os.Getenv("KUBECONFIG"))
		if err != nil {
			return err
		}
		user, err := whoAmI(context.Background(), cfg)
		if err != nil {
			return err
		}
		fmt.Print(user.Username)
		return nil
	case roleHarness:
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		env, err := Start(ctx, Options{Clusters: []ClusterOptions{{Name: "x"}}})
		if err != nil {
			return err
		}
		if _, err := env.Cluster("x").RunWorkload(ctx, WorkloadSpec{
			Name: "w", Command: []string{os.Args[0]}, Env: []string{roleEnv + "=" + roleIdle},
		}); err != nil {
			return err
		}
		if err := json.NewEncoder(os.Stdout).Encode(harnessReport{RunID: env.RunID(), WorkDir: env.WorkDir(), Pids: env.pids()}); err != nil {
			return err
		}
		<-ctx.Done() // killed long before
		return env.Close()
	default:
		return fmt.Errorf("unknown role %q", role)
	}
}

type harnessReport struct {
	RunID   string
	WorkDir string
	Pids    []int
}

// restConfigFromKubeconfig reads the current context of a token-based
// kubeconfig, the way client tools do.
func restConfigFromKubeconfig(path string) (*rest.Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var kc clientcmdv1.Config
	if err := yaml.UnmarshalStrict(data, &kc); err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	var ctx *clientcmdv1.Context
	for i := range kc.Contexts {
		if kc.Contexts[i].Name == kc.CurrentContext {
			ctx = &kc.Contexts[i].Context
		}
	}
	if ctx == nil {
		return nil, fmt.Errorf("%s: no current context %q", path, kc.CurrentContext)
	}
	cfg := &rest.Config{Timeout: 10 * time.Second}
	for _, c := range kc.Clusters {
		if c.Name == ctx.Cluster {
			cfg.Host = c.Cluster.Server
			cfg.CAData = c.Cluster.CertificateAuthorityData
			cfg.Insecure = c.Cluster.InsecureSkipTLSVerify
		}
	}
	for _, u := range kc.AuthInfos {
		if u.Name == ctx.AuthInfo {
			cfg.BearerToken = u.AuthInfo.Token
		}
	}
	if cfg.Host == "" || cfg.BearerToken == "" || len(cfg.CAData) == 0 {
		return nil, fmt.Errorf("%s: incomplete context %q", path, kc.CurrentContext)
	}
	return cfg, nil
}

func whoAmI(ctx context.Context, cfg *rest.Config) (authnv1.UserInfo, error) {
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return authnv1.UserInfo{}, err
	}
	r, err := cs.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		return authnv1.UserInfo{}, err
	}
	return r.Status.UserInfo, nil
}
