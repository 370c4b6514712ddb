//! Load shedding: a fixed number of calls may be in flight; the next one is
//! answered `RESOURCE_EXHAUSTED` immediately, without queueing, so that under
//! overload admitted calls keep their latency and refused ones learn at once
//! that they should back off or go elsewhere.
//!
//! tower does the work: a `ConcurrencyLimit` whose permits all connections
//! share (`GlobalConcurrencyLimitLayer`), behind a `LoadShed` that refuses a
//! call rather than wait for a permit. Added here: health checks are routed
//! around both, and a refusal becomes the gRPC status and the shed count
//! right here, inside the metrics layer, which then counts it by its code
//! (tonic would turn tower's `Overloaded` error into a status only outside
//! every layer).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use prometheus_client::metrics::counter::Counter;
use tonic::Status;
use tower::{
    BoxError, Layer, Service, ServiceExt,
    limit::{ConcurrencyLimit, GlobalConcurrencyLimitLayer},
    load_shed::{LoadShed, error::Overloaded},
};

#[derive(Clone)]
pub struct ShedLayer {
    limit: GlobalConcurrencyLimitLayer,
    shed: Counter,
}

impl ShedLayer {
    /// At most `max_in_flight` calls; `shed` counts the ones refused.
    pub fn new(max_in_flight: usize, shed: Counter) -> Self {
        Self { limit: GlobalConcurrencyLimitLayer::new(max_in_flight), shed }
    }
}

impl<S: Clone> Layer<S> for ShedLayer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Shed { limited: LoadShed::new(self.limit.layer(inner.clone())), exempt: inner, shed: self.shed.clone() }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    /// For health checks.
    exempt: S,
    limited: LoadShed<ConcurrencyLimit<S>>,
    shed: Counter,
}

impl<S, B, R> Service<http::Request<B>> for Shed<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.exempt.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if super::exempt(request.uri().path()) {
            return Box::pin(self.exempt.call(request));
        }
        // A clone of its own, made ready (a permit, or the verdict
        // "overloaded") just for this call: readiness checked in
        // `poll_ready` would take a permit for health checks too.
        let call = self.limited.clone().oneshot(request);
        let shed = self.shed.clone();
        Box::pin(async move {
            Ok(match call.await {
                Ok(response) => response,
                Err(e) if e.is::<Overloaded>() => {
                    shed.inc();
                    Status::resource_exhausted("server is at its concurrency limit; retry with backoff").into_http()
                }
                Err(e) => Status::from_error(e).into_http(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    fn code(response: &http::Response<tonic::body::Body>) -> Option<&str> {
        response.headers().get("grpc-status").map(|v| v.to_str().unwrap())
    }

    /// Two slots, held by calls waiting for a word: the third call is refused
    /// at once, and counted; health still answers; freed slots admit again.
    #[tokio::test]
    async fn refuses_past_the_limit_at_once_counts_it_and_spares_health() {
        let (release, released) = tokio::sync::watch::channel(false);
        let (entered, mut inside) = tokio::sync::mpsc::unbounded_channel();
        let inner = tower::service_fn(move |request: http::Request<()>| {
            let (mut released, entered) = (released.clone(), entered.clone());
            async move {
                if !request.uri().path().starts_with("/grpc.health.") {
                    entered.send(()).unwrap();
                    released.wait_for(|r| *r).await.unwrap();
                }
                Ok::<_, Infallible>(http::Response::new(tonic::body::Body::empty()))
            }
        });
        let shed = Counter::default();
        let service = ShedLayer::new(2, shed.clone()).layer(inner);
        let get = || request("/freshet.v1.FeatureService/GetFeatures");
        let held: Vec<_> = (0..2).map(|_| tokio::spawn(service.clone().oneshot(get()))).collect();
        inside.recv().await.unwrap();
        inside.recv().await.unwrap();
        let refused = service.clone().oneshot(get()).await.unwrap();
        assert_eq!(code(&refused), Some("8"), "RESOURCE_EXHAUSTED");
        assert_eq!(shed.get(), 1);
        let health = service.clone().oneshot(request("/grpc.health.v1.Health/Check")).await.unwrap();
        assert_eq!(code(&health), None, "answered, not refused");
        release.send(true).unwrap();
        for call in held {
            assert_eq!(code(&call.await.unwrap().unwrap()), None);
        }
        assert_eq!(code(&service.oneshot(get()).await.unwrap()), None, "the slots are free again");
        assert_eq!(shed.get(), 1);
    }
}
