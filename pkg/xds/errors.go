package xds

import "errors"

// errNoUpstream is what an empty GatewayOptions.FederationUpstream gives.
var errNoUpstream = errors.New("no federation upstream (GatewayOptions.FederationUpstream is empty)")
