// Package sysmon keeps the Go runtime's sysmon thread out of its deep
// sleep, for a proxy whose work comes in short bursts between waits on
// its peers: the east-west gateway.
//
// sysmon is the runtime's watchdog thread (retaking Ps from system calls,
// preempting long-running goroutines). When it finds every P idle it
// sleeps on a futex until the next timer, and the next goroutine to enter
// a system call through entersyscall wakes it; it then sleeps 20 µs,
// looks again, and goes back to its deep sleep. A proxy that is idle
// between a connection's bursts (accept, dial, the end of each direction,
// close: calls the net package enters through entersyscall) pays that
// futex wake-up and the sleeps that follow several times per connection.
// Measured on the gateway during bench-gateway's new-connection measure:
// sysmon was a tenth of the gateway's CPU samples, and keeping it awake
// took the gateway's CPU per connection from 0.217 to 0.188 ms (median of
// four runs, lower in each).
//
// The runtime keeps sysmon from its deep sleep while the GODEBUG setting
// schedtrace is above zero (runtime/proc.go, sysmon), so that it can
// print its trace on time; it then wakes every 10 ms at most when the
// program is idle, about 100 short wake-ups a second. KeepAwake sets
// schedtrace to the largest period the runtime accepts, 2^31-1 ms (24.8
// days): the trace line (one line on standard error, "SCHED ...") comes
// once the host's monotonic clock, its uptime, reads more than a period
// (at start on a host up longer), then once a period. The runtime reads
// schedtrace only at start, hence the exec.
package sysmon

import (
	"os"
	"slices"
	"strings"
	"syscall"
)

// Setting is the GODEBUG setting KeepAwake adds.
const Setting = "schedtrace=2147483647"

// GODEBUG is the value of GODEBUG that keeps sysmon awake: current with
// Setting added, and true; or current unchanged and false when it already
// sets schedtrace, an operator's own choice (schedtrace=0 turns
// KeepAwake off).
func GODEBUG(current string) (string, bool) {
	for field := range strings.SplitSeq(current, ",") {
		// As the runtime reads it: a key with spaces is not schedtrace.
		if key, _, _ := strings.Cut(field, "="); key == "schedtrace" {
			return current, false
		}
	}
	if current == "" {
		return Setting, true
	}
	return current + "," + Setting, true
}

// KeepAwake executes the running program's binary again, with the same
// arguments, process ID and name, GODEBUG as GODEBUG makes it and the
// rest of the environment unchanged, unless GODEBUG already sets
// schedtrace: then it returns nil at once, as it does in the program it
// executed. An error is exec's (the binary's file was removed since it
// started, say): the program may go on as it is, with sysmon's default.
// Call it before the program opens anything, and only once its arguments
// were found valid.
func KeepAwake() error {
	godebug, change := GODEBUG(os.Getenv("GODEBUG"))
	if !change {
		return nil
	}
	// The binary's path, not /proc/self/exe: the kernel names the process
	// (its comm, what ps, top and pgrep show) after the file executed.
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "GODEBUG=") })
	return syscall.Exec(exe, os.Args, append(env, "GODEBUG="+godebug))
}
