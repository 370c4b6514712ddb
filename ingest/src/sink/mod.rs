//! Where features are committed: one Postgres transaction per batch holding
//! the feature state and the offsets (`commit`), and the dead-letter topic
//! for records that can never be applied (`dlq`).

pub mod commit;
pub mod dlq;
