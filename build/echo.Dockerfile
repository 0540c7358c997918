# The echo workload that the tests and the demo run (test/echo). The build
# context is the repository root:
#
#   docker build -f build/echo.Dockerfile -t isthmus.local/echo:dev .
#
# echo listens on $POD_IP:8080 and reports $POD_NAME, $POD_NAMESPACE and
# $CLUSTER_NAME: set them from the downward API in the pod spec.

FROM golang:1.26 AS build
WORKDIR /src
# The same first steps as build/federator.Dockerfile, so the module layer
# is shared between the two images.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /out/echo ./test/echo

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/echo /echo
# The distroless "nonroot" user, by number, so runAsNonRoot can be verified.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/echo"]
