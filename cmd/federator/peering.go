package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/isthmus-mesh/isthmus/pkg/federation"
)

// clusterFlags are the flags every operator verb shares.
type clusterFlags struct {
	kubeconfig, namespace string
}

func (f *clusterFlags) register(fs *pflag.FlagSet) {
	f.registerKubeconfig(fs)
	fs.StringVarP(&f.namespace, "namespace", "n", "isthmus-system", "the federator's namespace")
}

// registerKubeconfig is for verbs that read only cluster-scoped objects,
// where a namespace flag would do nothing.
func (f *clusterFlags) registerKubeconfig(fs *pflag.FlagSet) {
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "path to a kubeconfig (default: as kubectl, $KUBECONFIG, a list of files merged, else ~/.kube/config, else in-cluster)")
}

// restConfig loads the cluster's configuration as kubectl does: the
// --kubeconfig file alone, or client-go's default rules, which merge the
// files $KUBECONFIG lists.
func (f *clusterFlags) restConfig() (*rest.Config, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = f.kubeconfig
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, nil).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	return cfg, nil
}

func (f *clusterFlags) client() (kubernetes.Interface, error) {
	cfg, err := f.restConfig()
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(cfg)
}

// clients are the typed client and the dynamic one (for FederationPeers)
// of one configuration.
func (f *clusterFlags) clients() (kubernetes.Interface, dynamic.Interface, error) {
	cfg, err := f.restConfig()
	if err != nil {
		return nil, nil, err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, nil, err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, nil, err
	}
	return client, dyn, nil
}

func newTokenCommand() *cobra.Command {
	cmd := groupCommand(&cobra.Command{Use: "token", Short: "Peering tokens"})
	var cf clusterFlags
	var opts federation.TokenOptions
	create := &cobra.Command{
		Use:   "create --peer NAME --address HOST:PORT [--ttl 1h]",
		Short: "Print a one-time token that lets cluster NAME join this one (only a hash of its secret is stored)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Zero is the library's "default"; given, it is a mistake.
			if opts.TTL == 0 {
				return fmt.Errorf("--ttl 0s is shorter than %s: the joining cluster needs time to use the token", federation.MinTokenTTL)
			}
			// The FederationPeers too, so that a trust domain a link
			// made by hand holds is refused here, not only at Establish.
			client, dyn, err := cf.clients()
			if err != nil {
				return err
			}
			opts.Peers = dyn
			opts.Namespace = cf.namespace
			opts.Notice = func(msg string) { fmt.Fprintln(cmd.ErrOrStderr(), msg) }
			t, err := federation.CreateToken(cmd.Context(), client, opts)
			if err != nil {
				return err
			}
			s, err := t.Encode()
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), s)
			fmt.Fprintf(cmd.ErrOrStderr(), "token for %s, valid until %s; on %s run:\n  federator join --name %s --token-file <file holding the token>\n",
				t.Peer, t.Expires.Format(time.RFC3339), t.Peer, t.ClusterName)
			return nil
		},
	}
	cf.register(create.Flags())
	create.Flags().StringVar(&opts.Peer, "peer", "", "name of the cluster that will join")
	create.Flags().DurationVar(&opts.TTL, "ttl", federation.DefaultTokenTTL,
		fmt.Sprintf("how long the token's secret is honoured, at least %s and at most %s", federation.MinTokenTTL, federation.MaxTokenTTL))
	create.Flags().StringSliceVar(&opts.Addresses, "address", nil, "host:port where the peer reaches this cluster's federation endpoint (repeatable)")
	create.Flags().StringVar(&opts.PeerTrustDomain, "peer-trust-domain", "", "trust domain the joining cluster must present, as west.mesh or spiffe://west.mesh (default <peer>.mesh)")
	cmd.AddCommand(create)
	return cmd
}

func newJoinCommand() *cobra.Command {
	var cf clusterFlags
	var opts federation.JoinOptions
	var tokenFile string
	cmd := &cobra.Command{
		Use:   "join --name NAME (--token TOKEN | --token-file FILE)",
		Short: "Link this cluster with cluster NAME using a token from its `federator token create`",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch {
			case opts.Name == "":
				return fmt.Errorf("--name is required: the peer cluster's name, as `federator token create` printed it (federator join --name NAME ...)")
			case opts.Token != "" && tokenFile != "":
				return fmt.Errorf("give --token or --token-file, not both")
			case tokenFile != "":
				b, err := os.ReadFile(tokenFile)
				if err != nil {
					return fmt.Errorf("--token-file: %w", err)
				}
				opts.Token = strings.TrimSpace(string(b))
			case opts.Token == "":
				return fmt.Errorf("--token or --token-file is required")
			}
			client, dyn, err := cf.clients()
			if err != nil {
				return err
			}
			opts.Namespace = cf.namespace
			peer, err := federation.Join(cmd.Context(), client, dyn, opts)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "FederationPeer %s created (trust domain %s, federator %s)\n", peer.Name, peer.Spec.TrustDomain, peer.Spec.FederatorID)
			return nil
		},
	}
	cf.register(cmd.Flags())
	cmd.Flags().StringVar(&opts.Name, "name", "", "the peer cluster's name, as in the token")
	cmd.Flags().StringVar(&opts.Token, "token", "", "the token (prefer --token-file: command lines are visible to other users)")
	cmd.Flags().StringVar(&tokenFile, "token-file", "", "file holding the token")
	return cmd
}
