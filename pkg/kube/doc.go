// Package kube is the federator's view of its own cluster: it watches
// Services, EndpointSlices, Nodes, Pods and MCS ServiceExports with
// client-go informers and keeps the local catalog of exported services up
// to date.
//
//	ServiceExport ─┐
//	Service ───────┼─► work queue (namespace/name) ─► reconcile ─► catalog.Builder ─► (coalesced) catalog.Store
//	EndpointSlice ─┤                                    │
//	Node ──────────┤ (locality labels only; the services with endpoints on it)             └─► status queue ─► ServiceExport status (Valid, Ready)
//	Pod ───────────┘ (ServiceAccount only, with a trust domain: the services' SPIFFE IDs)
//
// With an authz.Store (Options.Policies), the exporter also mirrors the
// cluster's Istio AuthorizationPolicies and PeerAuthentications and
// every pod's labels into it, for the sidecars (pkg/xds); the catalog
// never waits for them:
//
//	AuthorizationPolicy (security.istio.io/v1, once discovery finds it) ─┐
//	PeerAuthentication  (security.istio.io/v1, once discovery finds it) ─┼─► authz.Store ─► synced once all three are read
//	Pod (labels) ────────────────────────────────────────────────────────┘
//
// Each policy kind is discovered, started and waited for on its own: a
// cluster may have one kind's CRD and not the other's, or serve a kind
// only in v1beta1 (Istio's CRDs before 1.22), where it is read. A kind
// the API server does not serve counts as read, with none, so that the
// sidecars are not held back forever, and is looked for again every
// minute. The PeerAuthentications keep their creationTimestamp: of two
// at one level, the older decides.
//
// The loop is level-triggered: every event only enqueues the key of the
// exported service it may affect, and the worker reads the current state
// from the informer caches, so missed or repeated events cannot leave the
// catalog wrong. Deny by default: a Service enters the catalog only while a
// ServiceExport of the same namespace and name exists. Reconciling reads
// only caches; the status writes, which wait for the API server, have a
// queue and workers of their own, so a burst of exports reaches the
// catalog without waiting for its statuses.
//
// The ImportWriter works the other way: it mirrors what peers export (the
// imported catalog) into the cluster, for visibility and interop only,
// never on the propagation path to proxies:
//
//	catalog.Store (peer sources) ─► (coalesced, rate limited) ─► ServiceEntry <name>.clusterset.local + ServiceImport <name>
//	Namespace, and Isthmus's own ServiceEntries/ServiceImports (informers) ─┘
//
// It writes only objects labelled app.kubernetes.io/managed-by=isthmus,
// skips (and reports in Skipped) services that another owner's object,
// a reserved namespace or a missing namespace keeps out, and deletes its
// objects once no peer exports the service.
//
// The RootsPublisher copies the cluster CA's roots into every namespace,
// so that any pod can mount them (pods mount ConfigMaps of their own
// namespace only) and verify the federator before it holds a certificate:
//
//	Namespace, ConfigMap isthmus-ca-root-cert (informers), CA roots changed ─► work queue (namespace) ─► create / update (rate limited)
//
// It too writes only objects labelled app.kubernetes.io/managed-by=isthmus,
// and reports (Conflicts) the namespaces where someone else's ConfigMap
// holds the name.
//
// This is the only package that uses client-go informers.
package kube
