//! Prometheus metrics, as both binaries expose them on `GET /metrics`.
//!
//! Each binary registers its metric families once, at start-up, in a
//! `prometheus_client` [`Registry`](prometheus_client::registry::Registry)
//! (`ingest/src/metrics.rs`, `server/src/metrics.rs`) and keeps typed handles
//! to them: recording is an atomic add on a handle resolved beforehand, with
//! no registry lookup, no lock and no label text built per call. Names follow
//! Prometheus conventions (`_total` counters, base units such as `_seconds`);
//! times are exposed as timestamps so that `time() - x` gives an age that
//! keeps growing when nothing happens.
//!
//! - [`histogram`]: a histogram of atomics, for latencies on the call path.
//! - [`endpoint`]: `GET /metrics` over hyper.
//! - [`exported`]: what the deploy checks expect, for the binaries' tests.

pub mod endpoint;
pub mod exported;
pub mod histogram;

pub use endpoint::{render, serve};
pub use histogram::AtomicHistogram;

/// Upper bounds of histogram buckets for durations, in seconds.
pub const SECONDS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Upper bounds of histogram buckets for sizes (records per batch).
pub const SIZES: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 50000.0];
