//! `GET /metrics`: a registry rendered in the Prometheus text format (0.0.4),
//! served over HTTP/1.1 by hyper (the HTTP stack tonic already brings), with
//! keep-alive and a bound on how long a client may take to send its headers.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header::CONTENT_TYPE, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{encoding::prometheus_text, registry::Registry};

/// Serves `GET /metrics` on `address` until the process ends; returns the
/// bound address (port 0 picks a free one).
pub async fn serve(registry: Arc<Registry>, address: SocketAddr) -> std::io::Result<SocketAddr> {
    // Say which address: "Address already in use" alone does not tell an
    // operator which of a binary's listeners clashed.
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot serve metrics on {address}: {e}")))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "metrics endpoint cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            let answer = service_fn(move |request| std::future::ready(Ok::<_, Infallible>(respond(&registry, &request))));
            tokio::spawn(http1::Builder::new().timer(TokioTimer::new()).serve_connection(TokioIo::new(stream), answer));
        }
    });
    Ok(bound)
}

fn respond<B>(registry: &Registry, request: &Request<B>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET || request.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found: metrics are at GET /metrics\n".into());
    }
    match render(registry) {
        Ok(text) => {
            let mut response = plain(StatusCode::OK, text);
            response.headers_mut().insert(CONTENT_TYPE, prometheus_text::CONTENT_TYPE.parse().expect("a valid header value"));
            response
        }
        Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot render the metrics\n".into()),
    }
}

/// `registry` in the Prometheus text format.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_text::encode(&mut text, registry)?;
    Ok(text)
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(address: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    }

    #[tokio::test]
    async fn serves_the_registry_at_metrics_and_nothing_elsewhere() {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("things", "Things", counter.clone());
        counter.inc_by(3);
        let address = serve(Arc::new(registry), "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let text = get(address, "/metrics").await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n# HELP things_total Things.\n# TYPE things_total counter\nthings_total 3\n"), "{text}");
        assert!(get(address, "/other").await.starts_with("HTTP/1.1 404 Not Found\r\n"));
    }

    #[tokio::test]
    async fn a_busy_address_is_named_in_the_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = taken.local_addr().unwrap();
        let error = serve(Arc::default(), address).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
        assert!(error.to_string().starts_with(&format!("cannot serve metrics on {address}: ")), "{error}");
    }
}
