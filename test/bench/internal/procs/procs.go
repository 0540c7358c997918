// Package procs runs a benchmark's child processes (proxies, backends,
// load generators) and reads what they cost from /proc: CPU seconds and
// resident memory of a child and its descendants (nginx's workers), so
// the figures are the kernel's, the same for a Go binary and for nginx.
// make bench-gateway and make bench-sidecar share it.
package procs

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// stopGrace is how long Stop waits after SIGTERM before SIGKILL.
const stopGrace = 10 * time.Second

// Proc is a child process leading its own process group: the child and
// every process it forks (nginx's workers) are measured together.
type Proc struct {
	Name string
	cmd  *exec.Cmd
	done chan struct{}
}

// Start starts cmd with its output to logFile, in a process group of its
// own, killed if this program dies. launch starts it: nil means
// cmd.Start; a network namespace's Start (test/netns) runs it there.
// The caller must Stop it.
func Start(name string, cmd *exec.Cmd, logFile string, launch func(*exec.Cmd) error) (*Proc, error) {
	out, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	defer out.Close() // the child has its own descriptor
	cmd.Stdout, cmd.Stderr = out, out
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid, cmd.SysProcAttr.Pdeathsig = true, syscall.SIGKILL
	if launch == nil {
		launch = (*exec.Cmd).Start
	}
	if err := launch(cmd); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{Name: name, cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	return p, nil
}

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Pid is the process's id (its process group's too).
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Stop sends SIGTERM to the process group, and SIGKILL after 10 s. It is
// safe on a nil Proc and more than once.
func (p *Proc) Stop() {
	if p == nil {
		return
	}
	pid := p.cmd.Process.Pid
	if p.Exited() {
		// The leader is gone; a worker it left behind still goes.
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		return
	}
	_ = syscall.Kill(-pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(stopGrace):
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		<-p.done
	}
}

// Pids is the process group the child leads (Start puts it in its own):
// a Go proxy alone, or nginx's master and workers.
func (p *Proc) Pids() []int {
	root := strconv.Itoa(p.cmd.Process.Pid)
	var out []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if f := statFields(pid); len(f) > 3 && f[5-2] == root { // field 5: pgrp
			out = append(out, pid)
		}
	}
	return out
}

// statFields is /proc/<pid>/stat split after the command name, so that
// field k (man 5 proc) is f[k-2].
func statFields(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return nil
	}
	return append([]string{""}, strings.Fields(s[i+1:])...)
}

// CPU is user+system CPU seconds of the process group; 0 for a nil Proc
// (a target without a proxy).
func (p *Proc) CPU() float64 {
	if p == nil {
		return 0
	}
	var ticks float64
	for _, pid := range p.Pids() {
		f := statFields(pid)
		if len(f) > 15 {
			u, _ := strconv.ParseFloat(f[14-2], 64) // utime, field 14
			s, _ := strconv.ParseFloat(f[15-2], 64) // stime, field 15
			ticks += u + s
		}
	}
	return ticks / 100 // USER_HZ
}

// Memory sums a /proc/<pid>/status field over the process group, in MB
// (2^20 bytes): VmRSS now, VmHWM the peak. For nginx the sum counts the
// pages master and workers share once per process, as `ps` does.
func (p *Proc) Memory(field string) float64 {
	var kb float64
	for _, pid := range p.Pids() {
		f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
				n, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
				kb += n
			}
		}
		_ = f.Close()
	}
	return kb / 1024
}

// IOCalls is the read and write system calls (syscr + syscw of
// /proc/<pid>/io, every thread counted) the process group has made: a
// proxy's calls per request say how much of its CPU is the kernel's
// work, which another proxy doing the same job must pay too.
func (p *Proc) IOCalls() float64 {
	if p == nil {
		return 0
	}
	var n float64
	for _, pid := range p.Pids() {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			for _, f := range []string{"syscr: ", "syscw: "} {
				if v, ok := strings.CutPrefix(line, f); ok {
					c, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
					n += c
				}
			}
		}
	}
	return n
}

// WaitFor polls cond every 50 ms until it holds, for at most d.
func WaitFor(d time.Duration, cond func() bool) error {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %v", d)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}
