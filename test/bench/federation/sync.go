package main

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/test/bench/internal/bulk"
	"github.com/isthmus-mesh/isthmus/test/bench/internal/table"
)

const (
	syncNSPrefix = "sync-"
	scaleNS      = "bench-scale"
)

// syncResult holds steps 3 to 5.
type syncResult struct {
	n       int
	created time.Duration
	// a's restart: start → /readyz, start → catalog holds n; CPU used.
	aReady, aSync time.Duration
	aCPU          time.Duration
	// b's start: → /readyz, → stream up, → catalog holds n from a; CPU.
	bReady, bConnected, bSync time.Duration
	bCPU                      time.Duration
	// aCPUDuringSync is what a spent while b synced.
	aCPUDuringSync time.Duration
	// ServiceEntries written in b by seElapsed after b's start; seAll is
	// when the last of all n arrived (zero if not within the cap).
	seCount            int
	seFirst, seLast    time.Duration
	seAll, seElapsed   time.Duration
	fedPollMean        time.Duration
	metricsPollMean    time.Duration
	scaleA, scaleB     table.Samples
	scaleCall          table.Samples
	scaleAPoll         time.Duration
	hwmA, hwmB         uint64
	rssA, rssB         uint64
	promRSSA, promRSSB float64
	heapA, heapB       float64
}

func syncNS(i, namespaces int) string { return fmt.Sprintf("%s%02d", syncNSPrefix, i%namespaces) }

func isSyncNS(ns string) bool { return strings.HasPrefix(ns, syncNSPrefix) }

// localCount is a poll condition on /metrics: a's catalog holds at least n
// services of its own.
func localCount(n int) func([]byte) (bool, error) {
	return func(body []byte) (bool, error) {
		v, ok := metricValue(body, "isthmus_catalog_services", `source="`+catalog.LocalSource+`"`)
		return ok && int(v) >= n, nil
	}
}

func measureSync(ctx context.Context, cfg config, log *slog.Logger, a, b *member, rec *entryRecorder, template *mcsv1alpha1.ServiceExport) (*syncResult, error) {
	statusFor, err := exportStatus(template)
	if err != nil {
		return nil, err
	}
	n := cfg.services
	res := &syncResult{n: n}
	// Stopped while the services are created: a running exporter would
	// write each export's status itself (see the package documentation).
	for _, m := range []*member{b, a} {
		if err := m.stop(); err != nil {
			return nil, fmt.Errorf("stop federator %s: %w", m.name(), err)
		}
	}
	for _, m := range []*member{a, b} {
		for i := range min(cfg.namespaces, n) {
			if err := m.ensureNamespace(ctx, syncNS(i, cfg.namespaces)); err != nil {
				return nil, err
			}
		}
		if err := m.ensureNamespace(ctx, scaleNS); err != nil {
			return nil, err
		}
	}
	if err := bulk.ForEach(ctx, cfg.scaleChanges, cfg.workers, func(ctx context.Context, i int) error {
		return a.createService(ctx, scaleNS, fmt.Sprintf("scale-%d", i))
	}); err != nil {
		return nil, err
	}

	t0 := time.Now()
	var done atomic.Int64
	progress := time.NewTicker(15 * time.Second)
	defer progress.Stop()
	cctx, cancel := context.WithTimeout(ctx, 45*time.Minute)
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		errc <- bulk.ForEach(cctx, n, cfg.workers, func(ctx context.Context, i int) error {
			ns, name := syncNS(i, cfg.namespaces), fmt.Sprintf("svc-%05d", i)
			if err := a.createService(ctx, ns, name); err != nil {
				return err
			}
			se, err := a.ensureExport(ctx, ns, name)
			if err != nil {
				return err
			}
			if err := a.setExportStatus(ctx, se, statusFor(ns, name, se.Generation)); err != nil {
				return err
			}
			done.Add(1)
			return nil
		})
	}()
wait:
	for {
		select {
		case err := <-errc:
			if err != nil {
				return nil, err
			}
			break wait
		case <-progress.C:
			log.Info("creating", "services", done.Load(), "of", n, "elapsed", time.Since(t0).Round(time.Second))
		}
	}
	res.created = time.Since(t0)
	log.Info("created", "services", n, "in", res.created.Round(time.Millisecond))

	// a first: its catalog must hold them all before b starts.
	pm := newPoller(a.monitoring, "/metrics", cfg.countPoll)
	ta, aCPU, err := startTimed(ctx, a, func(ctx context.Context) (time.Time, error) {
		return pm.until(ctx, fmt.Sprintf("a's catalog holds %d services", n), localCount(n))
	})
	if err != nil {
		return nil, err
	}
	res.aReady, res.aSync, res.aCPU = ta.ready, ta.done, aCPU
	log.Info("a ready", "ready", res.aReady.Round(time.Millisecond), "catalog", res.aSync.Round(time.Millisecond))

	// Then b, timed to its catalog holding all of a's services.
	pf := newPoller(b.monitoring, "/debug/federation", cfg.poll)
	aCPU0, err := procCPU(a.f.Proc.Pid())
	if err != nil {
		return nil, err
	}
	var connectedAt time.Time
	tb, bCPU, err := startTimed(ctx, b, func(ctx context.Context) (time.Time, error) {
		return pf.until(ctx, fmt.Sprintf("b's catalog holds %d services from a", n), func(body []byte) (bool, error) {
			v, err := federationPeer(body, "a")
			if v.connected && connectedAt.IsZero() {
				connectedAt = time.Now()
			}
			return v.imported >= n, err
		})
	})
	if err != nil {
		return nil, err
	}
	aCPU1, err := procCPU(a.f.Proc.Pid())
	if err != nil {
		return nil, err
	}
	res.bReady, res.bSync, res.bCPU = tb.ready, tb.done, bCPU
	if !connectedAt.IsZero() {
		res.bConnected = connectedAt.Sub(tb.start)
	}
	res.aCPUDuringSync = aCPU1 - aCPU0
	res.fedPollMean, res.metricsPollMean = pf.meanRequest(), pm.meanRequest()
	log.Info("b synced", "ready", res.bReady.Round(time.Millisecond), "connected", res.bConnected.Round(time.Millisecond), "catalog", res.bSync.Round(time.Millisecond))

	// The count is what the federator published; the catalog must agree.
	body, err := newPoller(b.monitoring, "/debug/catalog", cfg.poll).get(ctx)
	if err != nil {
		return nil, err
	}
	if got, _, err := catalogCount(body, "a", "", ""); err != nil || got != n {
		return nil, fmt.Errorf("b's /debug/catalog holds %d services from a, want %d (err %v)", got, n, err)
	}

	// The ServiceEntries, up to the cap after b's start.
	deadline := tb.start.Add(cfg.seCap)
	for {
		count, first, last := rec.addedIn(isSyncNS)
		res.seCount = count
		if count > 0 {
			res.seFirst, res.seLast = first.Sub(tb.start), last.Sub(tb.start)
		}
		if count >= n {
			res.seAll = last.Sub(tb.start)
			break
		}
		if !time.Now().Before(deadline) {
			break
		}
		if err := sleep(ctx, min(time.Second, time.Until(deadline))); err != nil {
			return nil, err
		}
		if time.Since(tb.start).Round(time.Second)%(30*time.Second) == 0 {
			log.Info("ServiceEntries in b", "count", count, "of", n, "since b's start", time.Since(tb.start).Round(time.Second))
		}
	}
	res.seElapsed = time.Since(tb.start)
	log.Info("ServiceEntries in b", "count", res.seCount, "of", n, "after", res.seElapsed.Round(time.Second))
	return res, nil
}

// timing is a federator start measured from outside.
type timing struct {
	start       time.Time
	ready, done time.Duration
}

// startTimed starts m's federator while poll (which may have to retry
// until the federator listens) waits for what is timed; it returns when
// the federator was ready, when poll succeeded, and the CPU the process
// used until then.
func startTimed(ctx context.Context, m *member, poll func(context.Context) (time.Time, error)) (timing, time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	var t timing
	var doneAt time.Time
	g, gctx := errgroup.WithContext(ctx)
	t.start = time.Now()
	g.Go(func() (err error) {
		doneAt, err = poll(gctx)
		return err
	})
	g.Go(func() error {
		if err := m.start(gctx); err != nil {
			return err
		}
		t.ready = time.Since(t.start)
		return nil
	})
	if err := g.Wait(); err != nil {
		return t, 0, err
	}
	t.done = doneAt.Sub(t.start)
	cpu, err := procCPU(m.f.Proc.Pid())
	return t, cpu, err
}

// measureAtScale times more exports with the n in place. /debug/catalog
// would be megabytes per poll here, so a's side is its /metrics count and
// b's the import count of /debug/federation.
func measureAtScale(ctx context.Context, cfg config, log *slog.Logger, a, b *member, res *syncResult) error {
	pa := newPoller(a.monitoring, "/metrics", cfg.countPoll)
	pb := newPoller(b.monitoring, "/debug/federation", cfg.poll)
	for i := range cfg.scaleChanges {
		tick := time.Now()
		want := res.n + i + 1
		t0 := time.Now()
		if _, err := a.createExport(ctx, scaleNS, fmt.Sprintf("scale-%d", i)); err != nil {
			return err
		}
		res.scaleCall = append(res.scaleCall, time.Since(t0))
		wctx, cancel := context.WithTimeout(ctx, cfg.propagateBound)
		g, gctx := errgroup.WithContext(wctx)
		var ta, tb time.Time
		g.Go(func() (err error) {
			ta, err = pa.until(gctx, fmt.Sprintf("a's catalog holds %d services", want), localCount(want))
			return err
		})
		g.Go(func() (err error) {
			tb, err = pb.until(gctx, fmt.Sprintf("b's catalog holds %d services from a", want), func(body []byte) (bool, error) {
				v, err := federationPeer(body, "a")
				return v.imported >= want, err
			})
			return err
		})
		err := g.Wait()
		cancel()
		if err != nil {
			return err
		}
		res.scaleA = append(res.scaleA, ta.Sub(t0))
		res.scaleB = append(res.scaleB, tb.Sub(t0))
		log.Info("at scale", "change", i, "call", res.scaleCall[i].Round(time.Microsecond), "toA", ta.Sub(t0).Round(time.Microsecond), "toB", tb.Sub(t0).Round(time.Microsecond))
		if err := sleep(ctx, time.Until(tick.Add(cfg.interval))); err != nil {
			return err
		}
	}
	res.scaleAPoll = pa.meanRequest()
	log.Info("at scale", "p50ToB", res.scaleB.Pct(50).Round(time.Microsecond), "maxToB", res.scaleB.Max().Round(time.Microsecond))
	return nil
}

// readMemory reads both federators' peak and current resident sets and
// what they report themselves.
func (r *syncResult) readMemory(ctx context.Context, a, b *member) error {
	var err error
	if r.hwmA, r.rssA, err = procMemory(a.f.Proc.Pid()); err != nil {
		return err
	}
	if r.hwmB, r.rssB, err = procMemory(b.f.Proc.Pid()); err != nil {
		return err
	}
	for _, x := range []struct {
		m         *member
		rss, heap *float64
	}{{a, &r.promRSSA, &r.heapA}, {b, &r.promRSSB, &r.heapB}} {
		body, err := newPoller(x.m.monitoring, "/metrics", time.Second).get(ctx)
		if err != nil {
			return err
		}
		var ok1, ok2 bool
		*x.rss, ok1 = metricValue(body, "process_resident_memory_bytes")
		*x.heap, ok2 = metricValue(body, "go_memstats_heap_inuse_bytes")
		if !ok1 || !ok2 {
			return fmt.Errorf("federator %s's /metrics lacks process_resident_memory_bytes or go_memstats_heap_inuse_bytes", x.m.name())
		}
	}
	return nil
}

func (r *syncResult) report(rep *table.Report, cfg config) {
	n := r.n
	se := table.Row{Measure: fmt.Sprintf("b start → all %d ServiceEntries in b's API server", n), Unit: table.Seconds,
		Ours: r.seAll.Seconds(), Peer: table.None, Target: table.None}
	if r.seAll == 0 {
		se.Ours = table.None
		rate := 0.0
		if span := r.seLast - r.seFirst; r.seCount > 1 && span > 0 {
			rate = float64(r.seCount-1) / span.Seconds()
		}
		se.Note = fmt.Sprintf("not within %s: %d written (%.1f/s", cfg.seCap, r.seCount, rate)
		if rate > 0 {
			se.Note += fmt.Sprintf("; all in ~%.0f min at that rate", (r.seFirst.Seconds()+float64(n)/rate)/60)
		}
		se.Note += ")"
	}
	rep.Add(table.Section{
		Title: fmt.Sprintf("Initial sync of %d exported services", n),
		Peer:  fmt.Sprintf("a's own start: federator start → a's catalog holds the %d, read from a's API server", n),
		Rows: []table.Row{
			{Measure: fmt.Sprintf("b start → b's catalog holds all %d from a", n), Unit: table.Seconds, Ours: r.bSync.Seconds(), Peer: r.aSync.Seconds(), Target: 5},
			{Measure: "b start → ready (/readyz)", Unit: table.Seconds, Ours: r.bReady.Seconds(), Peer: r.aReady.Seconds(), Target: table.None},
			{Measure: "b start → federation stream to a up", Unit: table.Seconds, Ours: orNone(r.bConnected), Peer: table.None, Target: table.None},
			se,
			{Measure: "CPU seconds used, start → catalog complete", Unit: table.Seconds, Ours: r.bCPU.Seconds(), Peer: r.aCPU.Seconds(), Target: table.None},
			{Measure: "CPU seconds a used while b synced", Unit: table.Seconds, Ours: r.aCPUDuringSync.Seconds(), Peer: table.None, Target: table.None},
		},
	})
	if len(r.scaleB) > 0 {
		rep.Add(table.Section{
			Title: fmt.Sprintf("ServiceExport created in a, %d already exported", n),
			Peer:  "a's own catalog (its /metrics count)",
			Rows: slices.Concat(table.LatencyRows("→ b's catalog", r.scaleB, r.scaleA, 0.200, ""),
				table.LatencyRows("→ b's catalog, from the Create call's return", r.scaleB.Minus(r.scaleCall), r.scaleA.Minus(r.scaleCall), 0.200, ""),
				table.LatencyRows("federation hop: b's catalog − a's catalog, same change", r.scaleB.Minus(r.scaleA), nil, table.None, "")),
		})
	}
	const target = 300e6
	rep.Add(table.Section{
		Title: fmt.Sprintf("Federator memory with %d services", n),
		Rows: []table.Row{
			{Measure: fmt.Sprintf("a (exports %d): peak RSS, VmHWM", n), Unit: table.MB, Ours: float64(r.hwmA), Peer: table.None, Target: target},
			{Measure: fmt.Sprintf("b (imports %d, writes ServiceEntries): peak RSS, VmHWM", n), Unit: table.MB, Ours: float64(r.hwmB), Peer: table.None, Target: target},
			{Measure: "a: process_resident_memory_bytes at the end", Unit: table.MB, Ours: r.promRSSA, Peer: table.None, Target: target},
			{Measure: "b: process_resident_memory_bytes at the end", Unit: table.MB, Ours: r.promRSSB, Peer: table.None, Target: target},
			{Measure: "a: go_memstats_heap_inuse_bytes at the end", Unit: table.MB, Ours: r.heapA, Peer: table.None, Target: table.None},
			{Measure: "b: go_memstats_heap_inuse_bytes at the end", Unit: table.MB, Ours: r.heapB, Peer: table.None, Target: table.None},
		},
	})
	rep.Note("Initial sync: %d Services and ServiceExports (in %d namespaces, with the exporter's status) created in a in %s while both federators were stopped; "+
		"a's federator was then started and its catalog held them %s later; b's federator was started after that. "+
		"b's import count polled every %s (request mean %s), a's /metrics every %s (request mean %s); ready times have fedproc's 50 ms resolution.",
		n, cfg.namespaces, r.created.Round(100*time.Millisecond), r.aSync.Round(time.Millisecond),
		cfg.poll, r.fedPollMean.Round(time.Microsecond), cfg.countPoll, r.metricsPollMean.Round(time.Microsecond))
	if r.seCount > 0 {
		rep.Note("ServiceEntries in b: the first %s after b's start, %d by %s.", r.seFirst.Round(time.Millisecond), r.seCount, r.seElapsed.Round(time.Second))
	}
	if len(r.scaleB) > 0 {
		rep.Note("At scale: %d changes, one every %s; the Create call took %s at p50, %s at most; a's /metrics polled every %s (request mean %s), b's /debug/federation every %s. Memory: VmHWM is the peak since the federators were restarted for the sync; VmRSS at the end was %.0f MB (a) and %.0f MB (b).",
			len(r.scaleB), cfg.interval, r.scaleCall.Pct(50).Round(100*time.Microsecond), r.scaleCall.Max().Round(100*time.Microsecond), cfg.countPoll, r.scaleAPoll.Round(time.Microsecond), cfg.poll, float64(r.rssA)/1e6, float64(r.rssB)/1e6)
	}
}

// orNone is d in seconds, or "not measured" for zero.
func orNone(d time.Duration) float64 {
	if d == 0 {
		return table.None
	}
	return d.Seconds()
}
