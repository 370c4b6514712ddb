//! Committing a batch: feature state and offsets in one Postgres transaction.
//!
//! First, in memory: apply the batch's events in record order to one empty
//! delta per touched (view, entity) (see `store::state`). Then, in one
//! transaction: advance every partition of the batch with its compare-and-set
//! on (owner epoch, starting offset), append the deltas (one statement, no
//! read, no lock), announce the changed rows, and record the batch's dead
//! letters. If any compare-and-set fails the transaction rolls back before
//! writing anything, and the caller learns which partitions are no longer
//! its own. A commit thus costs what its batch changed, whatever the state.

use std::collections::HashMap;

use freshet_store::{
    entities,
    offsets::{self, Advance, DeadLetter},
    state::EntityState,
    view::Catalog,
};
use sqlx::PgPool;

use crate::transform::apply::{Change, apply};

/// A partition this instance owns, as far as the store knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub epoch: i64,
    /// The `next_offset` stored in Postgres (-1: none yet): the value the
    /// next commit's compare-and-set expects.
    pub stored: i64,
    /// The partition's newest applied event time: the lateness reference.
    pub newest_ms: Option<i64>,
}

/// Per partition, a position past offsets that are never delivered
/// (transaction markers, aborted records), with the high watermark seen
/// then: the batch's offset for the partition moves at least this far.
pub type Skips = HashMap<(String, i32), (i64, i64)>;

/// One record of a batch, decoded.
pub struct Item {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub high_watermark: i64,
    pub changes: Vec<Change>,
    /// Set when the record goes to the DLQ instead (already produced there).
    pub dead: Option<DeadLetter>,
}

#[derive(Debug)]
pub enum CommitError {
    /// These partitions were claimed by another owner: nothing was committed.
    Fenced(Vec<(String, i32)>),
    Sql(sqlx::Error),
    /// The write ended without an answer (its task panicked or was
    /// stopped): whether it landed is not known, so the compare-and-set of
    /// the next attempt decides.
    Lost,
}

impl From<sqlx::Error> for CommitError {
    fn from(e: sqlx::Error) -> Self {
        CommitError::Sql(e)
    }
}

/// Per partition, its ownership state after a batch, and what the batch did to it.
pub type Progress = HashMap<(String, i32), (Owned, Advance)>;

/// A batch ready to write: its deltas, worked out in memory from the
/// partitions' state before it, and what it does to each partition.
pub struct Prepared {
    deltas: Vec<(entities::RowKey, EntityState)>,
    pub progress: Progress,
    dead: Vec<DeadLetter>,
}

/// Commits `items` (each partition's items in offset order) and `skips`,
/// and returns, per partition, its new ownership state and what the batch
/// did to it.
pub async fn commit(
    pool: &PgPool,
    group: &str,
    catalog: &Catalog,
    owned: &HashMap<(String, i32), Owned>,
    items: &[&Item],
    skips: &Skips,
) -> Result<Progress, CommitError> {
    let prepared = prepare(catalog, owned, items, skips);
    write(pool, group, &prepared).await?;
    Ok(prepared.progress)
}

/// Works out, in memory, what committing `items` and `skips` writes, given
/// where each partition stands (`owned`).
pub fn prepare(catalog: &Catalog, owned: &HashMap<(String, i32), Owned>, items: &[&Item], skips: &Skips) -> Prepared {
    let mut deltas: HashMap<entities::RowKey, EntityState> = HashMap::new();
    let mut progress: Progress = HashMap::new();
    let start = |tp: &(String, i32)| {
        let o = owned[tp].clone();
        let advance = Advance {
            topic: tp.0.clone(),
            partition: tp.1,
            epoch: o.epoch,
            expected: o.stored,
            next_offset: o.stored,
            high_watermark: -1,
            newest_event_ms: o.newest_ms,
            applied: 0,
            dead: 0,
            late: 0,
        };
        (o, advance)
    };
    for item in items {
        let tp = (item.topic.clone(), item.partition);
        let (state, advance) = progress.entry(tp.clone()).or_insert_with(|| start(&tp));
        advance.late += apply(catalog, &mut deltas, &item.changes, &mut state.newest_ms);
        advance.next_offset = item.offset + 1;
        advance.high_watermark = advance.high_watermark.max(item.high_watermark);
        advance.newest_event_ms = state.newest_ms;
        if item.dead.is_some() { advance.dead += 1 } else { advance.applied += 1 }
    }
    for (tp, &(next_offset, high_watermark)) in skips {
        let (_, advance) = progress.entry(tp.clone()).or_insert_with(|| start(tp));
        advance.next_offset = advance.next_offset.max(next_offset);
        advance.high_watermark = advance.high_watermark.max(high_watermark);
    }
    for (owned, advance) in progress.values_mut() {
        *owned = Owned { epoch: owned.epoch, stored: advance.next_offset, newest_ms: advance.newest_event_ms };
    }

    let mut deltas: Vec<(entities::RowKey, EntityState)> = deltas.into_iter().collect();
    // Sorted, so that index entries go in in order (cheaper, and steady).
    deltas.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let dead = items.iter().filter_map(|i| i.dead.clone()).collect();
    Prepared { deltas, progress, dead }
}

/// Writes `prepared` in one transaction; nothing if any partition's
/// compare-and-set fails.
pub async fn write(pool: &PgPool, group: &str, prepared: &Prepared) -> Result<(), CommitError> {
    let mut tx = pool.begin().await?;
    // Durability of a batch comes from Kafka, not from this fsync: if
    // Postgres loses the newest commits in a crash, it loses their state
    // and their offsets together, and ingest replays them from Kafka. Not
    // waiting for the flush takes it off the freshness path.
    sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *tx).await?;
    // Fencing first: a stale owner writes nothing.
    let advances: Vec<Advance> = prepared.progress.values().map(|(_, a)| a.clone()).collect();
    let fenced = offsets::advance(&mut tx, group, &advances).await?;
    if !fenced.is_empty() {
        tx.rollback().await?;
        return Err(CommitError::Fenced(fenced));
    }
    if !prepared.deltas.is_empty() {
        entities::append(&mut tx, &prepared.deltas).await?;
        entities::notify_changes(&mut tx, prepared.deltas.iter().map(|(k, _)| k)).await?;
    }
    offsets::record_dead_letters(&mut tx, group, &prepared.dead).await?;
    tx.commit().await?;
    Ok(())
}

/// How a failed commit should be handled.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// The data cannot be stored (Postgres rejected a value): isolate the
    /// record(s) responsible and dead-letter them.
    Data,
    /// Anything else: wait and retry; never dead-letter, never skip.
    Transient,
}

pub fn classify(e: &sqlx::Error) -> Failure {
    match e {
        sqlx::Error::Encode(_) => Failure::Data,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // 22: data exception (bad text, bad JSON escape, out of range);
            // 23: integrity violation; 54: program limit (row too big).
            Some(code) if code.starts_with("22") || code.starts_with("23") || code.starts_with("54") => Failure::Data,
            _ => Failure::Transient,
        },
        _ => Failure::Transient,
    }
}
