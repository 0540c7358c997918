package federation

import (
	"errors"
	"fmt"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
)

// durationFields are the FederationPeer fields the API server holds as
// strings and Go reads as durations. A value stored before the CRD checked
// them, or under a CRD that does not, can be one Go cannot read.
var durationFields = [][]string{
	{"spec", "staleness", "keepFor"},
	{"spec", "staleness", "drainFor"},
}

// durationSyntax is how a duration is written, for messages.
const durationSyntax = "a positive duration such as 30s, 5m or 1h30m (a number and a unit: ns, us, ms, s, m or h)"

// decodePeer reads a FederationPeer as the API server holds it. A field
// the Go type cannot hold does not make the whole object unreadable: it is
// left out of the result and the error names it and its value, so that
// callers report this one peer instead of failing for every peer or
// dropping it. An object that still cannot be read comes back with its
// name and, if it reads, its status.
func decodePeer(u *unstructured.Unstructured) (*v1alpha1.FederationPeer, error) {
	var fp v1alpha1.FederationPeer
	err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &fp)
	if err == nil {
		return &fp, nil
	}
	obj := runtime.DeepCopyJSON(u.Object)
	var problems []string
	for _, path := range durationFields {
		v, found, _ := unstructured.NestedFieldNoCopy(obj, path...)
		if !found {
			continue
		}
		if perr := checkDurationValue(v); perr != nil {
			problems = append(problems, strings.Join(path, ".")+": "+perr.Error())
			unstructured.RemoveNestedField(obj, path...)
		}
	}
	fp = v1alpha1.FederationPeer{}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(obj, &fp); err != nil {
		// Not a field this knows of: keep what names the peer, and its
		// status if that reads.
		fp = v1alpha1.FederationPeer{
			TypeMeta:   metav1.TypeMeta{APIVersion: u.GetAPIVersion(), Kind: u.GetKind()},
			ObjectMeta: metav1.ObjectMeta{Name: u.GetName(), UID: u.GetUID(), Generation: u.GetGeneration()},
		}
		if st, ok := obj["status"].(map[string]any); ok {
			var status v1alpha1.FederationPeerStatus
			if runtime.DefaultUnstructuredConverter.FromUnstructured(st, &status) == nil {
				fp.Status = status
			}
		}
		problems = append(problems, fmt.Sprintf("the object cannot be read as a %s FederationPeer: %v", v1alpha1.GroupVersion, err))
	}
	return &fp, errors.New(strings.Join(problems, "; "))
}

// checkDurationValue checks a duration field's raw value.
func checkDurationValue(v any) error {
	s, ok := v.(string)
	if !ok {
		return fmt.Errorf("%v is not a string: it must be %s", v, durationSyntax)
	}
	if _, err := time.ParseDuration(s); err != nil {
		return fmt.Errorf("%q is not a duration (%v): it must be %s", s, err, durationSyntax)
	}
	return nil
}

// staleness returns how long a lost peer's imports are kept and then
// drained: the spec's values, defaults for those it leaves out. Zero and
// negative values are refused, as the CRD refuses them: the API documents
// no meaning for them, and reading them as the default would follow a
// spec that asked for something else.
func staleness(s v1alpha1.Staleness, keepDefault, drainDefault time.Duration) (keepFor, drainFor time.Duration, err error) {
	keepFor, drainFor = keepDefault, drainDefault
	var problems []string
	for _, f := range []struct {
		name string
		v    *metav1.Duration
		into *time.Duration
	}{{"keepFor", s.KeepFor, &keepFor}, {"drainFor", s.DrainFor, &drainFor}} {
		switch {
		case f.v == nil:
		case f.v.Duration <= 0:
			problems = append(problems, fmt.Sprintf("spec.staleness.%s is %s: it must be %s; leave it out for the federator's default", f.name, f.v.Duration, durationSyntax))
		default:
			*f.into = f.v.Duration
		}
	}
	if len(problems) > 0 {
		return keepDefault, drainDefault, errors.New(strings.Join(problems, "; "))
	}
	return keepFor, drainFor, nil
}
