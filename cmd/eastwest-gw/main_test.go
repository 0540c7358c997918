package main

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/isthmus-mesh/isthmus/pkg/gateway"
)

// A word left over after the flags is refused, naming it: a boolean
// flag's value given apart would otherwise be dropped with the flag set
// to true (--xds-plaintext false turning plaintext xDS on).
func TestParseFlagsRefusesArguments(t *testing.T) {
	for name, tc := range map[string]struct {
		args []string
		want string
	}{
		"bool flag's value apart": {[]string{"--xds-plaintext", "false"}, `unexpected argument "false"`},
		"after other flags":       {[]string{"--listen-addr", "127.0.0.1:15443", "extra", "more"}, `unexpected argument "extra"`},
		"after --":                {[]string{"--", "--xds-plaintext"}, `unexpected argument "--xds-plaintext"`},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := parseFlags(tc.args)
			require.ErrorContains(t, err, tc.want)
		})
	}
	o, err := parseFlags([]string{"--xds-plaintext=false", "--xds-address", "127.0.0.1:15010"})
	require.NoError(t, err)
	require.False(t, o.x.XDSPlaintext)
}

// A port-less or out-of-range --xds-address or --ca-address is refused
// at start, naming the flag, instead of gRPC dialling 443 for ever.
func TestParseFlagsRefusesBadFederatorAddresses(t *testing.T) {
	_, err := parseFlags([]string{"--xds-address", "isthmus-federator.isthmus-system.svc", "--ca-address", "10.0.0.1:99999"})
	require.ErrorContains(t, err, `--xds-address "isthmus-federator.isthmus-system.svc": want host:port`)
	require.ErrorContains(t, err, `--ca-address "10.0.0.1:99999": port "99999" is not a number from 1 to 65535`)
}

// A listen address whose port is out of range is refused at start.
func TestParseFlagsRefusesListenPortsOutOfRange(t *testing.T) {
	_, err := parseFlags([]string{"--listen-addr", "127.0.0.1:99999", "--health-addr", ":65536"})
	require.ErrorContains(t, err, `listen address "127.0.0.1:99999": port "99999" is not a number from 0 to 65535`)
	require.ErrorContains(t, err, `health address ":65536": port "65536"`)
}

// The route source outlives the signal: it runs until the gateway has
// drained and returned, so that the table still follows xDS meanwhile.
// A failing source ends the gateway.
func TestRouteSourceOutlivesTheDrain(t *testing.T) {
	ctx, signal := context.WithCancel(t.Context())
	var srcEnded atomic.Bool
	var srcCtx context.Context
	routes := func(ctx context.Context, g *errgroup.Group) (gateway.RouteSource, error) {
		srcCtx = ctx
		g.Go(func() error {
			<-ctx.Done()
			srcEnded.Store(true)
			return nil
		})
		return gateway.NewRouteTable(nil), nil
	}
	drained := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- serve(ctx, routes, func(ctx context.Context, _ gateway.RouteSource) error {
			<-ctx.Done()
			// A source context derived from the signal's is cancelled
			// with it, before this line runs: no wait needed to see it.
			if srcCtx.Err() != nil {
				return errors.New("the route source's context ended with the signal")
			}
			<-drained // the drain, however long
			if srcEnded.Load() {
				return errors.New("the route source ended before the drain did")
			}
			return nil
		})
	}()
	signal()
	// Time for a source tied to the signal some other way (a goroutine
	// watching it) to end: a slow machine can only hide such a fault,
	// never invent one.
	time.Sleep(50 * time.Millisecond)
	close(drained)
	require.NoError(t, <-done)
	require.True(t, srcEnded.Load(), "the source ends once the gateway returned")

	// The source fails: the gateway is stopped.
	failing := func(ctx context.Context, g *errgroup.Group) (gateway.RouteSource, error) {
		g.Go(func() error { return errors.New("xDS: no") })
		return gateway.NewRouteTable(nil), nil
	}
	err := serve(t.Context(), failing, func(ctx context.Context, _ gateway.RouteSource) error {
		<-ctx.Done()
		return nil
	})
	require.ErrorContains(t, err, "xDS: no")
}
