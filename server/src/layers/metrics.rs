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

use freshet_store::metrics::Metrics;
use tower::{Layer, Service};

const IN_FLIGHT: &str = "freshet_server_in_flight_calls";
const IN_FLIGHT_HELP: &str = "Calls being handled now.";

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
        let method = super::known_method(request.uri().path()).map_or("unknown", |(_, method)| method);
        let mut call = Call::start(self.metrics.clone(), method);
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            // Errors are trailers-only responses, with grpc-status in the headers.
            call.answered(match &result {
                Ok(response) => response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0").to_string(),
                Err(_) => "2".to_string(),
            });
            result
        })
    }
}

/// One call, in flight until dropped; counted with its code then, or as
/// `CANCELLED` if it never got one.
struct Call {
    metrics: Arc<Metrics>,
    method: &'static str,
    started: Instant,
    code: Option<String>,
}

impl Call {
    fn start(metrics: Arc<Metrics>, method: &'static str) -> Call {
        metrics.adjust(IN_FLIGHT, IN_FLIGHT_HELP, &[], 1.0);
        Call { metrics, method, started: Instant::now(), code: None }
    }

    fn answered(&mut self, code: String) {
        self.code = Some(code);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let code = self.code.as_deref().unwrap_or("1");
        self.metrics.adjust(IN_FLIGHT, IN_FLIGHT_HELP, &[], -1.0);
        self.metrics.add(
            "freshet_server_calls_total",
            "Calls by method and gRPC status code.",
            &[("method", self.method), ("code", code)],
            1.0,
        );
        self.metrics.observe(
            "freshet_server_call_duration_seconds",
            "Call latency by method.",
            &[("method", self.method)],
            self.started.elapsed().as_secs_f64(),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn count(metrics: &Metrics, series: &str) -> Option<f64> {
        metrics.render().lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test]
    async fn a_dropped_call_leaves_flight_and_is_counted_cancelled() {
        let metrics = Arc::new(Metrics::default());
        let never =
            tower::service_fn(|_: http::Request<()>| std::future::pending::<Result<http::Response<()>, std::convert::Infallible>>());
        let mut service = MetricsLayer::new(metrics.clone()).layer(never);
        let request = || http::Request::builder().uri("/freshet.v1.FeatureService/GetFeatures").body(()).unwrap();
        let calls: Vec<_> = (0..3).map(|_| service.call(request())).collect();
        assert_eq!(count(&metrics, IN_FLIGHT), Some(3.0));
        assert!(metrics.render().contains(&format!("# TYPE {IN_FLIGHT} gauge")));
        // The client goes away: hyper drops the call's future.
        let first = tokio::time::timeout(Duration::from_millis(1), service.call(request())).await;
        assert!(first.is_err());
        drop(calls);
        assert_eq!(count(&metrics, IN_FLIGHT), Some(0.0));
        assert_eq!(count(&metrics, "freshet_server_calls_total{method=\"GetFeatures\",code=\"1\"}"), Some(4.0));
    }

    #[tokio::test]
    async fn unknown_paths_share_one_label() {
        let metrics = Arc::new(Metrics::default());
        let answer = tower::service_fn(|_: http::Request<()>| async { Ok::<_, std::convert::Infallible>(http::Response::new(())) });
        let mut service = MetricsLayer::new(metrics.clone()).layer(answer);
        for i in 0..100 {
            let request = http::Request::builder().uri(format!("/random{i}.Service/Method{i}")).body(()).unwrap();
            service.call(request).await.unwrap();
        }
        assert_eq!(count(&metrics, "freshet_server_calls_total{method=\"unknown\",code=\"0\"}"), Some(100.0));
        assert_eq!(metrics.render().lines().filter(|l| l.starts_with("freshet_server_calls_total")).count(), 1);
    }
}
