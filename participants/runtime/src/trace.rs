//! W3C trace context (`traceparent`) and correlation ids, carried from the order API through the
//! outbox and Kafka headers to every service and back: one trace per saga, a span per command and
//! reply. Each service logs the trace id, the saga id and the correlation id of what it handles,
//! and, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
//! exports its spans over OTLP (HTTP, protobuf) with OpenTelemetry's SDK ([`Export`], [`span`]).

use axum::http::{HeaderMap, HeaderValue};

use crate::consumer::Record;

/// The W3C header, on HTTP requests and on Kafka messages.
pub const TRACEPARENT: &str = "traceparent";
/// The correlation id: `X-Correlation-ID` on HTTP (accepted, echoed), `x-correlation-id` on Kafka.
pub const CORRELATION_ID: &str = "x-correlation-id";
/// Longest correlation id taken from a caller; a longer or unprintable one is replaced.
pub const MAX_CORRELATION_ID: usize = 128;

/// A `traceparent`: trace id, parent span id and flags (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

/// `N` bytes from `2 N` lower-case hex digits (the recommendation refuses upper case).
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let bytes = uuid::Uuid::new_v4().into_bytes();
    out.copy_from_slice(&bytes[..N]);
    out
}

impl TraceParent {
    /// Parses a header value: `00-<32 hex>-<16 hex>-<2 hex>`, lower case, ids not all zero. A
    /// later version is read by its first four fields, as the W3C recommendation asks.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let mut parts = text.splitn(5, '-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        let rest = parts.next();
        if version.len() != 2 || version == "ff" || unhex::<1>(version).is_none() || (version == "00" && rest.is_some())
        {
            return None;
        }
        let trace_id = unhex::<16>(trace)?;
        let span_id = unhex::<8>(span)?;
        let flags = unhex::<1>(flags)?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self { trace_id, span_id, flags })
    }

    /// A new trace (sampled).
    pub fn root() -> Self {
        Self { trace_id: random(), span_id: random(), flags: 1 }
    }

    /// The trace of a saga that started without one: its id, as a trace id.
    pub fn of_saga(saga_id: uuid::Uuid) -> Self {
        let bytes = saga_id.into_bytes();
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&bytes[8..]);
        Self { trace_id: bytes, span_id, flags: 1 }
    }

    /// A span of this trace with a new id.
    pub fn child(&self) -> Self {
        Self { span_id: random(), ..*self }
    }

    /// A span of this trace whose id is taken from `id` (a message's id): the same message
    /// always has the same span.
    pub fn child_of_message(&self, id: uuid::Uuid) -> Self {
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&id.into_bytes()[8..]);
        if span_id == [0; 8] {
            return self.child();
        }
        Self { span_id, ..*self }
    }

    pub fn trace_id(&self) -> String {
        hex::encode(self.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex::encode(self.span_id)
    }

    /// The header value.
    pub fn header(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id(), self.span_id(), self.flags)
    }
}

/// A correlation id a caller sent, if usable: 1 to 128 printable ASCII characters.
pub fn correlation_id(text: &str) -> Option<String> {
    let text = text.trim();
    let usable =
        !text.is_empty() && text.len() <= MAX_CORRELATION_ID && text.bytes().all(|b| (0x21..=0x7e).contains(&b));
    usable.then(|| text.to_owned())
}

/// What travels with a saga: its trace and the correlation id of the request that began it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub parent: TraceParent,
    pub correlation_id: Option<String>,
    /// Whether `parent` came from the caller (else it is a new root no one recorded).
    pub from_caller: bool,
}

impl Context {
    /// From a request's or a message's `traceparent` and correlation id; a new trace when there
    /// is none or it is malformed.
    pub fn from_parts(traceparent: Option<&str>, correlation: Option<&str>) -> Self {
        let given = traceparent.and_then(TraceParent::parse);
        Self {
            from_caller: given.is_some(),
            parent: given.unwrap_or_else(TraceParent::root),
            correlation_id: correlation.and_then(correlation_id),
        }
    }

    /// From HTTP request headers.
    pub fn from_http(headers: &HeaderMap) -> Self {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Self::from_parts(get(TRACEPARENT), get(CORRELATION_ID))
    }

    /// From a consumed message's headers; for a message without a usable `traceparent`, the
    /// trace of `saga_id`.
    pub fn from_record(record: &Record, saga_id: Option<uuid::Uuid>) -> Self {
        let given = record.header(TRACEPARENT).and_then(TraceParent::parse);
        let parent = given.or_else(|| saga_id.map(TraceParent::of_saga)).unwrap_or_else(TraceParent::root);
        Self {
            parent,
            correlation_id: record.header(CORRELATION_ID).and_then(correlation_id),
            from_caller: given.is_some(),
        }
    }

    /// The Kafka headers of a message sent in this context, as the span `span`.
    pub fn headers(&self, span: TraceParent) -> Vec<(String, String)> {
        let mut headers = vec![(TRACEPARENT.to_owned(), span.header())];
        if let Some(id) = &self.correlation_id {
            headers.push((CORRELATION_ID.to_owned(), id.clone()));
        }
        headers
    }

    pub fn trace_id(&self) -> String {
        self.parent.trace_id()
    }

    /// The parent for a span of this context: `None` for a new root no one recorded.
    pub fn span_parent(&self) -> Option<&TraceParent> {
        self.from_caller.then_some(&self.parent)
    }

    /// For log fields: the correlation id, or "" when there is none.
    pub fn correlation(&self) -> &str {
        self.correlation_id.as_deref().unwrap_or("")
    }
}

/// HTTP middleware of every service: a request without a usable `X-Correlation-ID` gets a new
/// one, which handlers see in the request's headers, and every response carries the request's.
pub async fn correlate(mut request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let id = request
        .headers()
        .get(CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(correlation_id)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let value = HeaderValue::from_str(&id).expect("a correlation id is printable ASCII");
    request.headers_mut().insert(CORRELATION_ID, value.clone());
    let mut response = next.run(request).await;
    response.headers_mut().insert(CORRELATION_ID, value);
    response
}

/// Whether spans are exported: when not, [`span`] returns at once.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The OTLP export of this process's spans, when configured; shut it down to flush at exit.
pub struct Export(Option<opentelemetry_sdk::trace::SdkTracerProvider>);

impl Export {
    /// Sets up the export when an OTLP endpoint is configured (the standard `OTEL_EXPORTER_OTLP_*`
    /// and `OTEL_BSP_*` variables apply); otherwise spans are recorded nowhere, at no cost.
    pub fn from_env(service: &str) -> anyhow::Result<Self> {
        let configured = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
            .iter()
            .any(|name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty()));
        if !configured {
            return Ok(Self(None));
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| anyhow::anyhow!("cannot export traces over OTLP: {e}"))?;
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_owned()).build();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(service, "exporting traces over OTLP");
        Ok(Self(Some(provider)))
    }

    /// Sends what is left (at most 5 s). On a blocking thread: the exporter's client blocks.
    pub async fn shutdown(self) {
        if let Some(provider) = self.0 {
            let stopped =
                tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(std::time::Duration::from_secs(5)));
            if let Ok(Err(error)) = stopped.await {
                tracing::warn!(%error, "the trace export did not flush");
            }
        }
    }
}

/// A span's name and attributes, made only when spans are exported.
pub type Describe = (std::borrow::Cow<'static, str>, Vec<opentelemetry::KeyValue>);

/// Records a finished span (begun at `start`, ended now) as a child of `parent` (a caller's or
/// another service's span), or as a new trace's root when there is none, named and described by
/// `describe`; returns its `traceparent`, to send on with what it caused. Without an export,
/// nothing is made or recorded and `fallback` is returned.
pub fn span(
    parent: Option<&TraceParent>,
    kind: opentelemetry::trace::SpanKind,
    start: std::time::SystemTime,
    fallback: TraceParent,
    describe: impl FnOnce() -> Describe,
) -> TraceParent {
    use opentelemetry::trace::{
        Span as _, SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, Tracer as _,
    };
    if !EXPORTING.load(std::sync::atomic::Ordering::Relaxed) {
        return fallback;
    }
    let (name, attributes) = describe();
    let tracer = opentelemetry::global::tracer("saga-orchestrator");
    let context = match parent {
        Some(p) => opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(p.trace_id),
            SpanId::from_bytes(p.span_id),
            TraceFlags::new(p.flags),
            true,
            TraceState::default(),
        )),
        None => opentelemetry::Context::new(),
    };
    let mut span = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(&tracer, &context);
    let recorded = span.span_context().clone();
    span.end();
    if !recorded.is_valid() {
        return fallback;
    }
    TraceParent {
        trace_id: recorded.trace_id().to_bytes(),
        span_id: recorded.span_id().to_bytes(),
        flags: parent.map_or(1, |p| p.flags),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_refuses_what_the_recommendation_refuses() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(text).unwrap();
        assert_eq!(parsed.header(), text);
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version keeps its first four fields.
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever").is_some());
    }

    #[test]
    fn a_child_keeps_the_trace_and_a_message_keeps_its_span() {
        let root = TraceParent::root();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        let message = uuid::Uuid::new_v4();
        assert_eq!(root.child_of_message(message), root.child_of_message(message));
        let saga = uuid::Uuid::now_v7();
        assert_eq!(TraceParent::of_saga(saga).trace_id(), saga.simple().to_string());
    }

    #[test]
    fn only_printable_correlation_ids_up_to_128_characters_are_taken() {
        assert_eq!(correlation_id(" req-42 ").as_deref(), Some("req-42"));
        assert_eq!(correlation_id(&"x".repeat(128)).map(|s| s.len()), Some(128));
        for bad in ["", "a b", "é", "a\u{0}", &"x".repeat(129)] {
            assert_eq!(correlation_id(bad), None, "{bad:?}");
        }
    }
}
