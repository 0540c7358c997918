// Package version holds the build's version, set by the Makefile with
// -ldflags "-X github.com/isthmus-mesh/isthmus/pkg/version.Version=...".
package version

// Version is the release or git description of this build.
var Version = "dev"
