//! Bearer-token authentication: when tokens are configured, every call but
//! health checks must carry `authorization: Bearer <token>` with one of them,
//! or it is refused `UNAUTHENTICATED` before it costs anything else. The
//! scheme is matched case-insensitively (RFC 7235), the token exactly.

use std::{
    collections::HashSet,
    future::Future,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use anyhow::Context as _;
use tonic::Status;
use tower::{Layer, Service};

/// Reads a tokens file: one token a line; blank lines and `#` comments are
/// ignored. A file without a single token is an error, not "no auth": an
/// operator who points at a tokens file means to require one.
pub fn read_tokens(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read tokens file {}", path.display()))?;
    let tokens = parse_tokens(&text);
    anyhow::ensure!(
        !tokens.is_empty(),
        "tokens file {} holds no token (only blank lines or comments): refusing to start without authentication; \
         remove --tokens-file (FRESHET_TOKENS_FILE) to serve without it",
        path.display()
    );
    Ok(tokens)
}

fn parse_tokens(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect()
}

/// The token of an `authorization` value of the Bearer scheme.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_start_matches(' '))
}

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
                .and_then(bearer_token)
                .is_some_and(|token| tokens.contains(token)),
        };
        if !allowed {
            return Box::pin(async { Ok(Status::unauthenticated("a valid bearer token is required").into_http()) });
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_token_exact() {
        assert_eq!(bearer_token("Bearer s3cret"), Some("s3cret"));
        assert_eq!(bearer_token("bearer s3cret"), Some("s3cret"));
        assert_eq!(bearer_token("BEARER  s3cret"), Some("s3cret"));
        assert_eq!(bearer_token("Basic s3cret"), None);
        assert_eq!(bearer_token("Bearers3cret"), None);
        assert_eq!(bearer_token("Bearer S3CRET"), Some("S3CRET"));
    }

    #[test]
    fn a_tokens_file_without_tokens_is_refused() {
        assert_eq!(parse_tokens("# ops\n\n  a1  \n#b\nc2\n"), ["a1", "c2"]);
        let dir = std::env::temp_dir().join(format!("freshet-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in [("empty", ""), ("comments", "# no tokens yet\n\n   \n")] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            let error = read_tokens(&path).unwrap_err().to_string();
            assert!(error.contains("holds no token") && error.contains(&path.display().to_string()), "{error}");
        }
        assert!(read_tokens(&dir.join("missing")).unwrap_err().to_string().starts_with("cannot read tokens file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
