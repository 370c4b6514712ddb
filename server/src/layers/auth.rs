//! Bearer-token authentication: when tokens are configured, every call but
//! health checks must carry `authorization: Bearer <token>` with one of them,
//! or it is refused `UNAUTHENTICATED` before it costs anything else.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::Status;
use tower::{Layer, Service};

#[derive(Clone)]
pub struct AuthLayer {
    /// `None`: authentication is off.
    tokens: Option<Arc<HashSet<String>>>,
}

impl AuthLayer {
    pub fn new(tokens: Vec<String>) -> Self {
        Self { tokens: (!tokens.is_empty()).then(|| Arc::new(tokens.into_iter().collect())) }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Auth { inner, tokens: self.tokens.clone() }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<HashSet<String>>>,
}

impl<S, B, R> Service<http::Request<B>> for Auth<S>
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
        let allowed = match &self.tokens {
            None => true,
            Some(_) if super::exempt(request.uri().path()) => true,
            Some(tokens) => request
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|token| tokens.contains(token)),
        };
        if !allowed {
            return Box::pin(async { Ok(Status::unauthenticated("a valid bearer token is required").into_http()) });
        }
        Box::pin(self.inner.call(request))
    }
}
