# The federator image. The build context is the repository root:
#
#   docker build -f build/federator.Dockerfile -t isthmus.local/federator:dev .
#
# Nothing here needs BuildKit-only features, so the classic builder works too.
# golang:1.26 sets GOTOOLCHAIN=local: if the build says go.mod requires a
# newer Go, `docker pull golang:1.26` refreshes a stale local copy.

FROM golang:1.26 AS build
WORKDIR /src
# Modules first: this layer stays cached until go.mod or go.sum change, and
# build/echo.Dockerfile starts with the same steps, so the two share it.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/isthmus-mesh/isthmus/pkg/version.Version=${VERSION}" \
      -o /out/federator ./cmd/federator

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/federator /federator
# The distroless "nonroot" user, by number: the kubelet enforces
# runAsNonRoot (deploy/multicluster sets it) only for a numeric image user
# and refuses to start a container whose image names the user.
USER 65532:65532
# Monitoring: /healthz, /readyz, /metrics, /debug/catalog.
EXPOSE 15014
ENTRYPOINT ["/federator"]
