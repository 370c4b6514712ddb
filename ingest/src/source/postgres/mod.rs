//! The direct Postgres source: views with `format = "postgres"` read their
//! table from a logical replication slot (`pgoutput`), without Kafka.
//!
//! Exactly once, as for Kafka: a slot is a pseudo-partition (topic
//! `postgres:<slot>`, partition 0) of `ingest_offsets`, claimed with the
//! same owner epoch and committed with its feature state in one
//! transaction by `sink::commit`; its offset is the end LSN of the last
//! source transaction applied (`stream.rs`). A new slot starts with a
//! snapshot of its tables taken at the slot's consistent point
//! (`snapshot.rs`).
//!
//! The protocol crate: `pgwire-replication` (0.5), over `pg_walstream`
//! (0.9, the newest that resolves here). Both stream `pgoutput`, answer
//! keepalives and send standby status updates from an LSN the consumer
//! raises only after its own commit, and both do rustls TLS. For Freshet,
//! pgwire-replication is the better fit: it is async throughout (pg_walstream's
//! native connection runs slot commands with blocking I/O on the caller's
//! thread), it never acknowledges on its own (pg_walstream's retrying stream
//! reconnects and resumes from its own idea of the applied LSN), its gated
//! session runs `CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT` and then
//! `START_REPLICATION` on one connection (what an exported snapshot needs),
//! its event channel is bounded (back-pressure without buffering the WAL),
//! and its TLS is ring-based rustls (pg_walstream's pulls in aws-lc-sys, a C
//! build). Its cost: it decodes Begin and Commit only, so the row messages
//! are decoded here (`pgoutput.rs`, protocol version 1, text tuples).

mod connect;
mod pgoutput;
mod rows;
mod slot;
mod snapshot;
mod stream;

use std::{collections::HashMap, sync::Arc};

use freshet_store::view::Catalog;
use sqlx::PgPool;

pub use connect::SourceDb;
use stream::SlotStream;

use crate::{metrics::IngestMetrics, shutdown::Shutdown};

/// What every slot's stream shares.
pub struct Shared {
    pub catalog: Arc<Catalog>,
    /// Freshet's store.
    pub pool: PgPool,
    pub group: String,
    pub owner: String,
    pub metrics: Arc<IngestMetrics>,
    /// Row changes per commit (a source transaction is never split).
    pub max_batch_changes: usize,
    /// Retained WAL past which a slot's lag is logged as a warning.
    pub max_retained_wal_bytes: i64,
}

/// The slots the views read, each with its tables: nothing when no view
/// is Postgres-sourced.
pub fn streams(shared: Shared) -> anyhow::Result<Vec<SlotStream>> {
    let shared = Arc::new(shared);
    let mut slots: HashMap<String, SlotStream> = HashMap::new();
    for (index, view) in shared.catalog.views.iter().enumerate() {
        let Some(pg) = &view.source.postgres else { continue };
        let stream = match slots.entry(pg.slot.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(SlotStream {
                slot: pg.slot.clone(),
                publication: pg.publication.clone(),
                db: SourceDb::from_env(&pg.url_env)?,
                tables: HashMap::new(),
                shared: shared.clone(),
            }),
        };
        stream.tables.entry((pg.schema.clone(), pg.table.clone())).or_default().push(index);
    }
    Ok(slots.into_values().collect())
}

/// Streams every slot until shutdown; the first slot that fails for good
/// stops them all.
pub async fn run(streams: Vec<SlotStream>, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for stream in streams {
        tasks.spawn(stream.run(shutdown.clone()));
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done? {
            shutdown.request();
            return Err(e);
        }
    }
    Ok(())
}

/// Drops `slot` from the source database if Freshet created it there, and
/// forgets it and its checkpoint; refuses a slot Freshet did not create.
pub async fn drop_slot(pool: &PgPool, db: &SourceDb, slot: &str) -> anyhow::Result<()> {
    if !freshet_store::slots::created_by_freshet(pool, slot, &db.database).await? {
        anyhow::bail!("Freshet did not create slot {slot} on database {}: not dropping it", db.database);
    }
    let source = db.pool().await?;
    // Gone already (a creation interrupted before it ran): only forget it.
    sqlx::query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1")
        .bind(slot)
        .execute(&source)
        .await
        .map_err(|e| anyhow::anyhow!("dropping slot {slot}: {e} (stop the freshet-ingest instances streaming it first)"))?;
    freshet_store::slots::forget(pool, slot).await?;
    Ok(())
}
