# The sidecar image: `sidecar iptables` (the pod's capture step) and
# `sidecar run` (the proxy), as deploy/examples/meshed-pod.yaml runs them.
# The build context is the repository root:
#
#   docker build -f build/sidecar.Dockerfile -t isthmus.local/sidecar:dev .
#
# Unlike the other images it is not distroless: the capture step runs
# iptables-restore, so the image carries Debian's iptables (nft by default,
# legacy with --backend legacy) and nothing else beyond the base.

FROM golang:1.26 AS build
WORKDIR /src
# Modules first, as in the other Dockerfiles in build/, so they share the
# layer.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/isthmus-mesh/isthmus/pkg/version.Version=${VERSION}" \
      -o /out/sidecar ./cmd/sidecar

FROM debian:12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/sidecar /usr/local/bin/sidecar
# The proxy's user, by number (the kubelet enforces runAsNonRoot only for
# a numeric user): the uid the capture spares. The capture step overrides
# it with runAsUser: 0.
USER 1337:1337
# 15001 outbound, 15006 inbound, 15020 health and metrics, 15053 DNS
# (127.0.0.1 only), 15000 admin (127.0.0.1 only).
EXPOSE 15001 15006 15020
ENTRYPOINT ["/usr/local/bin/sidecar"]
