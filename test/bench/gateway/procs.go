package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/test/bench/internal/procs"
)

func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// fillerRoutes are the other exported services: names and pod addresses
// nothing is sent to, so the table has its production size.
func fillerRoute(i int) (sni, cluster, addr string) {
	return fmt.Sprintf("outbound_.8080_._.svc-%04d.bench.svc.cluster.local", i),
		fmt.Sprintf("outbound|8080||svc-%04d.bench.svc.cluster.local", i),
		fmt.Sprintf("10.%d.%d.%d:8080", 200+i/65536, i/256%256, i%256)
}

// startGateway runs the gateway binary bin as name (its log is
// <dir>/<name>.log) with a routes file of n routes, one of them
// benchSNI → backend.
func startGateway(name, bin, dir, backend string, n, gomaxprocs int) (p *procs.Proc, addr string, err error) {
	type ep struct {
		Address string `json:"address"`
	}
	type route struct {
		SNI       string `json:"sni"`
		Cluster   string `json:"cluster"`
		Endpoints []ep   `json:"endpoints"`
	}
	routes := []route{{SNI: benchSNI, Cluster: "outbound|8443||backend.bench.svc.cluster.local", Endpoints: []ep{{backend}}}}
	for i := 1; i < n; i++ {
		sni, cluster, a := fillerRoute(i)
		routes = append(routes, route{SNI: sni, Cluster: cluster, Endpoints: []ep{{a}}})
	}
	data, err := json.Marshal(map[string]any{"routes": routes})
	if err != nil {
		return nil, "", err
	}
	file := filepath.Join(dir, name+"-routes.json")
	if err := os.WriteFile(file, data, 0o644); err != nil {
		return nil, "", err
	}
	if addr, err = freePort(); err != nil {
		return nil, "", err
	}
	health, err := freePort()
	if err != nil {
		return nil, "", err
	}
	cmd := exec.Command(bin,
		"--listen-addr", addr, "--health-addr", health, "--metrics-addr", "",
		"--routes-file", file, "--log-level", "warn")
	if gomaxprocs > 0 {
		cmd.Env = append(os.Environ(), "GOMAXPROCS="+strconv.Itoa(gomaxprocs))
	}
	log := filepath.Join(dir, name+".log")
	p, err = procs.Start(name, cmd, log, nil)
	if err != nil {
		return nil, "", err
	}
	err = procs.WaitFor(10*time.Second, func() bool {
		resp, err := http.Get("http://" + health + "/healthz/ready")
		if err != nil {
			return false
		}
		_ = resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	if err != nil {
		p.Stop()
		return nil, "", fmt.Errorf("%s not ready (see %s): %w", bin, log, err)
	}
	return p, addr, nil
}

// nginxModule finds Debian's dynamic stream module.
func nginxModule() (string, error) {
	if _, err := exec.LookPath("nginx"); err != nil {
		return "", errors.New("nginx is not installed")
	}
	const mod = "/usr/lib/nginx/modules/ngx_stream_module.so"
	if _, err := os.Stat(mod); err != nil {
		return "", fmt.Errorf("%s is missing (apt-get install libnginx-mod-stream)", mod)
	}
	return mod, nil
}

// startNginx runs nginx's stream module with ssl_preread, routing the
// same n server names (a map, the idiomatic SNI router), as a foreground
// master with one worker per core.
func startNginx(dir, module, backend string, n int) (p *procs.Proc, addr string, err error) {
	if addr, err = freePort(); err != nil {
		return nil, "", err
	}
	var m strings.Builder
	fmt.Fprintf(&m, "        %s %s;\n", benchSNI, backend)
	for i := 1; i < n; i++ {
		sni, _, a := fillerRoute(i)
		fmt.Fprintf(&m, "        %s %s;\n", sni, a)
	}
	conf := fmt.Sprintf(`load_module %s;
worker_processes auto;
worker_rlimit_nofile 65536;
pid %s/nginx.pid;
error_log %s/nginx-error.log warn;
events { worker_connections 16384; }
stream {
    map_hash_bucket_size 128;
    map $ssl_preread_server_name $upstream {
%s        default 127.0.0.1:1;
    }
    server {
        listen %s;
        ssl_preread on;
        proxy_pass $upstream;
        proxy_connect_timeout 1s;
    }
}
`, module, dir, dir, m.String(), addr)
	file := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(file, []byte(conf), 0o644); err != nil {
		return nil, "", err
	}
	if out, err := exec.Command("nginx", "-t", "-q", "-p", dir, "-c", file).CombinedOutput(); err != nil {
		return nil, "", fmt.Errorf("nginx -t: %v: %s", err, out)
	}
	p, err = procs.Start("nginx", exec.Command("nginx", "-p", dir, "-c", file, "-g", "daemon off;"), filepath.Join(dir, "nginx.log"), nil)
	if err != nil {
		return nil, "", err
	}
	err = procs.WaitFor(10*time.Second, func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			_ = c.Close()
		}
		return err == nil && len(p.Pids()) > 1
	})
	if err != nil {
		p.Stop()
		return nil, "", fmt.Errorf("nginx did not start (see %s): %w", dir, err)
	}
	return p, addr, nil
}
