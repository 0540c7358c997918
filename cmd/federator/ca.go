package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
)

func newCACommand() *cobra.Command {
	var kubeconfig, namespace string
	cmd := &cobra.Command{
		Use:   "ca",
		Short: "Inspect and rotate the cluster CA",
	}
	cmd.PersistentFlags().StringVar(&kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "path to a kubeconfig (default: in-cluster, or ~/.kube/config)")
	cmd.PersistentFlags().StringVarP(&namespace, "namespace", "n", "isthmus-system", "the federator's namespace")
	client := func() (kubernetes.Interface, error) {
		rules := clientcmd.NewDefaultClientConfigLoadingRules()
		rules.ExplicitPath = kubeconfig
		cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, nil).ClientConfig()
		if err != nil {
			return nil, fmt.Errorf("kubeconfig: %w", err)
		}
		return kubernetes.NewForConfig(cfg)
	}

	rotate := &cobra.Command{
		Use:   "rotate",
		Short: "Start a root rotation: the new root is trusted everywhere before it signs, the old one leaves once nothing it signed is valid",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := client()
			if err != nil {
				return err
			}
			if err := ca.RequestRotation(cmd.Context(), c, namespace, ""); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), "root rotation requested; `federator ca status` follows it")
			return nil
		},
	}
	var output string
	status := &cobra.Command{
		Use:   "status",
		Short: "Show the CA's roots and any rotation in progress",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := client()
			if err != nil {
				return err
			}
			st, err := ca.ReadStatus(cmd.Context(), c, namespace)
			if err != nil {
				return err
			}
			if output == "json" {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			phase := st.Phase
			if phase == "" {
				phase = "none"
			}
			fmt.Fprintf(w, "SOURCE\tROOTS\tSEQUENCE\tROTATION\tACTIVATE AT\tRETIRE AT\n")
			fmt.Fprintf(w, "%s\t%d\t%d\t%s\t%s\t%s\n", st.Source, st.Roots, st.Sequence, phase, when(st.ActivateAt), when(st.RetireAt))
			return w.Flush()
		},
	}
	status.Flags().StringVarP(&output, "output", "o", "table", "table or json")
	cmd.AddCommand(rotate, status)
	return cmd
}

func when(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}
