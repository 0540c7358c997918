# The Makefile is Isthmus's interface: `make help` lists the targets.
# Every target installs what it needs (Go tools into bin/, etcd from
# Debian when running as root, kube-apiserver built from the Go module
# proxy into a cache outside the clone).

SHELL := /usr/bin/env bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

BIN        := $(CURDIR)/bin
VERSION    ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS    := -X github.com/isthmus-mesh/isthmus/pkg/version.Version=$(VERSION)
GO_TEST    ?= go test -race -count=1 -timeout 30m
STATICCHECK_VERSION := v0.8.2
KUSTOMIZE_VERSION   := v5.8.1
BUF_VERSION         := v1.75.0
PROTOC_GEN_GO_VERSION      := v1.36.12
CONTROLLER_GEN_VERSION     := v0.23.0
FORTIO_VERSION             := v1.66.5
H2SPEC_VERSION             := v2.2.1+incompatible

export PATH := $(BIN):$(PATH)

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: build
build: ## Build the binaries into bin/ (static, as the images in build/ are)
	CGO_ENABLED=0 go build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/...

.PHONY: tools
tools: ## Install what tests and the demo need (etcd, iproute2, iptables, setpriv, staticcheck, kustomize, h2spec)
	@hack/install-tools.sh "$(BIN)" "$(STATICCHECK_VERSION)" "$(KUSTOMIZE_VERSION)" "$(H2SPEC_VERSION)"

.PHONY: kube-binaries
kube-binaries: ## Build (once, cached) kube-apiserver and kube-controller-manager
	@hack/kube-binaries.sh >/dev/null

.PHONY: test
test: tools kube-binaries ## Run every test, including real kube-apiservers (root: network namespaces)
	@test -z "$$(gofmt -l .)" || { echo "gofmt needed on:"; gofmt -l .; exit 1; }
	go vet ./...
	ISTHMUS_KUBE_BIN_DIR="$$(hack/kube-binaries.sh)" $(GO_TEST) ./...

.PHONY: fuzz
fuzz: ## Fuzz every parser and protocol path with coverage guidance, FUZZTIME each (default 30s; FUZZ=<regexp> narrows)
	@hack/fuzz.sh

.PHONY: lint
lint: tools ## go vet and staticcheck
	go vet ./...
	go vet -tags kind ./test/kind/...
	$(BIN)/staticcheck ./...

.PHONY: generate-tools
generate-tools: ## Install buf, protoc-gen-go and controller-gen into bin/ (only generate needs them)
	@test -x $(BIN)/buf && $(BIN)/buf --version | grep -qx '$(BUF_VERSION:v%=%)' || GOBIN=$(BIN) go install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
	@test -x $(BIN)/protoc-gen-go && $(BIN)/protoc-gen-go --version | grep -q '$(PROTOC_GEN_GO_VERSION)$$' || GOBIN=$(BIN) go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	@test -x $(BIN)/controller-gen && $(BIN)/controller-gen --version | grep -q '$(CONTROLLER_GEN_VERSION)$$' || GOBIN=$(BIN) go install sigs.k8s.io/controller-tools/cmd/controller-gen@$(CONTROLLER_GEN_VERSION)

.PHONY: generate
generate: generate-tools ## Regenerate checked-in generated files (federation API, echo's gRPC service, CRDs from the MCS and Istio modules)
	cd api && $(BIN)/buf lint && $(BIN)/buf generate
	cd test/echo && $(BIN)/buf lint && $(BIN)/buf generate
	$(BIN)/controller-gen object paths=./pkg/apis/... crd:crdVersions=v1 output:crd:dir=./deploy/crds
	cp "$$(go list -m -f '{{.Dir}}' sigs.k8s.io/mcs-api)"/config/crd/multicluster.x-k8s.io_service{exports,imports}.yaml deploy/crds/
	chmod 644 deploy/crds/*.yaml
	@$(MAKE) --no-print-directory istio-crds

.PHONY: istio-crds
istio-crds: ## Copy Istio's ServiceEntry, AuthorizationPolicy and PeerAuthentication CRDs from the istio.io/api module into test/install/istio (part of generate)
	@# Only for tests: the import writer's output must pass Istio's own
	@# ServiceEntry schema on a real API server, and the federator reads
	@# AuthorizationPolicies and PeerAuthentications as Istio's CRDs serve
	@# them. Not installed by deploy/: Istio's installation owns them in a
	@# real cluster.
	dir="$$(go list -m -f '{{.Dir}}' istio.io/api)"; version="$$(go list -m -f '{{.Version}}' istio.io/api)"; \
	for crd in ServiceEntry:networking.istio.io:serviceentries AuthorizationPolicy:security.istio.io:authorizationpolicies PeerAuthentication:security.istio.io:peerauthentications; do \
	  IFS=: read -r kind group plural <<< "$$crd"; \
	  out="test/install/istio/$${group}_$${plural}.yaml"; \
	  { echo "# Copied by 'make generate' from istio.io/api $$version"; \
	    echo "# kubernetes/customresourcedefinitions.gen.yaml: the $$kind CRD only."; \
	    awk -v name="  name: $$plural.$$group" \
	      '/^---$$/ { if (keep) printf "%s", doc; doc = ""; keep = 0; next } \
	       { doc = doc $$0 "\n" } \
	       $$0 == name { keep = 1 } \
	       END { if (keep) printf "%s", doc }' \
	      "$$dir"/kubernetes/customresourcedefinitions.gen.yaml; \
	  } > "$$out"; \
	  grep -qx "  name: $$plural.$$group" "$$out"; \
	done

.PHONY: verify
verify: generate lint ## Fail when generated files are stale or lint finds something
	git diff --exit-code -- deploy/crds api pkg/apis test/install/istio test/echo/echopb

.PHONY: e2e
e2e: tools kube-binaries ## Run only the end-to-end tests on the local multi-cluster harness
	ISTHMUS_KUBE_BIN_DIR="$$(hack/kube-binaries.sh)" $(GO_TEST) -v ./test/e2e/

.PHONY: e2e-kind
e2e-kind: ## Run the kind suite (needs docker, kind and kubectl; not run in CI)
	go test -tags kind -v -timeout 30m ./test/kind/

.PHONY: bench
bench: ## Run the Go benchmarks, then bench-federation, bench-propagation, bench-gateway and bench-sidecar
	go test -run '^$$' -bench . -benchmem ./...
	@$(MAKE) --no-print-directory bench-federation
	@$(MAKE) --no-print-directory bench-propagation
	@$(MAKE) --no-print-directory bench-gateway
	@$(MAKE) --no-print-directory bench-sidecar

.PHONY: bench-federation
bench-federation: build tools kube-binaries ## Federation on two local clusters: propagation p50/p99, initial sync and memory with 10,000 services (~15 min)
	ISTHMUS_KUBE_BIN_DIR="$$(hack/kube-binaries.sh)" go run ./test/bench/federation --bin-dir "$(BIN)" $(BENCH_FEDERATION_ARGS)

.PHONY: bench-propagation
bench-propagation: build tools kube-binaries ## Export → routable and unexport → refused through the real gateway: p50/p99/max vs 1 s, alone and beside 1,000 exports (~3 min)
	ISTHMUS_KUBE_BIN_DIR="$$(hack/kube-binaries.sh)" go run ./test/bench/propagation --bin-dir "$(BIN)" $(BENCH_PROPAGATION_ARGS)

.PHONY: demo
demo: build tools kube-binaries ## Three local clusters, linked with the CLI: b's client calls a's echo through sidecars and gateways (caller identity shown), then fails over to c and back; then tears down
	ISTHMUS_KUBE_BIN_DIR="$$(hack/kube-binaries.sh)" go run ./test/demo --bin-dir "$(BIN)" $(DEMO_ARGS)

.PHONY: bench-gateway
bench-gateway: build ## East-west gateway vs nginx stream ssl_preread vs direct: throughput, TLS handshakes/s, CPU, memory (~6 min)
	@# nginx's stream module is the peer; install it (Debian, as root) when
	@# missing. Without it the nginx column says why it is empty.
	@if ! [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || ! command -v nginx >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "bench-gateway: installing nginx and libnginx-mod-stream"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx libnginx-mod-stream >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx libnginx-mod-stream >/dev/null 2>&1; } || \
	    echo "bench-gateway: could not install nginx + libnginx-mod-stream; the nginx column will be empty"; \
	  else \
	    echo "bench-gateway: nginx + libnginx-mod-stream missing and not root (apt-get install nginx libnginx-mod-stream); the nginx column will be empty"; \
	  fi; \
	fi
	go run ./test/bench/gateway --bin-dir "$(BIN)" $(BENCH_GATEWAY_ARGS)

.PHONY: bench-sidecar
bench-sidecar: build ## Two sidecars (mTLS) vs two nginx vs direct, HTTP/1.1 and HTTP/2: added p50/p99 at a fixed rate, max req/s per proxy core, memory; HTTP/2 also vs nginx grpc_pass (root; ~11 min)
	@hack/install-bench-tools.sh "$(BIN)" "$(FORTIO_VERSION)"
	go run ./test/bench/sidecar --bin-dir "$(BIN)" $(BENCH_SIDECAR_ARGS)

.PHONY: clean
clean: ## Remove bin/ (the kube-apiserver cache stays)
	rm -rf $(BIN)
