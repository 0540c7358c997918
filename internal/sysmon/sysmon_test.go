package sysmon

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestGODEBUG(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		change   bool
	}{
		{"", Setting, true},
		{"http2client=0", "http2client=0," + Setting, true},
		{"schedtracex=1", "schedtracex=1," + Setting, true},
		{"schedtrace=0", "schedtrace=0", false},
		{"gctrace=1,schedtrace=1000", "gctrace=1,schedtrace=1000", false},
		{"gctrace=1, schedtrace=5", "gctrace=1, schedtrace=5," + Setting, true}, // " schedtrace" is no key the runtime knows
	} {
		got, change := GODEBUG(tc.in)
		require.Equal(t, tc.want, got, "GODEBUG(%q)", tc.in)
		require.Equal(t, tc.change, change, "GODEBUG(%q)", tc.in)
	}
}

// helperEnv makes the test binary, run by TestKeepAwake, act as a
// program that calls KeepAwake and reports what it runs with.
const helperEnv = "SYSMON_TEST_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "1" {
		if err := KeepAwake(); err != nil {
			fmt.Println("error:", err)
			os.Exit(2)
		}
		comm, _ := os.ReadFile("/proc/self/comm")
		fmt.Printf("pid=%d comm=%s args=%s keep=%s godebug=%s\n", os.Getpid(), strings.TrimSpace(string(comm)),
			strings.Join(os.Args[1:], " "), os.Getenv("SYSMON_TEST_KEEP"), os.Getenv("GODEBUG"))
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// KeepAwake runs the program again in the same process and under its own
// name, with the setting added and the arguments and the rest of the
// environment as they were; a program started with its own schedtrace
// keeps it and is not run again.
func TestKeepAwake(t *testing.T) {
	run := func(godebug string) (pid int, out string) {
		cmd := exec.Command(os.Args[0], "-test.run=^$", "extra-arg")
		cmd.Env = append(os.Environ(), helperEnv+"=1", "SYSMON_TEST_KEEP=yes", "GODEBUG="+godebug)
		b, err := cmd.Output()
		require.NoError(t, err, "%s", b)
		return cmd.Process.Pid, strings.TrimSpace(string(b))
	}

	// The kernel's name for the process: the file's name, at most 15 bytes.
	comm := filepath.Base(os.Args[0])
	comm = comm[:min(len(comm), 15)]

	pid, out := run("gctrace=0")
	require.Equal(t, "pid="+strconv.Itoa(pid)+" comm="+comm+" args=-test.run=^$ extra-arg keep=yes godebug=gctrace=0,"+Setting, out)

	pid, out = run("schedtrace=0")
	require.Equal(t, "pid="+strconv.Itoa(pid)+" comm="+comm+" args=-test.run=^$ extra-arg keep=yes godebug=schedtrace=0", out)
}
