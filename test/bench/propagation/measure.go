package main

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/isthmus-mesh/isthmus/pkg/xds"
	"github.com/isthmus-mesh/isthmus/test/bench/internal/table"
)

// target is the bound on both directions.
const target = time.Second

// direction holds one direction's samples (export or unexport), one per
// change that reached the gateway within the bound.
type direction struct {
	// total: from the call's return until the gateway routed (refused) a
	// new connection.
	total table.Samples
	// call: the Create (Delete) call's own round-trip, the floor.
	call table.Samples
	// watch: from the call's return until an informer in this process
	// saw the event (negative when the event came before the response).
	watch table.Samples
	// federator: from the call's return until the federator set the xDS
	// snapshot with (without) the service; delivery: from then until the
	// gateway routed (refused). Only for changes the snapshot time is
	// known for (see unattributed).
	federator, delivery table.Samples
	// attempts is the number of connections each change took.
	attempts []int
	// missed counts changes not seen at the gateway within the bound;
	// unattributed those whose /debug/xds did not show the change as the
	// last snapshot set between the call and the gateway's answer.
	missed, unattributed int
}

// phase is one run over the measured services.
type phase struct {
	title            string
	export, unexport direction
}

// measure exports and unexports every measured service, one after the
// other, and times each change until the gateway shows it.
func (b *bench) measure(ctx context.Context, cfg config, log *slog.Logger, title string) (*phase, error) {
	ph := &phase{title: title}
	for i := range cfg.services {
		name := measuredName(i)
		sni := xds.ServiceSNI(measuredNS, name, servicePort)

		ok, err := b.change(ctx, cfg, log, &ph.export, name, sni, true)
		if err != nil {
			return nil, err
		}
		time.Sleep(cfg.pause)
		if !ok {
			// Never routable: its unexport is no measure of anything.
			if err := b.deleteExport(ctx, measuredNS, name); err != nil {
				return nil, err
			}
			if _, _, err := b.probe.until(ctx, sni, refused, cfg.bound); err != nil {
				return nil, err
			}
			continue
		}
		if _, err := b.change(ctx, cfg, log, &ph.unexport, name, sni, false); err != nil {
			return nil, err
		}
		time.Sleep(cfg.pause)
		if (i+1)%10 == 0 || i+1 == cfg.services {
			log.Info("progress", "changes", i+1, "of", cfg.services,
				"exportP50", ph.export.total.Pct(50).Round(time.Millisecond), "unexportP50", ph.unexport.total.Pct(50).Round(time.Millisecond))
		}
	}
	if len(ph.export.total) == 0 {
		return nil, fmt.Errorf("%s: no export became routable within %s", title, cfg.bound)
	}
	return ph, nil
}

// change creates (export) or deletes the ServiceExport of name, waits
// until the gateway routes (refuses) a new connection for sni, and adds
// the samples to d. It reports false when the gateway did not show the
// change within the bound; err is for what stops the benchmark.
func (b *bench) change(ctx context.Context, cfg config, log *slog.Logger, d *direction, name, sni string, export bool) (bool, error) {
	before, want, verb := routed, refused, "unexport"
	if export {
		before, want, verb = refused, routed, "export"
	}
	// The gateway must show the state before the change, or the time
	// would measure nothing.
	if _, _, err := b.probe.until(ctx, sni, before, cfg.bound); err != nil {
		return false, fmt.Errorf("before the %s of %s: %w", verb, name, err)
	}

	t0 := time.Now()
	var err error
	if export {
		err = b.createExport(ctx, measuredNS, name)
	} else {
		err = b.deleteExport(ctx, measuredNS, name)
	}
	t1 := time.Now()
	if err != nil {
		return false, err
	}
	at, attempts, err := b.probe.until(ctx, sni, want, cfg.bound)
	if ctx.Err() != nil {
		return false, ctx.Err()
	}
	if err != nil {
		d.missed++
		log.Warn("change not seen at the gateway", "change", verb, "service", name, "error", err)
		return false, nil
	}
	d.total = append(d.total, at.Sub(t1))
	d.call = append(d.call, t1.Sub(t0))
	d.attempts = append(d.attempts, attempts)
	if seen, ok := b.events.after(ctx, name, !export, t0); ok {
		d.watch = append(d.watch, seen.Sub(t1))
	}
	setAt, ok, err := b.snapshotSetAt(ctx, name, export)
	if err != nil {
		return false, err
	}
	if ok && !setAt.Before(t0) && !setAt.After(at) {
		d.federator = append(d.federator, setAt.Sub(t1))
		d.delivery = append(d.delivery, at.Sub(setAt))
	} else {
		d.unattributed++
	}
	log.Debug("change", "change", verb, "service", name, "total", at.Sub(t1).Round(10*time.Microsecond),
		"call", t1.Sub(t0).Round(10*time.Microsecond), "attempts", attempts, "snapshotSet", setAt.Sub(t1).Round(10*time.Microsecond))
	return true, nil
}

// snapshotSetAt reads the federator's /debug/xds: when the gateway
// snapshot being served was set, if it holds (export) or lacks the
// service's cluster.
func (b *bench) snapshotSetAt(ctx context.Context, name string, export bool) (time.Time, bool, error) {
	st, err := b.f.XDS(ctx)
	if err != nil {
		return time.Time{}, false, fmt.Errorf("read /debug/xds: %w", err)
	}
	cluster := xds.ServiceClusterName(measuredNS, name, servicePort)
	has := false
	for _, names := range st.Gateway.Resources {
		if slices.Contains(names, cluster) {
			has = true
			break
		}
	}
	return st.Gateway.SetAt, has == export, nil
}

func (ph *phase) report(rep *table.Report, cfg config) {
	bound := target.Seconds()
	for _, x := range []struct {
		d          *direction
		title, end string
		call       string
	}{
		{&ph.export, "ServiceExport created → a new connection through the gateway completes its handshake with the backend", "routable", "Create"},
		{&ph.unexport, "ServiceExport deleted → the gateway refuses a new connection", "refused", "Delete"},
	} {
		d := x.d
		rows := slices.Concat(
			table.BoundRows(fmt.Sprintf("%s, from the %s call's return", x.end, x.call), d.total, d.call, bound, ""),
			table.LatencyRows(fmt.Sprintf("stage: %s's return → federator sets the xDS snapshot", x.call), d.federator, nil, table.None, "watch, reconcile, coalescing, translation"),
			table.LatencyRows(fmt.Sprintf("stage: xDS snapshot set → gateway %s", x.end), d.delivery, nil, table.None, "ADS push, gateway apply, poll"),
			table.LatencyRows(fmt.Sprintf("an informer here sees the %s, from the call's return", x.call), d.watch, nil, table.None, "API server watch"),
			[]table.Row{{Measure: fmt.Sprintf("changes not %s within %s", x.end, cfg.bound), Unit: table.Count,
				Ours: float64(d.missed), Peer: table.None, Target: 0}},
		)
		rep.Add(table.Section{Title: fmt.Sprintf("%s (%s)", x.title, ph.title),
			Peer: fmt.Sprintf("the %s call's own round-trip to the API server (the floor)", x.call), Rows: rows})
		if d.unattributed > 0 {
			rep.Note("%s, %s: %d of %d changes have no stage split (/debug/xds did not show their snapshot as the last one set before the gateway's answer).",
				ph.title, x.end, d.unattributed, len(d.total))
		}
	}
}

// compare puts the same changes side by side, beside the background and
// alone: the ratio says how much a bigger catalog costs each change.
func compare(rep *table.Report, alone, busy *phase) {
	rep.Add(table.Section{
		Title: fmt.Sprintf("Does it degrade with size? The same changes, %s", busy.title),
		Peer:  "the same changes with " + alone.title + ", same run",
		Rows: slices.Concat(
			table.BoundRows("export → routable", busy.export.total, alone.export.total, target.Seconds(), ""),
			table.BoundRows("unexport → refused", busy.unexport.total, alone.unexport.total, target.Seconds(), ""),
			table.LatencyRows("stage: call's return → xDS snapshot set (export)", busy.export.federator, alone.export.federator, table.None, ""),
			table.LatencyRows("stage: xDS snapshot set → gateway routable", busy.export.delivery, alone.export.delivery, table.None, ""),
		),
	})
}
