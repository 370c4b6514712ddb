//! Logs and traces, set up the same way by both binaries.
//!
//! Logs go to stdout through `tracing`, filtered by `RUST_LOG` (default
//! `info`), as JSON when `FRESHET_LOG_FORMAT=json`; lines logged inside a
//! call or a commit carry its `trace_id` when tracing is on. Spans reach the
//! logs only when tracing is on or `RUST_LOG` is set: otherwise a span per
//! call would cost each call for nothing.
//!
//! Traces (spans at `FRESHET_TRACE_FILTER`, default `info`, whatever
//! `RUST_LOG` says) are exported with OTLP over gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and are off otherwise.
//! Everything else is the standard `OTEL_*` configuration: service name and
//! resource attributes, sampler, batch processor. The batch processor
//! exports from its own thread through a bounded queue
//! (`OTEL_BSP_MAX_QUEUE_SIZE`): when the collector is slow, spans are
//! dropped, never waited for, so tracing cannot stall a request or a commit.
//!
//! Trace context travels as W3C `traceparent`/`tracestate`, in Kafka record
//! headers and in gRPC metadata; [`extract`] reads it from either.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::{
    Context,
    propagation::{Extractor, TextMapPropagator},
    trace::TracerProvider as _,
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::Level;
use tracing_subscriber::{
    EnvFilter, Layer as _,
    filter::{LevelFilter, filter_fn},
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

/// Whether spans are exported (see [`exporting`]).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: trace context is worth extracting only then.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Flushes buffered spans when dropped (at the end of `main`).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs logging, and tracing export if configured, for `service`
/// (the default service name when `OTEL_SERVICE_NAME` is not set).
pub fn init(service: &'static str) -> Result<Telemetry, Box<dyn std::error::Error + Send + Sync>> {
    // Each layer has its own filter: quieting logs (RUST_LOG=warn) must not
    // silence the traces an operator asked for.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let endpoint = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"].iter().any(|v| std::env::var_os(v).is_some());
    EXPORTING.store(endpoint, Ordering::Relaxed);
    // Spans reach the logs only when traced or asked for: otherwise every
    // call would build one (fields formatted, registry slot taken) for no one.
    let spans_in_logs = endpoint || std::env::var_os("RUST_LOG").is_some_and(|v| !v.is_empty());
    let json = std::env::var("FRESHET_LOG_FORMAT").is_ok_and(|f| f == "json");
    let logs = if json { tracing_subscriber::fmt::layer().json().boxed() } else { tracing_subscriber::fmt::layer().boxed() };
    // One filter, not an `EnvFilter` combined with another: combined
    // (`and`), they silenced every log line of an ingest streaming from a
    // replication slot.
    let logs = match spans_in_logs {
        true => logs.with_filter(filter).boxed(),
        // RUST_LOG unset (so `info`) and nothing exported: events only.
        false => logs
            .with_filter(filter_fn(|meta| meta.is_event() && *meta.level() <= Level::INFO).with_max_level_hint(LevelFilter::INFO))
            .boxed(),
    };
    let provider = if endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service);
        }
        Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
    } else {
        None
    };
    let span_filter = std::env::var("FRESHET_TRACE_FILTER").unwrap_or_else(|_| "info".into());
    let subscriber = tracing_subscriber::registry().with(logs);
    // Not an absent (`None`) layer: it would enable every callsite its
    // neighbours filter out, and each call would build spans nobody reads.
    match &provider {
        Some(p) => subscriber
            .with(tracing_opentelemetry::layer().with_tracer(p.tracer(service)).with_filter(EnvFilter::new(span_filter)))
            .try_init()?,
        None => subscriber.try_init()?,
    }
    Ok(Telemetry { provider })
}

/// Puts the span's trace id in its `trace_id` field, so that every log line
/// inside it (JSON logs carry the current span's fields) names its trace.
pub fn record_trace_id(span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// Reads W3C trace context from `(name, value)` pairs: Kafka headers or
/// HTTP/2 (gRPC) headers.
pub fn extract<'a>(headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Context {
    let carrier = Carrier(
        headers.into_iter().filter(|(k, _)| k.eq_ignore_ascii_case("traceparent") || k.eq_ignore_ascii_case("tracestate")).collect(),
    );
    TraceContextPropagator::new().extract(&carrier)
}

struct Carrier<'a>(Vec<(&'a str, &'a [u8])>);

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| *k).collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn reads_traceparent_from_headers() {
        let headers = [("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".as_bytes()), ("other", b"x")];
        let cx = super::extract(headers);
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_valid() && sc.is_remote());
        assert_eq!(sc.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(!super::extract([("traceparent", b"garbage".as_slice())]).span().span_context().is_valid());
    }
}
