// Package deploy carries the manifests that install Isthmus, embedded so
// that the local multi-cluster harness and tests install exactly what an
// operator applies with `kubectl apply -k deploy/multicluster`.
package deploy

import _ "embed"

var (
	// ServiceExportCRD is the MCS ServiceExport CRD (multicluster.x-k8s.io).
	//go:embed crds/multicluster.x-k8s.io_serviceexports.yaml
	ServiceExportCRD []byte
	// ServiceImportCRD is the MCS ServiceImport CRD (multicluster.x-k8s.io).
	//go:embed crds/multicluster.x-k8s.io_serviceimports.yaml
	ServiceImportCRD []byte
	// FederatorRBAC is the federator's ClusterRole and its binding to the
	// isthmus-federator ServiceAccount.
	//go:embed multicluster/rbac.yaml
	FederatorRBAC []byte
	// Namespace is the isthmus-system namespace.
	//go:embed multicluster/namespace.yaml
	Namespace []byte
)
