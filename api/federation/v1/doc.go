// Package federationv1 is the federation API between Isthmus clusters,
// generated from federation.proto (`make generate`; the generated files are
// checked in). pkg/federation implements both sides of it.
package federationv1
