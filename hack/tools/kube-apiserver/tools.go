//go:build tools

// Package tools pins the kube-apiserver and kube-controller-manager that the local multi-cluster harness
// runs. It is a separate module so the product's go.mod never depends on
// k8s.io/kubernetes; hack/kube-binaries.sh builds from here.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
