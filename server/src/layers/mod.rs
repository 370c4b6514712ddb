//! The server's cross-cutting concerns, each a small tower layer, composed
//! here and nowhere else. Outermost first:
//!
//! 0. [`trace`] and [`metrics`]: a span per call continuing the caller's
//!    trace; every call counted by method and status, and timed.
//! 1. [`refusals`]: the codes of requests tonic refuses before a handler
//!    runs (undecodable, oversized) made the client's, not the server's.
//! 2. [`deadline`]: the caller's `grpc-timeout` (or the server default) bounds
//!    the call; expiry answers `DEADLINE_EXCEEDED`.
//! 3. [`auth`]: when tokens are configured, a call without a valid bearer
//!    token is refused `UNAUTHENTICATED` before it takes a slot.
//! 4. [`shed`]: at most N calls in flight; the next is refused at once with
//!    `RESOURCE_EXHAUSTED` rather than queued (a fast "no" beats a slow "yes"):
//!    tower's `ConcurrencyLimit` behind tower's `LoadShed`.
//!
//! Health checks pass through auth and shedding, so probes need no secret and
//! an overloaded server is not also declared dead by its orchestrator.

pub mod auth;
pub mod deadline;
pub mod metrics;
pub mod refusals;
pub mod shed;
pub mod trace;

use std::time::Duration;

use tower::{
    ServiceBuilder,
    layer::util::{Identity, Stack},
};

pub struct Limits {
    pub max_in_flight: usize,
    pub default_deadline: Duration,
    /// Accepted bearer tokens; empty turns authentication off.
    pub tokens: Vec<String>,
    pub metrics: std::sync::Arc<crate::metrics::ServerMetrics>,
}

pub type Layers = Stack<
    shed::ShedLayer,
    Stack<
        auth::AuthLayer,
        Stack<deadline::DeadlineLayer, Stack<refusals::RefusalsLayer, Stack<metrics::MetricsLayer, Stack<trace::TraceLayer, Identity>>>>,
    >,
>;

pub fn compose(limits: &Limits) -> ServiceBuilder<Layers> {
    ServiceBuilder::new()
        .layer(trace::TraceLayer)
        .layer(metrics::MetricsLayer::new(limits.metrics.clone()))
        .layer(refusals::RefusalsLayer)
        .layer(deadline::DeadlineLayer::new(limits.default_deadline))
        .layer(auth::AuthLayer::new(limits.tokens.clone()))
        .layer(shed::ShedLayer::new(limits.max_in_flight, limits.metrics.shed.clone()))
}

/// Paths that bypass admission control.
fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

/// Every method this server serves, as (service, method).
pub const METHODS: &[(&str, &str)] = &[
    ("freshet.v1.FeatureService", "GetFeatures"),
    ("freshet.v1.FeatureService", "GetFreshness"),
    ("freshet.v1.FeatureService", "ListFeatureViews"),
    ("grpc.health.v1.Health", "Check"),
    ("grpc.health.v1.Health", "Watch"),
    ("grpc.reflection.v1.ServerReflection", "ServerReflectionInfo"),
    ("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo"),
];

/// The (service, method) a path calls, if this server serves it. Metrics and
/// spans are labelled with this, never with the path itself: any caller,
/// authenticated or not, can send any path, and a label per path would let
/// it create series without bound.
pub fn known_method(path: &str) -> Option<(&'static str, &'static str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    METHODS.iter().find(|(s, m)| *s == service && *m == method).copied()
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn knows_every_method_of_the_feature_service_and_nothing_else() {
        let set = prost_types::FileDescriptorSet::decode(freshet_proto::v1::FILE_DESCRIPTOR_SET).unwrap();
        for file in &set.file {
            for service in &file.service {
                let name = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    let path = format!("/{name}/{}", method.name());
                    assert_eq!(known_method(&path), Some((name.as_str(), method.name())), "{path}");
                }
            }
        }
        assert_eq!(known_method("/grpc.health.v1.Health/Check"), Some(("grpc.health.v1.Health", "Check")));
        for path in
            ["/x.Y/GetFeatures", "/freshet.v1.FeatureService/Nope", "/freshet.v1.FeatureService/GetFeatures/x", "", "/", "GetFeatures"]
        {
            assert_eq!(known_method(path), None, "{path}");
        }
    }
}
