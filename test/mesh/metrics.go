package mesh

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// GatewayMetrics fetches the cluster's east-west gateway's Prometheus
// metrics.
func (c *Cluster) GatewayMetrics(ctx context.Context) (string, error) {
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.Gateway.Metrics+"/metrics", nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("cluster %s: gateway metrics: %s", c.Name(), resp.Status)
	}
	return string(body), nil
}

// MetricSum adds up the samples of metric name in a Prometheus text
// exposition whose labels include every label of match (name="value"
// pairs, as written in the exposition). No sample is 0.
func MetricSum(exposition, name string, match ...string) float64 {
	var sum float64
	for line := range strings.Lines(exposition) {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		series, value, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		metric, labels, _ := strings.Cut(series, "{")
		if metric != name {
			continue
		}
		labels = "," + labels // so each label starts after a comma
		matches := true
		for _, m := range match {
			if !strings.Contains(labels, ","+m) {
				matches = false
				break
			}
		}
		if !matches {
			continue
		}
		value, _, _ = strings.Cut(value, " ") // a timestamp may follow
		if v, err := strconv.ParseFloat(value, 64); err == nil {
			sum += v
		}
	}
	return sum
}
