//go:build kind

package kind

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// maxOutput bounds how much of each stream of a failed command goes into
// its error: the end, where the reason usually is.
const maxOutput = 16 << 10

// runner runs the CLIs the suite drives (docker, kind, kubectl), each with
// its own time bound, and logs every command it runs.
type runner struct {
	logf func(format string, args ...any)
}

// run runs name with args, stdin (nil: none), and returns its stdout. A
// command that fails or outlives timeout returns an error that holds the
// command line, why it failed, and the end of its stderr and stdout.
func (r *runner) run(ctx context.Context, timeout time.Duration, stdin []byte, name string, args ...string) (string, error) {
	line := commandLine(name, args)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	// After the kill, do not wait for grandchildren that hold the pipes.
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	err := cmd.Run()
	elapsed := time.Since(start).Round(100 * time.Millisecond)
	if err == nil {
		r.logf("$ %s (%s)", line, elapsed)
		return stdout.String(), nil
	}
	why := err.Error()
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		why = fmt.Sprintf("killed: still running after %s (%s)", timeout, err)
	case ctx.Err() != nil:
		why = fmt.Sprintf("killed: %s (%s)", context.Cause(ctx), err)
	}
	r.logf("$ %s (%s): %s", line, elapsed, why)
	return stdout.String(), &commandError{
		line: line, why: why, elapsed: elapsed,
		stdout: tail(stdout.Bytes()), stderr: tail(stderr.Bytes()),
	}
}

// commandError is a failed command with the end of its output.
type commandError struct {
	line, why      string
	elapsed        time.Duration
	stdout, stderr string
}

func (e *commandError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "`%s` failed after %s: %s", e.line, e.elapsed, e.why)
	if e.stderr != "" {
		fmt.Fprintf(&b, "\n--- stderr ---\n%s", e.stderr)
	}
	if e.stdout != "" {
		fmt.Fprintf(&b, "\n--- stdout ---\n%s", e.stdout)
	}
	return b.String()
}

func tail(b []byte) string {
	s := strings.TrimRight(string(b), "\n")
	if len(s) > maxOutput {
		s = "[… " + strconv.Itoa(len(s)-maxOutput) + " bytes cut …]\n" + s[len(s)-maxOutput:]
	}
	return s
}

// commandLine formats a command for logs and errors, quoting arguments
// that a shell would split or interpret.
func commandLine(name string, args []string) string {
	parts := make([]string, 0, len(args)+1)
	for _, a := range append([]string{name}, args...) {
		if a == "" || strings.ContainsAny(a, " \t\n\"'`$\\|&;<>(){}[]*?!#~") {
			a = strconv.Quote(a)
		}
		parts = append(parts, a)
	}
	return strings.Join(parts, " ")
}

// eventually calls check every interval until it reports done, returns an
// error, or timeout passes; it fails with what was being waited for and
// the last status check reported. A check error ends the wait only when
// it is permanent; otherwise it is the last status.
func eventually(ctx context.Context, timeout, interval time.Duration, what string,
	check func(context.Context) (done bool, status string, err error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	last := "nothing checked yet"
	for {
		done, status, err := check(ctx)
		if err != nil {
			var perm permanentError
			if errors.As(err, &perm) {
				return fmt.Errorf("%s: %w", what, perm.err)
			}
			status = "error: " + err.Error()
		}
		if done {
			return nil
		}
		last = status
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: not true within %s; last seen: %s", what, timeout, last)
		case <-tick.C:
		}
	}
}

// permanentError ends an eventually wait at once.
type permanentError struct{ err error }

func (p permanentError) Error() string { return p.err.Error() }
