//! Request metrics: calls by method and gRPC status, their latency, and how
//! many are in flight. Outermost, so shed, refused and timed-out calls are
//! counted too.
//!
//! A call is accounted for by a guard that lives as long as the call's
//! future, so every way a call can end is counted once: answered, failed, or
//! dropped because its client cancelled or went away (counted `CANCELLED`,
//! code 1, and no longer in flight). Methods are labelled by name only for
//! the methods this server serves; any other path is `unknown`.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use tonic::Code;
use tower::{Layer, Service};

use crate::metrics::{Method, ServerMetrics};

#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<ServerMetrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<ServerMetrics>) -> Self {
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
    metrics: Arc<ServerMetrics>,
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
        let method = self.metrics.method(super::known_method(request.uri().path()).map(|(_, method)| method));
        let mut call = Call::start(self.metrics.clone(), method);
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            // Errors are trailers-only responses, with grpc-status in the headers.
            call.answered(match &result {
                Ok(response) => response.headers().get("grpc-status").map_or(Code::Ok, |v| Code::from_bytes(v.as_bytes())),
                Err(_) => Code::Unknown,
            });
            result
        })
    }
}

/// One call, in flight until dropped; counted with its code then, or as
/// `CANCELLED` if it never got one.
struct Call {
    metrics: Arc<ServerMetrics>,
    method: Method,
    started: Instant,
    code: Option<Code>,
}

impl Call {
    fn start(metrics: Arc<ServerMetrics>, method: Method) -> Call {
        metrics.in_flight.inc();
        Call { metrics, method, started: Instant::now(), code: None }
    }

    /// Takes `&mut self`, so that the call's future owns the whole guard.
    fn answered(&mut self, code: Code) {
        self.code = Some(code);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        self.metrics.call_ended(self.method, self.code.unwrap_or(Code::Cancelled), self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::metrics::testing::{registered, render};

    fn count(registry: &Registry, series: &str) -> Option<f64> {
        render(registry).lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    const IN_FLIGHT: &str = "freshet_server_in_flight_calls";

    #[tokio::test]
    async fn a_dropped_call_leaves_flight_and_is_counted_cancelled() {
        let (registry, metrics) = registered();
        let never =
            tower::service_fn(|_: http::Request<()>| std::future::pending::<Result<http::Response<()>, std::convert::Infallible>>());
        let mut service = MetricsLayer::new(metrics).layer(never);
        let request = || http::Request::builder().uri("/freshet.v1.FeatureService/GetFeatures").body(()).unwrap();
        let calls: Vec<_> = (0..3).map(|_| service.call(request())).collect();
        assert_eq!(count(&registry, IN_FLIGHT), Some(3.0));
        // The client goes away: hyper drops the call's future.
        let first = tokio::time::timeout(Duration::from_millis(1), service.call(request())).await;
        assert!(first.is_err());
        drop(calls);
        assert_eq!(count(&registry, IN_FLIGHT), Some(0.0));
        assert_eq!(count(&registry, "freshet_server_calls_total{method=\"GetFeatures\",code=\"1\"}"), Some(4.0));
    }

    #[tokio::test]
    async fn unknown_paths_share_one_label() {
        let (registry, metrics) = registered();
        let answer = tower::service_fn(|_: http::Request<()>| async { Ok::<_, std::convert::Infallible>(http::Response::new(())) });
        let mut service = MetricsLayer::new(metrics).layer(answer);
        let series = || {
            render(&registry)
                .lines()
                .map(|l| l.rsplit_once(' ').map_or(l, |(k, _)| k).to_string())
                .collect::<std::collections::BTreeSet<_>>()
        };
        let before = series();
        for i in 0..100 {
            let request = http::Request::builder().uri(format!("/random{i}.Service/Method{i}")).body(()).unwrap();
            service.call(request).await.unwrap();
        }
        assert_eq!(count(&registry, "freshet_server_calls_total{method=\"unknown\",code=\"0\"}"), Some(100.0));
        assert_eq!(series(), before, "no series added by 100 distinct paths");
    }
}
