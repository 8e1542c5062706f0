# syntax=docker/dockerfile:1
# One image with every service binary and sagactl; each Deployment chooses its command (k8s/).
#   docker build -t microservices-saga/saga-orchestrator:v0.1.0 .
# The dependencies are compiled in a layer of their own (cargo-chef), rebuilt only when
# Cargo.toml or Cargo.lock change. Pin the base images by digest where the image is built, e.g.
# FROM rust:1.95.0-bookworm@sha256:... (`docker buildx imagetools inspect rust:1.95.0-bookworm`).
# The on-call web page (ADR 26), built from its lockfile; the orchestrator embeds it.
FROM node:20.19.5-bookworm-slim AS ui
WORKDIR /ui
COPY orchestrator/ui/package.json orchestrator/ui/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY orchestrator/ui/ ./
RUN npm run build -- --outDir /ui-dist

FROM rust:1.95.0-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
# librdkafka is built from source by rdkafka's cmake build.
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
COPY --from=planner /src/recipe.json recipe.json
# The recipe has the workspace members' manifests only; the patched rdkafka (ADR 30) is a
# dependency outside the workspace, so its sources come in before the dependencies are cooked.
COPY vendor/ vendor/
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
COPY --from=ui /ui-dist /ui-dist
ENV SAGA_UI_DIST=/ui-dist
RUN cargo build --release --locked --workspace --bins

# librdkafka links the system OpenSSL (ADR 13): libssl3 at run time. curl is for the runbook's
# `kubectl exec ... -- curl localhost:...` (metrics, the heap profile).
FROM debian:12.12-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 saga && useradd --system --uid 10001 --gid 10001 --no-create-home saga
COPY --from=build /src/target/release/saga-orchestrator /src/target/release/sagactl \
     /src/target/release/saga-participant-order /src/target/release/saga-participant-inventory \
     /src/target/release/saga-participant-payment /src/target/release/saga-participant-fulfilment \
     /src/target/release/saga-notification /usr/local/bin/
# Numeric, so that Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
ENV LOG_FORMAT=json
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/saga-orchestrator"]
