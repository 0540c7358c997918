# The east-west gateway image. The build context is the repository root:
#
#   docker build -f build/eastwest-gw.Dockerfile -t isthmus.local/eastwest-gw:dev .
#
# Nothing here needs BuildKit-only features, so the classic builder works too.
# golang:1.26 sets GOTOOLCHAIN=local: if the build says go.mod requires a
# newer Go, `docker pull golang:1.26` refreshes a stale local copy.

FROM golang:1.26 AS build
WORKDIR /src
# Modules first: this layer stays cached until go.mod or go.sum change, and
# the other Dockerfiles in build/ start with the same steps, so they share it.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/isthmus-mesh/isthmus/pkg/version.Version=${VERSION}" \
      -o /out/eastwest-gw ./cmd/eastwest-gw

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/eastwest-gw /eastwest-gw
# The distroless "nonroot" user, by number: the kubelet enforces
# runAsNonRoot only for a numeric image user.
USER 65532:65532
# 15443: peers' TLS (SNI passthrough); 15021: /healthz/ready for peers'
# probes and the kubelet; 15020: /metrics.
EXPOSE 15443 15021 15020
ENTRYPOINT ["/eastwest-gw"]
