package netns

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// Capabilities network namespaces need (linux/capability.h).
const (
	capNetAdmin = 12
	capSysAdmin = 21
)

// Available reports whether this process can make network namespaces, and
// if not, why.
func Available() (ok bool, reason string) {
	if uid := os.Geteuid(); uid != 0 {
		return false, fmt.Sprintf("network namespaces need root, and this test runs as uid %d", uid)
	}
	caps, err := effectiveCaps()
	if err != nil {
		return false, fmt.Sprintf("cannot read this process's capabilities: %v", err)
	}
	for _, c := range []struct {
		bit  uint
		name string
	}{{capSysAdmin, "CAP_SYS_ADMIN"}, {capNetAdmin, "CAP_NET_ADMIN"}} {
		if caps&(1<<c.bit) == 0 {
			return false, fmt.Sprintf("running as root but without %s (CapEff %#x): a restricted container cannot make network namespaces", c.name, caps)
		}
	}
	return true, ""
}

// RequireRoot skips tb, saying why, unless network namespaces can be made;
// every constructor of this package calls it. As root, it fails tb when
// ip(8) is missing rather than skip: CI runs as root and must run these
// tests for real.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if ok, reason := Available(); !ok {
		tb.Skipf("netns: skipped, %s; run the tests as root (CI does) to test in real network namespaces", reason)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		tb.Fatalf("netns: running as root but ip(8) is missing (%v): install iproute2 (`make tools` does)", err)
	}
}

// effectiveCaps reads CapEff from /proc/self/status.
func effectiveCaps() (uint64, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no CapEff line in /proc/self/status")
}
