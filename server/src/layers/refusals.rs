//! Status codes of the requests tonic refuses before a handler sees them.
//!
//! tonic answers a message that does not decode (invalid UTF-8 in a string
//! field, say) with `INTERNAL` and one over the size limit with
//! `OUT_OF_RANGE`. Both are the client's doing, and clients treat these codes
//! as server faults or ignore them: Freshet answers `INVALID_ARGUMENT`
//! (keeping the decoder's message, which names the field) and
//! `RESOURCE_EXHAUSTED`, gRPC's code for a message over the limit.
//!
//! A call whose request body could not be read (its client closed the
//! connection mid-request) is answered, and so counted, `CANCELLED`: tonic
//! would say `UNKNOWN`, a server fault, for what the client did.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Frame;
use tonic::{Code, Status, body::Body};
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

impl<S, R> Service<http::Request<Body>> for Refusals<S>
where
    S: Service<http::Request<Body>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let unreadable = Arc::new(AtomicBool::new(false));
        let request = request.map(|body| Body::new(Watched { body, unreadable: unreadable.clone() }));
        let call = self.inner.call(request);
        Box::pin(async move {
            let mut response = call.await?;
            // Refusals are trailers-only responses: the status is in the headers.
            let recoded = match unreadable.load(Ordering::Relaxed) {
                true => Some(Status::cancelled("the client went away before its request was read")),
                false => Status::from_header_map(response.headers()).and_then(|s| recode(&s)),
            };
            if let Some(status) = recoded {
                // Only fails for a message that is not valid header text;
                // these are.
                let _ = status.add_header(response.headers_mut());
            }
            Ok(response)
        })
    }
}

/// A request body that notes a failure to read it.
struct Watched {
    body: Body,
    unreadable: Arc<AtomicBool>,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &frame {
            self.unreadable.store(true, Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
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

    /// A body whose connection dies before the first byte.
    struct Broken;

    impl http_body::Body for Broken {
        type Data = Bytes;
        type Error = Status;
        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(Some(Err(Status::unknown("h2 protocol error: connection closed"))))
        }
    }

    #[tokio::test]
    async fn a_request_the_client_abandoned_is_cancelled_not_unknown() {
        // What tonic does: read the body, answer its failure UNKNOWN.
        let handler = tower::service_fn(|request: http::Request<Body>| async move {
            let mut body = request.into_body();
            let read = std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx)).await;
            let status = match read {
                Some(Err(status)) => status,
                _ => Status::ok(""),
            };
            Ok::<_, std::convert::Infallible>(status.into_http::<Body>())
        });
        let mut service = RefusalsLayer.layer(handler);
        let code = |response: &http::Response<Body>| response.headers().get("grpc-status").unwrap().to_str().unwrap().to_string();
        let abandoned = service.call(http::Request::new(Body::new(Broken))).await.unwrap();
        assert_eq!(code(&abandoned), "1");
        let read = service.call(http::Request::new(Body::empty())).await.unwrap();
        assert_eq!(code(&read), "0");
    }

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
