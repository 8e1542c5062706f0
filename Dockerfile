# One image with every service binary; each Deployment chooses its command.
# Build: docker build -t microservices-saga/saga-orchestrator:v0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked --workspace --bins

# librdkafka links the system OpenSSL (ADR 13): libssl3 at run time.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl libssl3 && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 saga
COPY --from=build /src/target/release/saga-orchestrator /src/target/release/saga-participant-* /usr/local/bin/
USER saga
ENV LOG_FORMAT=json
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/saga-orchestrator"]
