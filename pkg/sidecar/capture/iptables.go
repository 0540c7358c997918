package capture

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// DefaultTimeout bounds each iptables command of a zero Runner.
const DefaultTimeout = 30 * time.Second

// Runner applies and removes capture rules with the iptables commands.
// The zero value runs the system's default iptables-save and
// iptables-restore (and the ip6tables ones) from PATH, each bounded by
// DefaultTimeout. Everything happens in the calling process's network
// namespace.
type Runner struct {
	// Backend picks the commands: "" the system's default (iptables-restore
	// …), "nft" iptables-nft-restore …, "legacy" iptables-legacy-restore ….
	// A pod's network namespace is fresh, so any backend works; pick the
	// one the node uses when something else also writes rules there.
	Backend string
	// Timeout bounds each command; zero means DefaultTimeout.
	Timeout time.Duration

	// lookPath finds a command; nil means exec.LookPath. Tests take
	// ip6tables away with it.
	lookPath func(name string) (string, error)
}

// Result is what Apply did with IPv6 when Config.IPv6 is off.
type Result struct {
	// IPv6Refused means ChainInput6Block is in place: inbound IPv6 is
	// refused. Always so when Config.IPv6 is off, unless IPv6Skipped
	// says why not.
	IPv6Refused bool
	// IPv6Skipped is why nothing was written for IPv6 although
	// Config.IPv6 is off: there is no ip6tables (not installed, or the
	// kernel cannot give it a filter table: no IPv6) and no interface but
	// loopback has an IPv6 address, so no IPv6 packet can reach the pod.
	// Nil otherwise. Where an interface does have one, Apply fails
	// instead: inbound IPv6 would reach the app around the sidecar.
	IPv6Skipped error
}

// Apply loads the capture rules for c with the zero Runner.
func Apply(ctx context.Context, c Config) (Result, error) { return Runner{}.Apply(ctx, c) }

// Remove removes every capture rule with the zero Runner.
func Remove(ctx context.Context, c Config) error { return Runner{}.Remove(ctx, c) }

// Apply loads the capture rules for c: the nat table's capture for IPv4,
// and for IPv6 either the same (Config.IPv6) or, in ip6tables' filter
// table, ChainInput6Block, which refuses inbound IPv6 so that it cannot
// reach the app around the sidecar. Each table is loaded with one
// iptables-restore --noflush, which the kernel commits atomically or not
// at all. Isthmus's chains are flushed and refilled, so applying twice is
// the same as applying once, and applying a changed Config replaces the
// old rules, those of the other IPv6 choice included. The jumps from the
// built-in chains are added only when they are not there exactly once
// already. If a table fails after others were changed, those are
// restored to what they were.
//
// Without Config.IPv6 and without a usable ip6tables, Apply leaves IPv6
// alone and says why in Result.IPv6Skipped when no interface but loopback
// has an IPv6 address (IPv6 cannot reach the pod), and fails otherwise.
func (r Runner) Apply(ctx context.Context, c Config) (Result, error) {
	if err := errors.Join(c.Validate(), r.Validate()); err != nil {
		return Result{}, err
	}
	var res Result
	steps := r.applySteps(c, &res)
	if err := r.edit(ctx, steps); err != nil {
		return Result{}, err
	}
	return res, nil
}

// applySteps lists what Apply changes, in order; the block step records
// in res whether it refused IPv6 or why it could not.
func (r Runner) applySteps(c Config, res *Result) []step {
	capture := func(f family) step {
		return step{f: f, table: "nat", input: func(saved string) string {
			t := buildTable(c, f)
			return t.render(jumpEdits(t.chains, t.jumps, saved))
		}}
	}
	if c.IPv6 {
		return []step{
			capture(ipv4),
			capture(ipv6),
			removeStep(ipv6, "filter", blockChains, true),
		}
	}
	return []step{
		capture(ipv4),
		removeStep(ipv6, "nat", natChains, true),
		{f: ipv6, table: "filter", input: func(saved string) string {
			res.IPv6Refused = true
			t := blockTable()
			return t.render(jumpEdits(t.chains, t.jumps, saved))
		}, missing: func(err error) error {
			addrs, aerr := ipv6Addrs()
			switch {
			case aerr != nil:
				return fmt.Errorf("cannot refuse inbound IPv6 (%w), nor tell whether it can reach the pod: %w", err, aerr)
			case len(addrs) > 0:
				return fmt.Errorf("IPv6 is not captured and inbound IPv6 cannot be refused (%w), yet the pod has IPv6 addresses (%s), so it would reach the app around the sidecar: install ip6tables (with the legacy backend, load ip6table_filter on the node), or turn IPv6 off in the pod", err, strings.Join(addrs, ", "))
			}
			res.IPv6Skipped = fmt.Errorf("no interface but loopback has an IPv6 address, and there is no ip6tables: %w", err)
			return nil
		}},
	}
}

// Remove deletes Isthmus's chains and every rule that jumps to them,
// IPv4 and IPv6, nat and filter, leaving everything else as it was.
// Removing what is not there is not an error, and neither is an ip6tables
// that cannot be used (not installed, or a kernel without IPv6) unless
// c.IPv6 says IPv6 was captured: an IPv6 block left behind that way only
// goes on refusing inbound IPv6.
func (r Runner) Remove(ctx context.Context, c Config) error {
	if err := r.Validate(); err != nil {
		return err
	}
	return r.edit(ctx, []step{
		removeStep(ipv4, "nat", natChains, false),
		removeStep(ipv6, "nat", natChains, !c.IPv6),
		removeStep(ipv6, "filter", blockChains, true),
	})
}

// step is one table of one family that Apply or Remove changes.
type step struct {
	f     family
	table string
	// input is the restore input given the saved table; empty means
	// nothing to do.
	input func(saved string) string
	// missing decides what a table that cannot be had (errNoTable: the
	// command is not installed or the kernel cannot make the table)
	// means: nil skips the step, an error fails the edit. A nil missing
	// fails it with the error as it is.
	missing func(err error) error
}

// removeStep deletes chains and the jumps to them from f's table;
// optional says that a table that cannot be had holds nothing to delete.
func removeStep(f family, table string, chains []string, optional bool) step {
	s := step{f: f, table: table, input: func(saved string) string {
		return removeInput(table, chains, saved)
	}}
	if optional {
		s.missing = func(error) error { return nil }
	}
	return s
}

// ipv6Addrs lists the IPv6 addresses of the interfaces other than
// loopback, as "<address> on <interface>". While there are none, no IPv6
// packet from outside can reach the pod's sockets.
func ipv6Addrs() ([]string, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	var out []string
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			return nil, fmt.Errorf("addresses of %s: %w", ifc.Name, err)
		}
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && n.IP.To4() == nil {
				out = append(out, n.IP.String()+" on "+ifc.Name)
			}
		}
	}
	return out, nil
}

// edit saves each step's table, loads the input made from it (an empty
// input means nothing to do), and on a failure restores the tables
// already changed.
func (r Runner) edit(ctx context.Context, steps []step) error {
	var changed []savedTable
	for _, s := range steps {
		saved, err := r.save(ctx, s.f, s.table)
		if err != nil && s.missing != nil && errors.Is(err, errNoTable) {
			err = s.missing(err)
			if err == nil {
				continue
			}
		}
		if err != nil {
			return errors.Join(err, r.rollback(ctx, changed))
		}
		in := s.input(saved)
		if in == "" {
			continue
		}
		if err := r.restore(ctx, s.f, in, "--noflush"); err != nil {
			return errors.Join(err, r.rollback(ctx, changed))
		}
		changed = append(changed, savedTable{s.f, s.table, saved})
	}
	return nil
}

// savedTable is a family's table as it was before edit changed it.
type savedTable struct {
	f     family
	table string
	saved string
}

// rollback puts back the saved tables: a restore without --noflush
// replaces the tables in its input, and only them, atomically. It runs
// even when ctx is done (that may be why the edit failed), bounded by the
// timeout.
func (r Runner) rollback(ctx context.Context, changed []savedTable) error {
	ctx = context.WithoutCancel(ctx)
	var errs []error
	for _, d := range slices.Backward(changed) {
		if err := r.restore(ctx, d.f, d.saved); err != nil {
			errs = append(errs, fmt.Errorf("roll back %s %s: %w", d.f.name, d.table, err))
		}
	}
	return errors.Join(errs...)
}

// Validate reports a Backend that is not one of the known ones.
func (r Runner) Validate() error {
	_, err := r.command("iptables")
	return err
}

func (r Runner) command(base string) (string, error) {
	switch r.Backend {
	case "":
		return base, nil
	case "nft", "legacy":
		if name, rest, ok := strings.Cut(base, "-"); ok {
			return name + "-" + r.Backend + "-" + rest, nil // iptables-legacy-restore
		}
		return base + "-" + r.Backend, nil // iptables-legacy
	}
	return "", fmt.Errorf("iptables backend %q: want empty (the system's default), nft or legacy", r.Backend)
}

func (r Runner) timeout() time.Duration {
	if r.Timeout > 0 {
		return r.Timeout
	}
	return DefaultTimeout
}

// errNoTable marks a save that failed because the table cannot be had at
// all: the command is not installed, or the kernel cannot make the table
// (no IPv6, or a legacy module that is not loaded).
var errNoTable = errors.New("unavailable")

// noTableRe matches what the save commands print when the kernel cannot
// give them the table: legacy "Cannot initialize: Table does not exist
// (do you need to insmod?)" or "… Address family not supported by
// protocol", nft "Failed to initialize nft: …" or "Table `x' does not
// exist".
var noTableRe = regexp.MustCompile(`(?i)(cannot|can't|unable to|failed to|could not) initiali[sz]e|table\b.*\bdoes not exist|address family not supported`)

// save returns f's table as iptables-save prints it. An error wraps
// errNoTable when the table cannot be had at all.
func (r Runner) save(ctx context.Context, f family, table string) (string, error) {
	name, err := r.command(f.save)
	if err != nil {
		return "", err
	}
	out, stderr, err := r.run(ctx, name, nil, "-t", table)
	switch {
	case err == nil:
		return out, nil
	case errors.Is(err, exec.ErrNotFound) || noTableRe.MatchString(stderr):
		return "", fmt.Errorf("%s -t %s: %w: %w%s", name, table, errNoTable, err, quote(stderr))
	}
	return "", fmt.Errorf("%s -t %s: %w%s", name, table, err, quote(stderr))
}

// restore feeds input to f's iptables-restore with args.
func (r Runner) restore(ctx context.Context, f family, input string, args ...string) error {
	name, err := r.command(f.restore)
	if err != nil {
		return err
	}
	// --wait matters to the legacy backend only: it waits for the xtables
	// lock instead of failing when another process holds it.
	args = append(args, "--wait="+strconv.Itoa(max(1, int(r.timeout()/2/time.Second))))
	_, stderr, err := r.run(ctx, name, []byte(input), args...)
	if err != nil {
		return newRestoreError(name+" "+strings.Join(args, " "), input, stderr, err)
	}
	return nil
}

// run runs one command bounded by the Runner's timeout.
func (r Runner) run(ctx context.Context, name string, stdin []byte, args ...string) (stdout, stderr string, err error) {
	lookPath := exec.LookPath
	if r.lookPath != nil {
		lookPath = r.lookPath
	}
	path, err := lookPath(name)
	if err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			err = fmt.Errorf("%w (install the iptables package)", err)
		}
		return "", "", err
	}
	ctx, cancel := context.WithTimeout(ctx, r.timeout())
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	var out, errb bytes.Buffer
	cmd.Stdin = bytes.NewReader(stdin)
	cmd.Stdout = &out
	cmd.Stderr = &errb
	cmd.WaitDelay = time.Second
	err = cmd.Run()
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("%w (gave up after %s: %w)", err, r.timeout(), ctx.Err())
	}
	return out.String(), errb.String(), err
}

func quote(stderr string) string {
	if s := strings.TrimSpace(stderr); s != "" {
		return ": " + s
	}
	return ""
}

// RestoreError is a failed iptables-restore: nothing of its input was
// applied. Error() gives the command, its exit status, what it printed,
// and the input line it blamed.
type RestoreError struct {
	// Command is the command line, without the input.
	Command string
	// Stderr is what the command printed, verbatim.
	Stderr string
	// Line is the 1-based input line the command blamed, 0 if none.
	Line int
	// Input is the text of that line.
	Input string
	// Err is the exec error (an *exec.ExitError for a non-zero status).
	Err error
}

func (e *RestoreError) Error() string {
	msg := e.Command + ": " + e.Err.Error() + quote(e.Stderr)
	if e.Line > 0 {
		msg += fmt.Sprintf(" [input line %d: %s]", e.Line, e.Input)
		if e.Input == "COMMIT" {
			msg += " (the nft backend checks the whole input at COMMIT: the message names the culprit)"
		}
	}
	return msg
}

func (e *RestoreError) Unwrap() error { return e.Err }

// blamedLineRe finds the input line in iptables-restore's messages, which
// say "Error occurred at line: 3" or "line 5: CHAIN_DEL failed …".
var blamedLineRe = regexp.MustCompile(`\bline:? ([0-9]+)`)

func newRestoreError(command, input, stderr string, err error) *RestoreError {
	e := &RestoreError{Command: command, Stderr: strings.TrimSpace(stderr), Err: err}
	if m := blamedLineRe.FindStringSubmatch(stderr); m != nil {
		n, _ := strconv.Atoi(m[1])
		lines := strings.Split(input, "\n")
		if n >= 1 && n <= len(lines) {
			e.Line, e.Input = n, lines[n-1]
		}
	}
	return e
}

// savedRule is one "-A" line of iptables-save output.
type savedRule struct {
	line   string
	chain  string
	target string
}

// parseSaved returns the chains declared and the rules of a saved table.
func parseSaved(saved string) (declared []string, rules []savedRule) {
	for line := range strings.Lines(saved) {
		line = strings.TrimRight(line, "\r\n")
		switch {
		case strings.HasPrefix(line, ":"):
			name, _, _ := strings.Cut(line[1:], " ")
			declared = append(declared, name)
		case strings.HasPrefix(line, "-A "):
			fields := splitArgs(line)
			if len(fields) < 2 {
				continue
			}
			r := savedRule{line: line, chain: fields[1]}
			for i := 2; i+1 < len(fields); i++ {
				if f := fields[i]; f == "-j" || f == "-g" || f == "--jump" || f == "--goto" {
					r.target = fields[i+1]
				}
			}
			rules = append(rules, r)
		}
	}
	return declared, rules
}

// splitArgs splits a saved rule into arguments as iptables-restore does:
// on spaces, except inside double quotes (comments), with \" escaped.
func splitArgs(line string) []string {
	var args []string
	var cur strings.Builder
	inQuote, escaped, have := false, false, false
	for _, c := range line {
		switch {
		case escaped:
			cur.WriteRune(c)
			escaped = false
		case c == '\\' && inQuote:
			escaped = true
		case c == '"':
			inQuote = !inQuote
			have = true
		case c == ' ' && !inQuote:
			if have {
				args = append(args, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteRune(c)
			have = true
		}
	}
	if have {
		args = append(args, cur.String())
	}
	return args
}

// jumpEdits returns the jump lines Apply must load given the saved table:
// none when exactly want is there already; otherwise "-D" for every rule
// outside chains (ours) that jumps into them, then want.
func jumpEdits(chains, want []string, saved string) []string {
	_, rules := parseSaved(saved)
	var have []string
	for _, r := range rules {
		if slices.Contains(chains, r.target) && !slices.Contains(chains, r.chain) {
			have = append(have, r.line)
		}
	}
	if slices.Equal(have, want) {
		return []string{}
	}
	edits := make([]string, 0, len(have)+len(want))
	for _, h := range have {
		edits = append(edits, "-D"+strings.TrimPrefix(h, "-A"))
	}
	return append(edits, want...)
}

// removeInput is the iptables-restore input that deletes chains (ours)
// and every rule jumping to them from the saved table; empty when there
// is nothing to remove.
func removeInput(table string, chains []string, saved string) string {
	declared, rules := parseSaved(saved)
	var b strings.Builder
	for _, r := range rules {
		if slices.Contains(chains, r.target) && !slices.Contains(chains, r.chain) {
			b.WriteString("-D" + strings.TrimPrefix(r.line, "-A") + "\n")
		}
	}
	var ours []string
	for _, c := range chains {
		if slices.Contains(declared, c) {
			ours = append(ours, c)
		}
	}
	// Flush all first: our chains jump to each other.
	for _, c := range ours {
		b.WriteString("-F " + c + "\n")
	}
	for _, c := range ours {
		b.WriteString("-X " + c + "\n")
	}
	if b.Len() == 0 {
		return ""
	}
	return "# Isthmus sidecar capture: removal\n*" + table + "\n" + b.String() + "COMMIT\n"
}
