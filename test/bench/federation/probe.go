package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	"k8s.io/client-go/tools/cache"

	"github.com/isthmus-mesh/isthmus/pkg/federator"
)

// poller fetches one path of a federator's monitoring port again and
// again, no more often than every interval, and keeps the count and total
// time of its requests, which (with the interval) bound the resolution of
// what it times.
type poller struct {
	url      string
	interval time.Duration
	client   *http.Client

	// mu guards n and spent.
	mu    sync.Mutex
	n     int
	spent time.Duration
}

// httpClient is shared by every poller: keep-alive connections to each
// monitoring port, never through a proxy from the environment.
var httpClient = &http.Client{
	Timeout:   5 * time.Second,
	Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 8, IdleConnTimeout: time.Minute},
}

func newPoller(base, path string, interval time.Duration) *poller {
	return &poller{url: base + path, interval: interval, client: httpClient}
}

// get fetches the path once and returns the body of a 200.
func (p *poller) get(ctx context.Context) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.url, nil)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	resp, err := p.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	p.mu.Lock()
	p.n++
	p.spent += time.Since(start)
	p.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", p.url, resp.Status)
	}
	return body, nil
}

// meanRequest is the mean duration of the requests made so far.
func (p *poller) meanRequest() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.n == 0 {
		return 0
	}
	return p.spent / time.Duration(p.n)
}

// until polls until cond holds for a body and returns when that body
// arrived. Failed requests (a federator not listening yet) are retried
// until ctx ends; an error from cond ends the wait.
func (p *poller) until(ctx context.Context, what string, cond func(body []byte) (bool, error)) (time.Time, error) {
	var last error
	for {
		start := time.Now()
		body, err := p.get(ctx)
		if err == nil {
			var ok bool
			if ok, err = cond(body); ok {
				return time.Now(), nil
			}
			if err != nil {
				return time.Time{}, fmt.Errorf("%s: %w", what, err)
			}
			last = nil
		} else {
			last = err
		}
		wait := time.Until(start.Add(p.interval))
		if wait <= 0 {
			wait = 0
		}
		select {
		case <-ctx.Done():
			if last != nil {
				return time.Time{}, fmt.Errorf("%s: %w (last error: %v)", what, ctx.Err(), last)
			}
			return time.Time{}, fmt.Errorf("%s: %w", what, ctx.Err())
		case <-time.After(wait):
		}
	}
}

// catalogCount counts the services of source in namespace ns (every
// namespace when ns is empty) in a /debug/catalog body, and reports
// whether the service named name is among them.
func catalogCount(body []byte, source, ns, name string) (count int, has bool, err error) {
	var d federator.CatalogDump
	if err := json.Unmarshal(body, &d); err != nil {
		return 0, false, fmt.Errorf("decode /debug/catalog: %w", err)
	}
	for _, src := range d.Sources {
		if src.Source != source {
			continue
		}
		for _, s := range src.Services {
			if ns != "" && s.Namespace != ns {
				continue
			}
			count++
			if s.Name == name {
				has = true
			}
		}
	}
	return count, has, nil
}

// inCatalog is a poll condition: source holds ns/name (want) or does not.
func inCatalog(source, ns, name string, want bool) func([]byte) (bool, error) {
	// Cheap pre-check: a body without the name cannot hold the service.
	needle := []byte(`"` + name + `"`)
	return func(body []byte) (bool, error) {
		if want && !bytes.Contains(body, needle) {
			return false, nil
		}
		_, has, err := catalogCount(body, source, ns, name)
		return has == want, err
	}
}

// peerView is what /debug/federation says about one peer.
type peerView struct {
	found     bool
	connected bool
	imported  int
}

func federationPeer(body []byte, peer string) (peerView, error) {
	var d federator.FederationDump
	if err := json.Unmarshal(body, &d); err != nil {
		return peerView{}, fmt.Errorf("decode /debug/federation: %w", err)
	}
	for _, p := range d.Peers {
		if p.Name == peer {
			return peerView{found: true, connected: p.State == "Connected", imported: p.Imported}, nil
		}
	}
	return peerView{}, nil
}

// metricValue finds the first sample of metric whose labels contain every
// one of labels (`name="value"` strings) in a Prometheus text body.
func metricValue(body []byte, metric string, labels ...string) (float64, bool) {
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, metric) {
			continue
		}
		rest := line[len(metric):]
		if rest == "" || (rest[0] != '{' && rest[0] != ' ') {
			continue
		}
		ok := true
		for _, l := range labels {
			if !strings.Contains(rest, l) {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		fields := strings.Fields(rest[strings.LastIndexByte(rest, '}')+1:])
		if len(fields) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil {
			continue
		}
		return v, true
	}
	return 0, false
}

// procMemory reads a process's peak and current resident set size.
func procMemory(pid int) (hwm, rss uint64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "VmHWM" && k != "VmRSS") {
			continue
		}
		kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc/%d/status %s: %w", pid, k, err)
		}
		if k == "VmHWM" {
			hwm = kb << 10
		} else {
			rss = kb << 10
		}
	}
	if hwm == 0 {
		return 0, 0, fmt.Errorf("/proc/%d/status has no VmHWM", pid)
	}
	return hwm, rss, sc.Err()
}

// procCPU is the CPU time (user + system) a process has used.
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces; fields count from after it.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	// utime and stime are fields 14 and 15 of the file, in clock ticks
	// (USER_HZ, 100 on Linux).
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: utime %q stime %q", pid, f[11], f[12])
	}
	return time.Duration(ut+st) * 10 * time.Millisecond, nil
}

// procName is the command name of a process, to check that a pid is the
// federator itself and not a wrapper.
func procName(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return strings.TrimSpace(string(b))
}

// entryRecorder watches every ServiceEntry of a cluster and timestamps the
// first time each appears and the time it is deleted, as the watch
// delivers them: the moment the API server has (or no longer has) it.
type entryRecorder struct {
	factory istioinformers.SharedInformerFactory
	stop    chan struct{}

	// mu guards the maps.
	mu      sync.Mutex
	added   map[string]time.Time
	deleted map[string]time.Time
}

func newEntryRecorder(ctx context.Context, istio istioclient.Interface) (*entryRecorder, error) {
	r := &entryRecorder{
		factory: istioinformers.NewSharedInformerFactory(istio, 0),
		stop:    make(chan struct{}),
		added:   map[string]time.Time{},
		deleted: map[string]time.Time{},
	}
	inf := r.factory.Networking().V1().ServiceEntries().Informer()
	key := func(obj any) (string, bool) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		se, ok := obj.(*networkingv1.ServiceEntry)
		if !ok {
			return "", false
		}
		return se.Namespace + "/" + se.Name, true
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			now := time.Now()
			if k, ok := key(obj); ok {
				r.mu.Lock()
				if _, seen := r.added[k]; !seen {
					r.added[k] = now
				}
				r.mu.Unlock()
			}
		},
		DeleteFunc: func(obj any) {
			now := time.Now()
			if k, ok := key(obj); ok {
				r.mu.Lock()
				r.deleted[k] = now
				r.mu.Unlock()
			}
		},
	}); err != nil {
		return nil, err
	}
	r.factory.Start(r.stop)
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if !cache.WaitForCacheSync(sctx.Done(), inf.HasSynced) {
		r.close()
		return nil, fmt.Errorf("ServiceEntry watch did not sync: %w", sctx.Err())
	}
	return r, nil
}

func (r *entryRecorder) close() {
	close(r.stop)
	r.factory.Shutdown()
}

// at returns when ns/name was first added (or deleted, with deleted set).
func (r *entryRecorder) at(key string, deleted bool) (time.Time, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.added
	if deleted {
		m = r.deleted
	}
	t, ok := m[key]
	return t, ok
}

// addedIn counts the ServiceEntries first added in namespaces for which
// inNS holds, and returns when the first and the last of them arrived.
func (r *entryRecorder) addedIn(inNS func(string) bool) (n int, first, last time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for k, t := range r.added {
		ns, _, _ := strings.Cut(k, "/")
		if !inNS(ns) {
			continue
		}
		n++
		if first.IsZero() || t.Before(first) {
			first = t
		}
		if t.After(last) {
			last = t
		}
	}
	return n, first, last
}

// wait waits, checking every 10 ms, until key was added (or deleted).
func (r *entryRecorder) wait(ctx context.Context, key string, deleted bool) (time.Time, error) {
	for {
		if t, ok := r.at(key, deleted); ok {
			return t, nil
		}
		select {
		case <-ctx.Done():
			what := "created"
			if deleted {
				what = "deleted"
			}
			return time.Time{}, fmt.Errorf("ServiceEntry %s not %s: %w", key, what, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}
