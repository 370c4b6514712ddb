//! Deadlines: a call may take as long as its `grpc-timeout` header allows,
//! and never longer than the server's default. When time runs out the
//! handler is dropped and the caller gets `DEADLINE_EXCEEDED` (tonic's own
//! timeout would say `CANCELLED`, which clients do not treat as a deadline).
//! The deadline also travels with the request as a [`CallDeadline`]
//! extension, for work that must check it itself because it does not await.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tonic::Status;
use tower::{Layer, Service};

/// When the call's time runs out.
#[derive(Debug, Clone, Copy)]
pub struct CallDeadline(pub tokio::time::Instant);

#[derive(Clone)]
pub struct DeadlineLayer {
    default: Duration,
}

impl DeadlineLayer {
    pub fn new(default: Duration) -> Self {
        Self { default }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Deadline { inner, default: self.default }
    }
}

#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    default: Duration,
}

impl<S, B, R> Service<http::Request<B>> for Deadline<S>
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

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let budget = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map_or(self.default, |asked| asked.min(self.default));
        request.extensions_mut().insert(CallDeadline(tokio::time::Instant::now() + budget));
        let call = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(budget, call).await {
                Ok(result) => result,
                Err(_) => Ok(Status::deadline_exceeded(format!("deadline of {budget:?} exceeded")).into_http()),
            }
        })
    }
}

/// `grpc-timeout` is at most 8 digits and a unit: H, M, S, m, u or n.
pub fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789m"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }
}
