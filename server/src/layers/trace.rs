//! A server span per call (OpenTelemetry RPC conventions), continuing the
//! caller's trace from the `traceparent` in its gRPC metadata. The handler's
//! own spans (validation, Redis, Postgres) are its children.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

#[derive(Clone, Default)]
pub struct TraceLayer;

impl<S> Layer<S> for TraceLayer {
    type Service = Traced<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Traced { inner }
    }
}

#[derive(Clone)]
pub struct Traced<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for Traced<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Never the raw path: a client could make a span name of anything.
        let (service, method) = super::known_method(request.uri().path()).unwrap_or(("unknown", "unknown"));
        let span = tracing::info_span!(
            "grpc",
            otel.name = %format_args!("{service}/{method}"),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        // Without an exporter, nobody would see the caller's trace.
        if freshet_store::telemetry::exporting() {
            let parent = freshet_store::telemetry::extract(request.headers().iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
            let _ = span.set_parent(parent);
            freshet_store::telemetry::record_trace_id(&span);
        }
        let call = self.inner.call(request);
        let recorder = span.clone();
        Box::pin(
            async move {
                let result = call.await;
                if let Ok(response) = &result {
                    // Errors are trailers-only responses, with grpc-status in the headers.
                    let code = response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i64>().ok())
                        .unwrap_or(0);
                    recorder.record("rpc.grpc.status_code", code);
                }
                result
            }
            .instrument(span),
        )
    }
}
