package procs

import (
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// A child and what it forks are one group: counted together, stopped
// together.
func TestGroup(t *testing.T) {
	p, err := Start("sh", exec.Command("/bin/sh", "-c", "sleep 600 & sleep 600"), filepath.Join(t.TempDir(), "log"), nil)
	require.NoError(t, err)
	defer p.Stop()
	require.NoError(t, WaitFor(10*time.Second, func() bool { return len(p.Pids()) == 3 }), "sh and its two sleeps")
	pids := p.Pids()
	require.Contains(t, pids, p.Pid())
	require.Greater(t, p.Memory("VmRSS"), 0.0)
	require.GreaterOrEqual(t, p.CPU(), 0.0)
	require.Greater(t, p.IOCalls(), 0.0, "sh read its script")
	require.Zero(t, (*Proc)(nil).CPU(), "no proxy, no CPU")

	p.Stop()
	require.True(t, p.Exited())
	require.NoError(t, WaitFor(10*time.Second, func() bool {
		for _, pid := range pids {
			if syscall.Kill(pid, 0) == nil {
				return false
			}
		}
		return true
	}), "every process of the group is gone")
	p.Stop() // twice is harmless
}
