package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/dynamic"

	"github.com/isthmus-mesh/isthmus/pkg/federation"
)

func newStatusCommand() *cobra.Command {
	var cf clusterFlags
	var output string
	cmd := &cobra.Command{
		Use:   "status [-o table|json]",
		Short: "Show every linked peer as this cluster's federator last reported it (FederationPeer status)",
		Long: `Show every FederationPeer of this cluster: state, last heartbeat, how long
it has been disconnected, services imported and exported, the services
version sent and acknowledged, and the peer's trust bundle. Conditions that
are False (a refused establishment, the last NACK either way, imports that
could not be written) are listed below the table.

-o json prints {"peers": [{"name", "spec", "status"}, ...]}, where spec and
status are the FederationPeer's own (federation.isthmus.dev/v1alpha1).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			cfg, err := cf.restConfig()
			if err != nil {
				return err
			}
			dyn, err := dynamic.NewForConfig(cfg)
			if err != nil {
				return err
			}
			peers, err := federation.PeerStatuses(cmd.Context(), dyn)
			if err != nil {
				return err
			}
			if output == "json" {
				return federation.WriteStatusJSON(cmd.OutOrStdout(), peers)
			}
			return federation.WriteStatusTable(cmd.OutOrStdout(), peers, time.Now())
		},
	}
	cf.registerKubeconfig(cmd.Flags())
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	return cmd
}

// checkOutput refuses an -o the verbs do not print, before anything is
// read: table and json are all there is.
func checkOutput(output string) error {
	if output != "table" && output != "json" {
		return fmt.Errorf("unknown output format %q: -o takes table or json", output)
	}
	return nil
}
