package gateway

import (
	"errors"
	"maps"
	"strings"
)

// Update returns a new table: r's routes without those whose SNI is in
// remove (matched case-insensitively; an SNI r does not route is
// ignored), plus set. It is NewRoutes applied to the result, without
// preparing again the routes r keeps: they are shared with r, and so is
// their round-robin cursor. The cost is a copy of r's index and the
// preparation of set, which is what makes an xDS update that changes a
// few routes of ten thousand cheap.
//
// Errors are NewRoutes's, indexed by position in set; a route of set
// whose SNI r keeps is a duplicate. r is never modified, so readers of
// r (connections being routed) are undisturbed; a nil r is an empty
// table.
func (r *Routes) Update(remove []string, set []Route) (*Routes, error) {
	var bySNI map[string]*cluster
	if r != nil {
		bySNI = maps.Clone(r.bySNI)
	}
	if bySNI == nil {
		bySNI = make(map[string]*cluster, len(set))
	}
	for _, sni := range remove {
		delete(bySNI, strings.ToLower(sni))
	}
	var errs []error
	for i, rt := range set {
		c, bad := prepare(i, rt)
		if _, dup := bySNI[c.route.SNI]; dup {
			bad = append(bad, routeError(i, rt, "duplicate sni"))
		}
		errs = append(errs, bad...)
		bySNI[c.route.SNI] = c
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return &Routes{bySNI: bySNI}, nil
}
