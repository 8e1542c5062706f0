//! One order followed through every service by its W3C trace id and its correlation id: the
//! order API takes both from the request (and echoes the correlation id), the start request, the
//! commands, the replies and the lifecycle events carry them as Kafka headers, and each service's
//! JSON log lines about that saga carry `trace_id`, `saga_id` and `correlation_id`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context};
use saga_e2e::{order_body, Options, System, SERVICES};
use serde_json::Value;

#[tokio::test]
async fn one_orders_trace_id_and_correlation_id_are_in_the_logs_of_every_service() -> anyhow::Result<()> {
    let mut options = Options::default();
    for service in SERVICES {
        options = options.env(service, "LOG_FORMAT", "json").env(
            service,
            "LOG_LEVEL",
            "info,saga_runtime=debug,saga_orchestrator=debug,saga_notification=debug",
        );
    }
    let system = System::start_with(options).await?;
    system.set_stock("TRACE-A", 10).await?;
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let correlation = format!("corr-{}", uuid::Uuid::new_v4().simple());
    let response = system
        .http
        .post(system.url("order", "/api/v1/orders"))
        .header("Idempotency-Key", "trace-1")
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .header("X-Correlation-ID", &correlation)
        .json(&order_body("TRACE-A", 1, "tok_visa", "12345"))
        .send()
        .await?;
    ensure!(response.status() == 201, "order: {}", response.status());
    assert_eq!(response.headers()["x-correlation-id"].to_str()?, correlation, "the correlation id is echoed");
    let order: Value = response.json().await?;
    let saga_id = order["saga_id"].as_str().context("saga id")?.to_owned();
    let saga = system.wait_terminal(&saga_id, Duration::from_secs(60)).await?;
    assert_eq!(saga["status"], "COMPLETED");
    assert_eq!(saga["trace_id"], trace_id.as_str(), "the saga API shows its trace id");
    assert_eq!(saga["correlation_id"], correlation.as_str());

    // The orchestrator's commands carry the trace (a span per command) and the correlation id.
    let commands = system.read_topic("payment-commands").await?;
    let command = commands.iter().find(|m| m.key.as_deref() == Some(saga_id.as_str())).context("payment command")?;
    let header = |name: &str| command.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let traceparent = header("traceparent").context("traceparent on the command")?;
    assert!(traceparent.starts_with(&format!("00-{trace_id}-")), "{traceparent}");
    assert_eq!(header("x-correlation-id").as_deref(), Some(correlation.as_str()));

    // The notification comes last: once it is there, every service has logged.
    let mut missing: BTreeSet<&str> = SERVICES.into_iter().collect();
    let started = std::time::Instant::now();
    while !missing.is_empty() && started.elapsed() < Duration::from_secs(30) {
        missing.retain(|service| {
            let log = std::fs::read_to_string(system.log_path(service)).unwrap_or_default();
            !log.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).any(|line| {
                line["trace_id"] == trace_id.as_str()
                    && line["correlation_id"] == correlation.as_str()
                    && line["saga_id"] == saga_id.as_str()
            })
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(missing.is_empty(), "no JSON log line with the trace id, saga id and correlation id in {missing:?}");
    system.stop().await
}

#[tokio::test]
async fn a_request_without_a_correlation_id_gets_one_and_a_bad_one_is_replaced() -> anyhow::Result<()> {
    let system = System::start().await?;
    for service in SERVICES {
        let response = system.http.get(system.url(service, "/health")).send().await?;
        let id = response.headers().get("x-correlation-id").context("a correlation id")?.to_str()?.to_owned();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{service}: {id}");
        let response =
            system.http.get(system.url(service, "/health")).header("X-Correlation-ID", "x".repeat(129)).send().await?;
        let id = response.headers()["x-correlation-id"].to_str()?;
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{service}: a 129-character id is replaced: {id}");
    }
    system.stop().await
}

/// Bodies posted to a minimal OTLP/HTTP receiver: (path, body).
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// Answers every request with 200 and keeps what was posted (HTTP/1.1, keep-alive, bodies with
/// a Content-Length, as OpenTelemetry's HTTP exporter sends them).
async fn otlp_receiver() -> anyhow::Result<(u16, Received)> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let received = Received::default();
    let keep = received.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let keep = keep.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut request_line = String::new();
                    if stream.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let path = request_line.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0u8; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    keep.lock().unwrap().push((path, body));
                    let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if stream.get_mut().write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((port, received))
}

/// With `OTEL_EXPORTER_OTLP_ENDPOINT` set, every service exports its spans of one order's saga
/// over OTLP, all in the trace the caller's `traceparent` began.
#[tokio::test]
async fn with_an_otlp_endpoint_every_service_exports_its_spans_of_the_sagas_trace() -> anyhow::Result<()> {
    let (port, received) = otlp_receiver().await?;
    let mut options = Options::default();
    for service in SERVICES {
        options = options.env(service, "OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{port}")).env(
            service,
            "OTEL_BSP_SCHEDULE_DELAY",
            "200",
        );
    }
    let system = System::start_with(options).await?;
    system.set_stock("OTLP-A", 10).await?;
    let trace_id = uuid::Uuid::new_v4();
    let response = system
        .http
        .post(system.url("order", "/api/v1/orders"))
        .header("Idempotency-Key", "otlp-1")
        .header("traceparent", format!("00-{}-00f067aa0ba902b7-01", trace_id.simple()))
        .json(&order_body("OTLP-A", 1, "tok_visa", "12345"))
        .send()
        .await?;
    ensure!(response.status() == 201, "order: {}", response.status());
    let order: Value = response.json().await?;
    let saga_id = order["saga_id"].as_str().context("saga id")?.to_owned();
    system.wait_terminal(&saga_id, Duration::from_secs(60)).await?;

    let names = [
        "saga-orchestrator",
        "order-service",
        "inventory-service",
        "payment-service",
        "fulfilment-service",
        "notification-service",
    ];
    let contains = |body: &[u8], needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    let started = std::time::Instant::now();
    let mut missing: Vec<&str> = names.to_vec();
    while !missing.is_empty() && started.elapsed() < Duration::from_secs(30) {
        let bodies = received.lock().unwrap().clone();
        missing.retain(|name| {
            !bodies.iter().any(|(path, body)| {
                path == "/v1/traces" && contains(body, trace_id.as_bytes()) && contains(body, name.as_bytes())
            })
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(missing.is_empty(), "no span of the trace exported by {missing:?}");
    system.stop().await
}
