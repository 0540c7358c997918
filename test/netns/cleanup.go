package netns

import (
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// maxProcEntries bounds the scan of /proc.
const maxProcEntries = 1 << 20

// killMembers SIGKILLs every process (other than this one) whose network
// namespace is the one bound at path. Each is signalled through a pidfd
// opened before its namespace is checked, so a pid reused in between is
// never hit.
func killMembers(path string) error {
	var want syscall.Stat_t
	if err := syscall.Stat(path, &want); err != nil {
		return fmt.Errorf("stat %s: %w", path, err)
	}
	dir, err := os.Open("/proc")
	if err != nil {
		return err
	}
	defer dir.Close()
	names, err := dir.Readdirnames(maxProcEntries)
	if err != nil {
		return fmt.Errorf("list /proc: %w", err)
	}
	self := os.Getpid()
	var errs []error
	for _, n := range names {
		pid, err := strconv.Atoi(n)
		if err != nil || pid == self {
			continue
		}
		if err := killIfMember(pid, want); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func killIfMember(pid int, ns syscall.Stat_t) error {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil // gone already
	}
	defer unix.Close(fd)
	var st syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st); err != nil {
		return nil // gone, or a zombie without namespaces
	}
	if st.Dev != ns.Dev || st.Ino != ns.Ino {
		return nil
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("kill pid %d: %w", pid, err)
	}
	return nil
}

var (
	sweepOnce sync.Once
	// leftoverRe matches this package's namespace names and captures the
	// pid of the process that made them.
	leftoverRe = regexp.MustCompile(`^` + namePrefix + `([0-9]+)s[0-9]+-`)
)

// sweepLeftovers deletes namespaces made by test processes that are gone
// (killed before their clean-up ran). Only the names are removed: the
// processes the harness started there had Pdeathsig set and died with
// their test process. A live pid's namespaces are never touched.
func sweepLeftovers(logf func(format string, args ...any)) {
	entries, err := os.ReadDir(netnsDir)
	if err != nil {
		return // no namespaces yet
	}
	self := os.Getpid()
	for _, e := range entries {
		m := leftoverRe.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		pid, err := strconv.Atoi(m[1])
		if err != nil || pid == self || pidAlive(pid) {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
		_, err = ipCmd(ctx, "netns", "del", e.Name())
		cancel()
		if err != nil {
			logf("netns: sweep: %v", err)
			continue
		}
		logf("netns: deleted %s, left behind by pid %d which is gone", e.Name(), pid)
	}
}

func pidAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
