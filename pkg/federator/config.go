package federator

import (
	"errors"
	"fmt"
	"net"
	"time"

	"k8s.io/apimachinery/pkg/util/validation"
)

// Config is everything `federator run` needs. Validate reports every
// problem at once.
type Config struct {
	// ClusterName is this cluster's unique name in the mesh: a DNS label
	// (lowercase letters, digits, '-', at most 63 characters). Required.
	ClusterName string
	// Kubeconfig is the path to a kubeconfig; empty means the in-cluster
	// configuration of the pod's ServiceAccount.
	Kubeconfig string
	// MonitoringAddr is where /healthz, /readyz, /metrics and /debug/ are
	// served (host:port); Istio's convention is :15014.
	MonitoringAddr string
	// ShutdownTimeout bounds a graceful shutdown.
	ShutdownTimeout time.Duration
}

// DefaultConfig returns the defaults for everything but ClusterName.
func DefaultConfig() Config {
	return Config{
		MonitoringAddr:  ":15014",
		ShutdownTimeout: 10 * time.Second,
	}
}

// Validate checks the configuration and names every problem.
func (c Config) Validate() error {
	var errs []error
	if c.ClusterName == "" {
		errs = append(errs, errors.New("--cluster-name is required"))
	} else if msgs := validation.IsDNS1123Label(c.ClusterName); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("--cluster-name %q is not a DNS label: %v", c.ClusterName, msgs))
	}
	if _, _, err := net.SplitHostPort(c.MonitoringAddr); err != nil {
		errs = append(errs, fmt.Errorf("--monitoring-addr %q: %w", c.MonitoringAddr, err))
	}
	if c.ShutdownTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--shutdown-timeout %s must be positive", c.ShutdownTimeout))
	}
	return errors.Join(errs...)
}
