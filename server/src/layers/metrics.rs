//! Request metrics: calls by method and gRPC status, their latency, and how
//! many are in flight. Outermost, so shed, refused and timed-out calls are
//! counted too.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use freshet_store::metrics::Metrics;
use tower::{Layer, Service};

#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Measured<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Measured { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct Measured<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> Service<http::Request<B>> for Measured<S>
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
        let method = request.uri().path().rsplit('/').next().unwrap_or_default().to_string();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        metrics.add("freshet_server_in_flight_calls", "Calls being handled now.", &[], 1.0);
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            // Errors are trailers-only responses, with grpc-status in the headers.
            let code = match &result {
                Ok(response) => response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0").to_string(),
                Err(_) => "2".to_string(),
            };
            metrics.add("freshet_server_in_flight_calls", "Calls being handled now.", &[], -1.0);
            metrics.add(
                "freshet_server_calls_total",
                "Calls by method and gRPC status code.",
                &[("method", &method), ("code", &code)],
                1.0,
            );
            metrics.observe(
                "freshet_server_call_duration_seconds",
                "Call latency by method.",
                &[("method", &method)],
                started.elapsed().as_secs_f64(),
            );
            result
        })
    }
}
