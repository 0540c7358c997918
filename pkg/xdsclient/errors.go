package xdsclient

import (
	"errors"
	"strings"
)

// ErrIncomplete is returned (wrapped) by Decode when the resources are
// valid but not yet consistent: a filter chain names a cluster that is not
// there, or an EDS cluster has no ClusterLoadAssignment. The client waits
// for more responses in that state; it is not a reason to NACK.
var ErrIncomplete = errors.New("xds config incomplete")

// errRunTwice is returned by a second call to Client.Run.
var errRunTwice = errors.New("xdsclient: Run called more than once")

// fieldError is one problem with one field of a resource. path is the
// field's proto path from the resource, e.g.
// "filter_chains[2].filters[0].name"; empty for the resource itself.
type fieldError struct {
	path, msg string
}

func (e *fieldError) Error() string {
	if e.path == "" {
		return e.msg
	}
	return e.path + ": " + e.msg
}

func fieldErr(path, msg string) error { return &fieldError{path: path, msg: msg} }

// within puts the field path prefix in front of every problem in err,
// which is nil, a *fieldError, another error, or an errors.Join of those.
// Paths are built only on the error path, so valid resources cost no
// string formatting.
func within(prefix string, err error) error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs := j.Unwrap()
		out := make([]error, len(errs))
		for i, e := range errs {
			out[i] = within(prefix, e)
		}
		return errors.Join(out...)
	}
	var fe *fieldError
	if !errors.As(err, &fe) {
		return &fieldError{path: prefix, msg: err.Error()}
	}
	switch {
	case fe.path == "":
		return &fieldError{path: prefix, msg: fe.msg}
	case strings.HasPrefix(fe.path, "["):
		return &fieldError{path: prefix + fe.path, msg: fe.msg}
	default:
		return &fieldError{path: prefix + "." + fe.path, msg: fe.msg}
	}
}

// withinIndex is within for the element i of a repeated field; it builds
// the path only when there is an error.
func withinIndex(field string, i int, err error) error {
	if err == nil {
		return nil
	}
	return within(field+"["+itoa(i)+"]", err)
}

// resourceError is every problem with one resource of a response, in the
// form a NACK's error_detail carries: `listener "eastwest-gw":
// filter_chains[0].filters[0].name: ...; ...`.
type resourceError struct {
	kind string // "listener", "cluster", "cluster_load_assignment", or "resource"
	name string // empty when the resource could not be decoded
	idx  int    // index in the response's resources
	err  error
}

func (e *resourceError) Error() string {
	var b strings.Builder
	b.WriteString(e.kind)
	if e.name != "" {
		b.WriteString(" ")
		b.WriteString(quote(e.name))
	} else {
		b.WriteString(" #")
		b.WriteString(itoa(e.idx))
	}
	b.WriteString(": ")
	b.WriteString(strings.ReplaceAll(e.err.Error(), "\n", "; "))
	return b.String()
}

func (e *resourceError) Unwrap() error { return e.err }

// maxNACKProblems bounds how many resources a NACK's message describes; a
// response with thousands of bad resources must not make a huge request.
const maxNACKProblems = 20

// nackMessage is err's text for a NACK's error_detail: one line per bad
// resource, at most maxNACKProblems of them.
func nackMessage(err error) string {
	var lines []string
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			lines = append(lines, e.Error())
		}
	} else {
		lines = []string{err.Error()}
	}
	if n := len(lines); n > maxNACKProblems {
		lines = append(lines[:maxNACKProblems], "and "+itoa(n-maxNACKProblems)+" more problems")
	}
	return strings.Join(lines, "\n")
}
