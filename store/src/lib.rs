//! What Freshet's ingest and server share.
//!
//! - [`view`]: the feature-view file: what is computed and served.
//! - [`key`]: the rule every entity key obeys, at ingest and at serving.
//! - [`state`]: the feature math: tiles, windows, last values; [`codec`]:
//!   its byte layout in Postgres and Redis.
//! - [`db`], [`entities`], [`offsets`], [`owners`]: the Postgres store:
//!   schema, per-entity feature state, per-partition progress with fencing,
//!   and which consumer group computes each view; [`rebuild`]: recomputing
//!   views from Kafka after their file changed; [`slots`]: the replication
//!   slots Freshet created for Postgres-sourced views.
//! - [`metrics`], [`telemetry`]: the Prometheus endpoint, logs and traces of
//!   both binaries; [`tls`]: the crypto backend of their TLS.

pub mod codec;
pub mod db;
pub mod entities;
pub mod key;
pub mod metrics;
pub mod offsets;
pub mod owners;
pub mod rebuild;
pub mod slots;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod view;
