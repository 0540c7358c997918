package capture

import (
	"bytes"
	"context"
	"errors"
	"fmt"
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
}

// Apply loads the capture rules for c with the zero Runner.
func Apply(ctx context.Context, c Config) error { return Runner{}.Apply(ctx, c) }

// Remove removes every capture rule with the zero Runner.
func Remove(ctx context.Context, c Config) error { return Runner{}.Remove(ctx, c) }

// Apply loads the capture rules for c into the nat table: for each family
// one iptables-restore --noflush, which the kernel commits atomically or
// not at all. Isthmus's chains are flushed and refilled, so applying twice
// is the same as applying once, and applying a changed Config replaces the
// old rules. The jumps from PREROUTING and OUTPUT are added only when they
// are not there exactly once already. If IPv6 fails after IPv4 was
// applied, IPv4's nat table is restored to what it was.
func (r Runner) Apply(ctx context.Context, c Config) error {
	if err := errors.Join(c.Validate(), r.Validate()); err != nil {
		return err
	}
	return r.edit(ctx, families(c), func(f family, saved string) string {
		t := buildTable(c, f)
		return t.render(jumpEdits(t.jumps, saved))
	})
}

// Remove deletes Isthmus's chains and every rule that jumps to them from
// the nat table, leaving everything else as it was. Only c.IPv6 matters:
// it removes the IPv6 rules too. Removing what is not there is not an
// error.
func (r Runner) Remove(ctx context.Context, c Config) error {
	if err := r.Validate(); err != nil {
		return err
	}
	return r.edit(ctx, families(c), func(_ family, saved string) string {
		return removeInput(saved)
	})
}

func families(c Config) []family {
	if c.IPv6 {
		return []family{ipv4, ipv6}
	}
	return []family{ipv4}
}

// edit saves each family's nat table, loads the input made from it (an
// empty input means nothing to do), and on a failure restores the families
// already changed.
func (r Runner) edit(ctx context.Context, fams []family, input func(f family, saved string) string) error {
	var changed []savedTable
	for _, f := range fams {
		saved, err := r.save(ctx, f)
		if err != nil {
			return errors.Join(err, r.rollback(ctx, changed))
		}
		in := input(f, saved)
		if in == "" {
			continue
		}
		if err := r.restore(ctx, f, in, "--noflush"); err != nil {
			return errors.Join(err, r.rollback(ctx, changed))
		}
		changed = append(changed, savedTable{f, saved})
	}
	return nil
}

// savedTable is a family's nat table as it was before edit changed it.
type savedTable struct {
	f     family
	saved string
}

// rollback puts back the saved nat tables: a restore without --noflush
// replaces the nat table, and only it, atomically. It runs even when ctx
// is done (that may be why the edit failed), bounded by the timeout.
func (r Runner) rollback(ctx context.Context, changed []savedTable) error {
	ctx = context.WithoutCancel(ctx)
	var errs []error
	for _, d := range slices.Backward(changed) {
		if err := r.restore(ctx, d.f, d.saved); err != nil {
			errs = append(errs, fmt.Errorf("roll back %s: %w", d.f.name, err))
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

// save returns f's nat table as iptables-save prints it.
func (r Runner) save(ctx context.Context, f family) (string, error) {
	name, err := r.command(f.save)
	if err != nil {
		return "", err
	}
	out, stderr, err := r.run(ctx, name, nil, "-t", "nat")
	if err != nil {
		return "", fmt.Errorf("%s -t nat: %w%s", name, err, quote(stderr))
	}
	return out, nil
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
	ctx, cancel := context.WithTimeout(ctx, r.timeout())
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out, errb bytes.Buffer
	cmd.Stdin = bytes.NewReader(stdin)
	cmd.Stdout = &out
	cmd.Stderr = &errb
	cmd.WaitDelay = time.Second
	err = cmd.Run()
	switch {
	case errors.Is(err, exec.ErrNotFound):
		err = fmt.Errorf("%w (install the iptables package)", err)
	case err != nil && ctx.Err() != nil:
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

// parseSaved returns the chains declared and the rules of a saved nat
// table.
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
// outside our chains that jumps into them, then want.
func jumpEdits(want []string, saved string) []string {
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

// removeInput is the iptables-restore input that deletes our chains and
// every rule jumping to them from the saved table; empty when there is
// nothing to remove.
func removeInput(saved string) string {
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
	return "# Isthmus sidecar capture: removal\n*nat\n" + b.String() + "COMMIT\n"
}
