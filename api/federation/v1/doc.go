// Package federationv1 holds the messages of the federation API between
// Isthmus clusters, generated from federation.proto (`make generate`; the
// generated files are checked in). The FederationService stubs are
// generated once pkg/federation implements both sides of the service.
package federationv1
