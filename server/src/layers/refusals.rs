//! Status codes of the requests tonic refuses before a handler sees them.
//!
//! tonic answers a message that does not decode (invalid UTF-8 in a string
//! field, say) with `INTERNAL` and one over the size limit with
//! `OUT_OF_RANGE`. Both are the client's doing, and clients treat these codes
//! as server faults or ignore them: Freshet answers `INVALID_ARGUMENT`
//! (keeping the decoder's message, which names the field) and
//! `RESOURCE_EXHAUSTED`, gRPC's code for a message over the limit.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::{Code, Status};
use tower::{Layer, Service};

#[derive(Clone, Default)]
pub struct RefusalsLayer;

impl<S> Layer<S> for RefusalsLayer {
    type Service = Refusals<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Refusals { inner }
    }
}

#[derive(Clone)]
pub struct Refusals<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for Refusals<S>
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
        let call = self.inner.call(request);
        Box::pin(async move {
            let mut response = call.await?;
            // Refusals are trailers-only responses: the status is in the headers.
            if let Some(status) = Status::from_header_map(response.headers()).and_then(|s| recode(&s)) {
                // Only fails for a message that is not valid header text, and
                // tonic's messages it replaces are.
                let _ = status.add_header(response.headers_mut());
            }
            Ok(response)
        })
    }
}

/// The status a refusal of tonic's should have been, if it is one.
fn recode(status: &Status) -> Option<Status> {
    let message = status.message();
    match status.code() {
        Code::Internal if message.starts_with("failed to decode Protobuf message") => Some(Status::invalid_argument(message)),
        Code::OutOfRange if message.starts_with("Error, decoded message length too large") => Some(Status::resource_exhausted(message)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recodes_decode_and_size_refusals_only() {
        let undecodable = Status::internal("failed to decode Protobuf message: GetFeaturesRequest.features: invalid string value");
        let recoded = recode(&undecodable).unwrap();
        assert_eq!((recoded.code(), recoded.message()), (Code::InvalidArgument, undecodable.message()));
        let oversized = Status::out_of_range("Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes");
        assert_eq!(recode(&oversized).unwrap().code(), Code::ResourceExhausted);
        assert!(recode(&Status::internal("something else")).is_none());
        assert!(recode(&Status::ok("")).is_none());
        assert!(recode(&Status::invalid_argument("features: x")).is_none());
    }
}
