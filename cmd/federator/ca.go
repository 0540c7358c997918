package main

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
)

func newCACommand() *cobra.Command {
	var cf clusterFlags
	cmd := groupCommand(&cobra.Command{
		Use:   "ca",
		Short: "Inspect and rotate the cluster CA",
	})
	cf.register(cmd.PersistentFlags())

	rotate := &cobra.Command{
		Use:   "rotate",
		Short: "Start a root rotation: the new root is trusted everywhere before it signs, the old one leaves once nothing it signed is valid",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			if err := ca.RequestRotation(cmd.Context(), c, cf.namespace, ""); err != nil {
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
			if err := checkOutput(output); err != nil {
				return err
			}
			c, err := cf.client()
			if err != nil {
				return err
			}
			st, err := ca.ReadStatus(cmd.Context(), c, cf.namespace)
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
	status.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	cmd.AddCommand(rotate, status)
	return cmd
}

func when(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}
