package localcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// Bounds on process shutdown.
const (
	// stopGrace is how long a process gets between SIGTERM and SIGKILL.
	stopGrace = 5 * time.Second
	// killWait bounds the wait for a process to be reaped after SIGKILL.
	killWait = 5 * time.Second
	// tailLines is how much of a process's log an error quotes.
	tailLines = 20
)

// ProcessSpec describes a process to run in a cluster's node network
// namespace (or a workload's).
type ProcessSpec struct {
	// Name identifies the process in logs and names its log file
	// (<Name>.log under the cluster's log directory). Required; letters,
	// digits, '-', '_' and '.'.
	Name string
	// Command is the program and its arguments. Required. The program is
	// looked up on PATH inside the namespace.
	Command []string
	// Env is added to the harness's own environment.
	Env []string
	// Dir is the working directory; empty means the cluster's work directory.
	Dir string
	// RunAs runs the process as this uid and gid, with no supplementary
	// groups (setpriv(1)); nil runs it as the harness. It needs root.
	RunAs *Credential
}

// Credential is a uid and gid a process runs as: a pod's app or sidecar
// user, for iptables' owner match.
type Credential struct {
	UID, GID uint32
}

// asUserArgv prefixes argv so that it runs as cred (nil: unchanged). The
// parent-death signal is set again after the uid changes, which clears it,
// so the process still dies with the harness.
func asUserArgv(cred *Credential, argv []string) ([]string, error) {
	if cred == nil {
		return argv, nil
	}
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("running a process as uid %d needs root", cred.UID)
	}
	return append([]string{"setpriv", "--reuid=" + strconv.FormatUint(uint64(cred.UID), 10),
		"--regid=" + strconv.FormatUint(uint64(cred.GID), 10), "--clear-groups", "--pdeathsig", "KILL", "--"}, argv...), nil
}

// Process is a child process the harness started and tracks by pid. Its
// stdout and stderr go to LogPath. It runs in its own process group, which
// Stop and Kill signal as a whole.
type Process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	// stopping is set once Stop or Kill was called: the exit is expected.
	stopping atomic.Bool
	// waitErr is written once by the waiter goroutine before done is closed.
	waitErr error
	// onExit, when set, is called once by the waiter goroutine after the
	// process was reaped; it must not block.
	onExit func(p *Process)
}

// startProcess starts argv with stdout and stderr appended to logPath. The
// process gets its own process group and SIGKILL when the harness dies.
func startProcess(name string, argv []string, env []string, dir, logPath string, onExit func(*Process)) (*Process, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("process %q: empty command", name)
	}
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return nil, fmt.Errorf("process %q: %w", name, err)
	}
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("process %q: open log: %w", name, err)
	}
	fmt.Fprintf(logFile, "# %s %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(argv, " "))

	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Dir = dir
	cmd.Stdin = nil
	// An *os.File is handed to the child directly: no copying goroutine, and
	// the log survives the harness.
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = childSysProcAttr()
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Process{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{}), onExit: onExit}
	go p.waitForExit(logFile)
	return p, nil
}

// childSysProcAttr puts a child in its own process group, so Stop reaches
// everything it forked, and asks the kernel to SIGKILL it if the harness dies
// without cleaning up.
func childSysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

func (p *Process) waitForExit(logFile *os.File) {
	err := p.cmd.Wait()
	logFile.Close()
	p.waitErr = err
	close(p.done)
	if p.onExit != nil {
		p.onExit(p)
	}
}

// Name is the name the process was started with.
func (p *Process) Name() string { return p.name }

// Pid is the process id (and process group id).
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// LogPath is the file holding the process's stdout and stderr.
func (p *Process) LogPath() string { return p.logPath }

// Done is closed once the process has exited and been reaped.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited, and its Wait error if so
// (nil for exit status 0).
func (p *Process) Exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.waitErr
	default:
		return false, nil
	}
}

// Wait waits until the process exits or ctx is done, and returns the exit
// error (an *exec.ExitError for a non-zero status) or ctx's error.
func (p *Process) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.waitErr
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Signal sends sig to the process's group. Signalling an exited process is
// not an error.
func (p *Process) Signal(sig syscall.Signal) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	if err := syscall.Kill(-p.Pid(), sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("signal %s (pid %d): %w", p.name, p.Pid(), err)
	}
	return nil
}

// Kill sends SIGKILL to the process group and waits (bounded) until the
// process is reaped.
func (p *Process) Kill() error {
	p.stopping.Store(true)
	if err := p.Signal(syscall.SIGKILL); err != nil {
		return err
	}
	return p.awaitExit(killWait)
}

// Stop sends SIGTERM to the process group, waits up to grace (5 s when zero
// or negative) for it to exit, then SIGKILLs the group and waits a bounded
// time for it to be reaped. Stopping an exited process is not an error; the
// exit status of a stopped process is not reported (see Exited).
func (p *Process) Stop(grace time.Duration) error {
	if grace <= 0 {
		grace = stopGrace
	}
	p.stopping.Store(true)
	if err := p.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	timer := time.NewTimer(grace)
	defer timer.Stop()
	select {
	case <-p.done:
		// Members of the group that outlived the leader (a shell's
		// children) go too.
		_ = syscall.Kill(-p.Pid(), syscall.SIGKILL)
		return nil
	case <-timer.C:
	}
	return p.Kill()
}

func (p *Process) awaitExit(bound time.Duration) error {
	timer := time.NewTimer(bound)
	defer timer.Stop()
	select {
	case <-p.done:
		return nil
	case <-timer.C:
		return fmt.Errorf("%s (pid %d) still running %s after SIGKILL", p.name, p.Pid(), bound)
	}
}

// Tail returns the last n lines of the process's log.
func (p *Process) Tail(n int) string { return tailFile(p.logPath, n) }

// describeExit is an error for a process that exited when it should not have,
// quoting the end of its log.
func (p *Process) describeExit() error {
	_, err := p.Exited()
	if err == nil {
		err = errors.New("exit status 0")
	}
	return fmt.Errorf("%s exited: %w\n--- last lines of %s ---\n%s", p.name, err, p.logPath, p.Tail(tailLines))
}

// tailFile returns the last n lines of the file at path, reading at most the
// last 64 KiB.
func tailFile(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	defer f.Close()
	const maxRead = 64 << 10
	if st, err := f.Stat(); err == nil && st.Size() > maxRead {
		if _, err := f.Seek(-maxRead, io.SeekEnd); err != nil {
			return fmt.Sprintf("(read log: %v)", err)
		}
	}
	data, err := io.ReadAll(io.LimitReader(f, maxRead))
	if err != nil {
		return fmt.Sprintf("(read log: %v)", err)
	}
	data = bytes.TrimRight(data, "\n")
	lines := bytes.Split(data, []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// pidAlive reports whether a process with this pid exists (a zombie counts).
func pidAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
