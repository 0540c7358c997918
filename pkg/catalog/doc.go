// Package catalog is Isthmus's in-memory model of the services a cluster
// knows about: the services it exports, and later the services it imports
// from peers.
//
// It sits in the middle of the one-way data flow
//
//	kube-apiserver ──informers (pkg/kube)──► catalog ─┬─► xDS translation
//	                                                  └─► federation export
//
// and deliberately holds no Kubernetes or Envoy types, so that every edge
// translates into and out of it and the model itself stays small and
// testable.
//
// A Snapshot is immutable and carries a content version: two snapshots with
// the same services have the same version, so consumers can skip work when
// nothing changed. A Store keeps the newest snapshot per source ("local" for
// the cluster's own exports, one per peer for imports) and tells
// subscribers, coalesced, that something changed; they then pull whole
// snapshots.
package catalog
