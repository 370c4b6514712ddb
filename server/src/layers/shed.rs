//! Load shedding: a fixed number of calls may be in flight; the next one is
//! answered `RESOURCE_EXHAUSTED` immediately, without queueing, so that under
//! overload admitted calls keep their latency and refused ones learn at once
//! that they should back off or go elsewhere.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;
use tonic::Status;
use tower::{Layer, Service};

#[derive(Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    shed: Counter,
}

impl ShedLayer {
    pub fn new(max_in_flight: usize, shed: Counter) -> Self {
        Self { permits: Arc::new(Semaphore::new(max_in_flight)), shed }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Shed { inner, permits: self.permits.clone(), shed: self.shed.clone() }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    shed: Counter,
}

impl<S, B, R> Service<http::Request<B>> for Shed<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if super::exempt(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.shed.inc();
            return Box::pin(async {
                Ok(Status::resource_exhausted("server is at its concurrency limit; retry with backoff").into_http())
            });
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await;
            drop(permit);
            response
        })
    }
}
