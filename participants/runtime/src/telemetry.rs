//! Logs (JSON or text, through `tracing`) and the Prometheus metrics endpoint.

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
        .install()
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    crate::outbox::describe_metrics();
    crate::consumer::describe_metrics();
    crate::supervisor::describe_metrics();
    crate::retention::describe_metrics();
    Ok(())
}
