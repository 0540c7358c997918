// Package kind runs Isthmus on real Kubernetes clusters that kind
// (Kubernetes in Docker) makes, from the images that build/*.Dockerfile
// build: the top level of the testing ladder in shared/design/testing.md.
//
// Every file but this one carries the build tag "kind", so `go test ./...`
// sees an empty package and needs no container engine. Run the suite with
//
//	go test -tags kind -v -timeout 30m ./test/kind/
//
// on a machine with docker, kind and kubectl; README.md in this directory
// has the prerequisites and the environment knobs.
package kind
