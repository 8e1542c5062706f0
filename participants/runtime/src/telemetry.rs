//! Logs (JSON or text, through `tracing`), the Prometheus metrics endpoint and the heap profile.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;
use tracing_subscriber::EnvFilter;

use crate::config::TelemetryConfig;

/// Installs the global log subscriber. `RUST_LOG`, when set, wins over `LOG_LEVEL`.
pub fn init_logs(config: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true);
    let result = if config.log_format == "json" {
        builder.json().flatten_event(true).with_current_span(true).try_init()
    } else {
        builder.try_init()
    };
    if let Err(error) = result {
        eprintln!("logging was already initialised: {error}");
    }
}

/// Serves Prometheus metrics on `addr` (path-agnostic; scrape `/metrics`).
pub fn serve_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(crate::outbox::DWELL_SECONDS.to_owned()),
            crate::outbox::DWELL_BUCKETS,
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(crate::consumer::DELIVERY_SECONDS.to_owned()),
            crate::outbox::DWELL_BUCKETS,
        )?
        .install()
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    crate::outbox::describe_metrics();
    crate::consumer::describe_metrics();
    crate::supervisor::describe_metrics();
    crate::failures::describe_metrics();
    crate::retention::describe_metrics();
    Ok(())
}

/// Binds the heap profile's listener (`None`: not served). At start-up, so that a port in use
/// stops the service at once.
pub async fn bind_profiles(addr: Option<SocketAddr>) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve the heap profile on {addr} (PROFILE_ADDR): {e}"))?;
    tracing::info!(%addr, "heap profile at /debug/pprof/heap");
    Ok(Some(listener))
}

/// Serves `GET /debug/pprof/heap` on `listener` until `shutdown`: jemalloc's heap profile in
/// pprof's format (gzipped protobuf), for `go tool pprof` or `pprof`.
pub async fn serve_profiles(listener: tokio::net::TcpListener, shutdown: tokio_util::sync::CancellationToken) {
    let router = axum::Router::new().route("/debug/pprof/heap", axum::routing::get(heap_profile));
    if let Err(error) = axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::error!(%error, "the heap profile endpoint stopped");
    }
}

async fn heap_profile() -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "jemalloc's profiler is off (MALLOC_CONF has prof:false)\n")
            .into_response();
    };
    let mut ctl = ctl.lock().await;
    if !ctl.activated() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "jemalloc's profiler is inactive (MALLOC_CONF has prof_active:false)\n",
        )
            .into_response();
    }
    // Writes a temporary file and reads the process's mappings.
    match tokio::task::block_in_place(|| ctl.dump_pprof()) {
        Ok(profile) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (header::CONTENT_DISPOSITION, "attachment; filename=\"heap.pb.gz\""),
            ],
            profile,
        )
            .into_response(),
        Err(error) => {
            tracing::warn!(error = format!("{error:#}"), "cannot dump the heap profile");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot dump the heap profile: {error}\n")).into_response()
        }
    }
}
