//! One slot, streamed into the store exactly once.
//!
//! A session of a slot: take the slot's lock in Freshet's database (one
//! instance streams a slot; the others wait and retry), claim the slot's
//! pseudo-partition (the epoch bump fences any zombie of an earlier owner),
//! then, on the first run, create the slot with an exported snapshot and
//! commit the tables' rows in that snapshot, with the consistent point as
//! the checkpoint. Then stream: a source transaction's row changes become
//! one [`Item`] whose offset is its commit's end LSN, committed whole
//! through `sink::commit` (state, checkpoint and fencing in one
//! transaction), several transactions per commit when they queue up. The
//! slot is told an LSN is flushed only once Freshet's commit holds it; after
//! a crash the slot resends from its confirmed point and every transaction
//! at or below the stored checkpoint is skipped.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use freshet_store::{
    offsets::{self, DeadLetter},
    owners, slots,
    view::PostgresSource,
};
use futures::FutureExt;
use pgwire_replication::{
    Lsn,
    client::{ReplicationClient, ReplicationEvent},
};
use sqlx::PgPool;

use super::{
    Shared,
    connect::SourceDb,
    pgoutput::{self, Message, Relation},
    rows::{self, RowChange},
    slot, snapshot,
};
use crate::{
    backoff::Backoff,
    shutdown::Shutdown,
    sink::commit::{self, CommitError, Item, Owned},
    transform::apply::Change,
};

/// One slot and the tables its views read.
pub struct SlotStream {
    pub slot: String,
    pub publication: String,
    pub db: SourceDb,
    /// (schema, table) → indexes of the views reading it.
    pub tables: HashMap<(String, String), Vec<usize>>,
    pub shared: Arc<Shared>,
}

/// Why a session ended.
enum Ended {
    /// Shutdown was asked for.
    Shutdown,
    /// Worth another session after a pause (slot busy, connection lost, fenced).
    Retry(anyhow::Error),
    /// Needs the operator: retrying would not help.
    Fatal(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Ended {
    fn from(e: E) -> Self {
        Ended::Retry(e.into())
    }
}

/// A source transaction being received.
struct Txn {
    commit_ms: i64,
    changes: Vec<Change>,
    dead: Vec<DeadLetter>,
}

impl SlotStream {
    fn topic(&self) -> String {
        PostgresSource::topic(&self.slot)
    }

    fn views(&self) -> Vec<&str> {
        self.tables.values().flatten().map(|&i| self.shared.catalog.views[i].name.as_str()).collect()
    }

    /// Streams until shutdown, with a new session after each failure.
    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match self.session(&shutdown).await {
                Ended::Shutdown => return Ok(()),
                Ended::Fatal(e) => return Err(e.context(format!("postgres source, slot {}", self.slot))),
                Ended::Retry(e) => {
                    tracing::warn!(slot = self.slot, error = format!("{e:#}"), "postgres source: retrying");
                    if backoff.wait(&shutdown).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn session(&self, shutdown: &Shutdown) -> Ended {
        match self.stream(shutdown).await {
            Ok(()) => Ended::Shutdown,
            Err(ended) => ended,
        }
    }

    async fn stream(&self, shutdown: &Shutdown) -> Result<(), Ended> {
        // Held for the whole session: the lock is the slot's, in Freshet's
        // database, and goes with the connection if this process dies. The
        // connection leaves the pool, so ending the session closes it and
        // releases the lock.
        let mut lock = self.shared.pool.acquire().await?.detach();
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
            .bind(format!("freshet:{}", self.topic()))
            .fetch_one(&mut lock)
            .await?;
        if !locked {
            return Err(Ended::Retry(anyhow::anyhow!("slot {} is streamed by another freshet-ingest instance; waiting", self.slot)));
        }
        let claim = {
            let mut tx = self.shared.pool.begin().await?;
            owners::check(&mut tx, &self.shared.group, &self.views()).await.map_err(|e| Ended::Fatal(e.into()))?;
            let claims = offsets::claim(&mut tx, &self.shared.group, &self.topic(), &[0], &self.shared.owner).await?;
            tx.commit().await?;
            claims.into_iter().next().ok_or_else(|| anyhow::anyhow!("claim returned nothing"))?
        };
        let source = self.db.pool().await?;
        self.check_tables(&source).await?;
        let mut session = ReplicationClient::connect_gated(self.db.replication(&self.slot, &self.publication)).await?;
        let exists = slot::exists(&mut session, &self.slot, &self.db.database).await.map_err(Ended::Fatal)?;
        let mut owned = Owned { epoch: claim.epoch, stored: claim.next_offset.unwrap_or(-1), newest_ms: claim.newest_event_ms };
        if claim.next_offset.is_none() {
            if exists {
                // A slot Freshet created whose snapshot never committed (a
                // crash in between): its snapshot is gone, so make a new one.
                if !slots::created_by_freshet(&self.shared.pool, &self.slot, &self.db.database).await? {
                    return Err(Ended::Fatal(anyhow::anyhow!(
                        "slot {} exists, but Freshet did not create it and has no snapshot for it: \
                         name another slot in the views file (Freshet creates it), or drop this one",
                        self.slot
                    )));
                }
                tracing::warn!(slot = self.slot, "dropping a slot whose initial snapshot never committed, to take a new one");
                slot::drop(&mut session, &self.slot).await?;
            }
            slots::record_created(&self.shared.pool, &self.slot, &self.db.database, &self.shared.group).await?;
            let created = slot::create(&mut session, &self.slot).await?;
            owned = self.snapshot(&source, &created, owned, shutdown).await?;
        } else if !exists {
            return Err(Ended::Fatal(anyhow::anyhow!(
                "slot {} is gone, but Freshet's checkpoint for it is at LSN {}: changes since may be lost. \
                 Recreate the views' state (`freshet-ingest drop-slot --slot {0}` forgets the checkpoint; then clear the views' state) \
                 or restore the slot",
                self.slot,
                Lsn(owned.stored.max(0) as u64)
            )));
        }
        session.start().await?;
        session.wait_started().await?;
        tracing::info!(slot = self.slot, checkpoint = %Lsn(owned.stored.max(0) as u64), "postgres source streaming");
        let streamed = tokio::select! {
            streamed = self.receive(&mut session, owned, shutdown) => streamed,
            never = self.watch_wal(&source) => match never {},
        };
        session.stop();
        streamed
    }

    /// Measures the WAL the slot keeps on the source, every few seconds, for
    /// the metrics and the retained-WAL warning.
    async fn watch_wal(&self, source: &PgPool) -> std::convert::Infallible {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            match slot::lag(source, &self.slot).await {
                Ok(Some((retained, unconfirmed))) => {
                    self.shared.metrics.slot_wal(&self.slot, retained, unconfirmed);
                    if retained > self.shared.max_retained_wal_bytes {
                        tracing::warn!(
                            slot = self.slot,
                            retained_bytes = retained,
                            unconfirmed_bytes = unconfirmed,
                            bound = self.shared.max_retained_wal_bytes,
                            "the slot keeps more WAL on the source than --max-retained-wal-bytes: ingest is behind the source \
                             (see the README, \"Direct Postgres source\")"
                        );
                    }
                }
                Ok(None) => tracing::warn!(slot = self.slot, "the slot is gone from the source"),
                Err(e) => tracing::debug!(slot = self.slot, error = %e, "could not measure the slot's WAL"),
            }
        }
    }

    /// Refuses tables the publication does not publish, and views that
    /// retract (deletes, or replaced updates) on a table whose old rows
    /// Postgres does not log whole.
    async fn check_tables(&self, source: &PgPool) -> Result<(), Ended> {
        for ((schema, table), views) in &self.tables {
            let published: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
            )
            .bind(&self.publication)
            .bind(schema)
            .bind(table)
            .fetch_one(source)
            .await?;
            if !published {
                return Err(Ended::Fatal(anyhow::anyhow!(
                    "publication {} does not publish {schema}.{table}: on the source, `ALTER PUBLICATION {0} ADD TABLE {schema}.{table}` \
                     (or CREATE PUBLICATION {0} FOR TABLE {schema}.{table})",
                    self.publication
                )));
            }
            let retracting = views.iter().map(|&i| &self.shared.catalog.views[i]).find(|v| {
                v.source.on_delete == freshet_store::view::DeletePolicy::Retract
                    || v.source.on_update == freshet_store::view::UpdatePolicy::Replace
            });
            let Some(view) = retracting else { continue };
            let identity: Option<String> =
                sqlx::query_scalar("SELECT relreplident::text FROM pg_class WHERE oid = to_regclass(format('%I.%I', $1::text, $2::text))")
                    .bind(schema)
                    .bind(table)
                    .fetch_optional(source)
                    .await?;
            match identity.as_deref() {
                None => return Err(Ended::Fatal(anyhow::anyhow!("table {schema}.{table} (view {}) does not exist", view.name))),
                Some("f") => {}
                Some(_) => {
                    return Err(Ended::Fatal(anyhow::anyhow!(
                        "view {} retracts rows of {schema}.{table}, which needs their whole old image: \
                         run `ALTER TABLE {schema}.{table} REPLICA IDENTITY FULL` on the source database",
                        view.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Reads every table in the new slot's snapshot and commits the rows,
    /// with the consistent point as checkpoint: snapshot done, in the same
    /// transaction as its state.
    async fn snapshot(&self, source: &PgPool, created: &slot::Created, owned: Owned, shutdown: &Shutdown) -> Result<Owned, Ended> {
        let point = created.consistent_point.as_u64() as i64;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut txn = Txn { commit_ms: now_ms, changes: Vec::new(), dead: Vec::new() };
        let mut number = 0;
        for (schema, table) in self.tables.keys() {
            let (relation, rows) = snapshot::read(source, &created.snapshot, schema, table).await?;
            for row in &rows {
                number += 1;
                // Snapshot rows have no LSN of their own: a dead letter's
                // offset is minus the row's number in the snapshot.
                self.row(&mut txn, &relation, &RowChange::Read(row), -number);
            }
        }
        tracing::info!(slot = self.slot, rows = number, consistent_point = %created.consistent_point, "initial snapshot read");
        // A table is read in storage order: applied in event-time order, no
        // snapshot row is judged late against a newer one read before it.
        txn.changes.sort_by_key(|(_, _, event)| event.at_ms);
        let items = txn_items(&self.topic(), txn, point - 1);
        self.commit(&items, owned, shutdown).await
    }

    /// Applies `row` to the transaction being received, or dead-letters it.
    fn row(&self, txn: &mut Txn, relation: &Relation, row: &RowChange, lsn: i64) {
        let Some(views) = self.tables.get(&(relation.schema.clone(), relation.name.clone())) else { return };
        match rows::changes(&self.shared.catalog, views, relation, row, txn.commit_ms) {
            Ok(changes) => txn.changes.extend(changes),
            Err((poison, raw)) => txn.dead.push(DeadLetter {
                topic: self.topic(),
                partition: 0,
                offset: lsn,
                // No dead-letter topic without Kafka: the table holds it all.
                dlq_topic: "dead_letters".into(),
                error_class: poison.class.into(),
                error_message: format!("{}; row: {raw}", poison.message),
            }),
        }
    }

    /// Receives transactions and commits them, until shutdown or failure.
    async fn receive(&self, session: &mut ReplicationClient, mut owned: Owned, shutdown: &Shutdown) -> Result<(), Ended> {
        let topic = self.topic();
        let mut relations: HashMap<u32, Relation> = HashMap::new();
        let mut txn: Option<Txn> = None;
        let mut batch: Vec<Item> = Vec::new();
        let mut batch_changes = 0;
        let mut confirm = Lsn(0);
        loop {
            // Commit what is received once nothing more is waiting.
            let event = match session.recv().now_or_never() {
                Some(event) => event,
                None if !batch.is_empty() => {
                    owned = self.commit(&batch, owned, shutdown).await?;
                    session.update_applied_lsn(confirm);
                    batch.clear();
                    batch_changes = 0;
                    continue;
                }
                None => tokio::select! {
                    event = session.recv() => event,
                    _ = shutdown.requested() => return Ok(()),
                },
            };
            match event? {
                None => return Err(Ended::Retry(anyhow::anyhow!("replication stream ended"))),
                Some(ReplicationEvent::Begin { commit_time_micros, .. }) => {
                    let commit_ms = pg_time_ms(commit_time_micros);
                    txn = Some(Txn { commit_ms, changes: Vec::new(), dead: Vec::new() });
                }
                Some(ReplicationEvent::XLogData { data, wal_start, .. }) => {
                    let Some(txn) = txn.as_mut() else { continue };
                    let lsn = wal_start.as_u64() as i64;
                    match pgoutput::decode(&data).map_err(|e| Ended::Retry(e.into()))? {
                        Message::Relation(r) => {
                            relations.insert(r.oid, r);
                        }
                        Message::Insert { relation, new } => self.row(txn, known(&relations, relation)?, &RowChange::Insert(&new), lsn),
                        Message::Update { relation, old, new } => {
                            self.row(txn, known(&relations, relation)?, &RowChange::Update(old.as_ref(), &new), lsn)
                        }
                        Message::Delete { relation, old } => self.row(txn, known(&relations, relation)?, &RowChange::Delete(&old), lsn),
                        // As through Debezium (a truncate event names no
                        // rows): features are made of events, and a TRUNCATE
                        // retracts none, whatever `on_delete` says.
                        Message::Truncate { relations: truncated } => {
                            for oid in truncated {
                                let r = known(&relations, oid)?;
                                if let Some(views) = self.tables.get(&(r.schema.clone(), r.name.clone())) {
                                    let views: Vec<&str> = views.iter().map(|&i| self.shared.catalog.views[i].name.as_str()).collect();
                                    tracing::warn!(
                                        table = format!("{}.{}", r.schema, r.name),
                                        lsn = %Lsn(lsn as u64),
                                        views = views.join(","),
                                        "TRUNCATE retracts nothing from the views' features: the events of the removed rows still count \
                                         (as through Debezium); to recompute a view, see deploy/views/direct.toml"
                                    );
                                }
                            }
                        }
                        Message::Other(_) => {}
                    }
                }
                Some(ReplicationEvent::Commit { end_lsn, .. }) => {
                    let Some(done) = txn.take() else { continue };
                    let offset = end_lsn.as_u64() as i64;
                    // At or below the checkpoint: applied before a crash.
                    if offset < owned.stored {
                        continue;
                    }
                    batch_changes += done.changes.len();
                    batch.extend(txn_items(&topic, done, offset));
                    confirm = end_lsn;
                    if batch_changes >= self.shared.max_batch_changes {
                        owned = self.commit(&batch, owned, shutdown).await?;
                        session.update_applied_lsn(confirm);
                        batch.clear();
                        batch_changes = 0;
                    }
                }
                Some(_) => {}
            }
        }
    }

    /// Commits `items` through the sink, retrying transient failures.
    async fn commit(&self, items: &[Item], owned: Owned, shutdown: &Shutdown) -> Result<Owned, Ended> {
        let key = (self.topic(), 0);
        let partitions = HashMap::from([(key.clone(), owned)]);
        let refs: Vec<&Item> = items.iter().collect();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let started = Instant::now();
            match commit::commit(&self.shared.pool, &self.shared.group, &self.shared.catalog, &partitions, &refs, &commit::Skips::new())
                .await
            {
                Ok(mut done) => {
                    let (owned, advance) = done.remove(&key).ok_or_else(|| anyhow::anyhow!("commit returned no progress"))?;
                    self.shared.metrics.committed(started.elapsed(), items.len(), [&advance]);
                    return Ok(owned);
                }
                Err(CommitError::Fenced(_)) => {
                    return Err(Ended::Retry(anyhow::anyhow!("slot {} was claimed by another instance: fenced", self.slot)));
                }
                Err(e) => {
                    tracing::warn!(slot = self.slot, error = ?e, "commit failed; retrying");
                    self.shared.metrics.commit_retries.inc();
                    // Abandoned at shutdown: nothing was confirmed, the slot resends it.
                    backoff.wait(shutdown).await.map_err(|_| Ended::Shutdown)?;
                }
            }
        }
    }
}

/// A finished transaction as items of one offset: its changes, then one
/// item per dead-lettered row.
fn txn_items(topic: &str, txn: Txn, offset: i64) -> Vec<Item> {
    let item = |changes, dead| Item { topic: topic.to_string(), partition: 0, offset, high_watermark: offset + 1, changes, dead };
    let mut items = vec![item(txn.changes, None)];
    items.extend(txn.dead.into_iter().map(|d| item(Vec::new(), Some(d))));
    items
}

fn known(relations: &HashMap<u32, Relation>, oid: u32) -> Result<&Relation, Ended> {
    relations.get(&oid).ok_or_else(|| Ended::Retry(anyhow::anyhow!("row of relation {oid} before its Relation message")))
}

/// Postgres timestamps count microseconds from 2000-01-01.
fn pg_time_ms(micros: i64) -> i64 {
    (micros + 946_684_800_000_000) / 1000
}
