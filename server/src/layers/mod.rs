//! The server's cross-cutting concerns, each a small tower layer, composed
//! here and nowhere else. Outermost first:
//!
//! 0. [`trace`] and [`metrics`]: a span per call continuing the caller's
//!    trace; every call counted by method and status, and timed.
//! 1. [`deadline`]: the caller's `grpc-timeout` (or the server default) bounds
//!    the call; expiry answers `DEADLINE_EXCEEDED`.
//! 2. [`auth`]: when tokens are configured, a call without a valid bearer
//!    token is refused `UNAUTHENTICATED` before it takes a slot.
//! 3. [`shed`]: at most N calls in flight; the next is refused at once with
//!    `RESOURCE_EXHAUSTED` rather than queued (a fast "no" beats a slow "yes").
//!
//! Health checks pass through auth and shedding, so probes need no secret and
//! an overloaded server is not also declared dead by its orchestrator.

pub mod auth;
pub mod deadline;
pub mod metrics;
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
    pub metrics: std::sync::Arc<freshet_store::metrics::Metrics>,
}

pub type Layers = Stack<
    shed::ShedLayer,
    Stack<auth::AuthLayer, Stack<deadline::DeadlineLayer, Stack<metrics::MetricsLayer, Stack<trace::TraceLayer, Identity>>>>,
>;

pub fn compose(limits: &Limits) -> ServiceBuilder<Layers> {
    ServiceBuilder::new()
        .layer(trace::TraceLayer)
        .layer(metrics::MetricsLayer::new(limits.metrics.clone()))
        .layer(deadline::DeadlineLayer::new(limits.default_deadline))
        .layer(auth::AuthLayer::new(limits.tokens.clone()))
        .layer(shed::ShedLayer::new(limits.max_in_flight, limits.metrics.clone()))
}

/// Paths that bypass admission control.
fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}
