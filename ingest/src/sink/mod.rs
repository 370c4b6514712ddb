//! Where features are committed: one Postgres transaction per batch holding
//! the feature changes and the offsets (`commit`), the dead-letter topic for
//! records that can never be applied (`dlq`), and the background folding of
//! committed changes into each entity's stored state (`compact`).

pub mod commit;
pub mod compact;
pub mod dlq;
