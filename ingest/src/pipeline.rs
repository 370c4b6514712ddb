//! The async side of ingest: batching, ownership, commits, retries.
//!
//! Events from the poll thread are handled one at a time, in order, so a
//! revocation is only answered after the batch before it has committed (or
//! been dropped), and an assignment is only answered after the partitions
//! are claimed in Postgres. A commit whose compare-and-set fails learns why:
//! another owner's epoch means fenced (the partition is dropped); our own
//! epoch at another offset means the store lost its newest commits in a
//! crash, and the partition is rewound to where the store stands. Records of partitions this instance does not own,
//! and records below the next expected offset (replays after a seek), are
//! dropped: applying an offset twice is impossible by construction, and the
//! compare-and-set in the commit catches the rest.
//!
//! A batch also carries the partitions whose consumer position moved past
//! offsets that are never delivered (transaction markers, aborted records):
//! committing those positions is what lets a fully applied partition reach
//! the end of its log.
//!
//! A batch closes when it holds `max_records` or `max_bytes`, or `linger`
//! after its first record or position. Batches are therefore small when ingest is caught
//! up (freshness) and grow to the bound while it catches up (throughput),
//! since records accumulate while a commit is in flight.
//!
//! One batch's write runs (on a runtime worker) while the next gathers and
//! is prepared in memory against where the partitions will stand once the
//! write lands, so applying events overlaps Postgres's work. Writes stay one
//! at a time and in order, as the compare-and-set needs. If a write fails,
//! it is committed again the slow way (retried, settled, isolated, as
//! below), and the batch prepared behind it, whose starting point may no
//! longer hold, is committed the slow way too.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use freshet_store::{
    offsets::{self, DeadLetter},
    owners::{self, OwnershipError},
    view::Catalog,
};
use sqlx::PgPool;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::Instrument;

use crate::{
    backoff::Backoff,
    metrics::IngestMetrics,
    shutdown::{Abandoned, Shutdown},
    sink::{
        commit::{self, CommitError, Failure, Item, Owned, Prepared, Progress, Skips},
        dlq::{DeadLetterQueue, Delivery, Reason},
    },
    source::{Command, Record, SharedInFlight, SourceEvent, Start, StartPolicy, TopicPartition},
};

pub struct BatchLimits {
    pub max_records: usize,
    pub max_bytes: usize,
    pub linger: Duration,
}

pub struct Pipeline {
    pub catalog: Arc<Catalog>,
    pub pool: PgPool,
    pub group: String,
    pub owner: String,
    pub start_policy: StartPolicy,
    pub dlq: DeadLetterQueue,
    pub in_flight: SharedInFlight,
    pub commands: std::sync::mpsc::Sender<Command>,
    pub limits: BatchLimits,
    metrics: Arc<IngestMetrics>,
    owned: HashMap<TopicPartition, Owned>,
    /// Next offset to accept per owned partition (`None`: the first that
    /// comes). An owned partition is absent while it is being rewound: its
    /// records are dropped until the seek is answered.
    position: HashMap<TopicPartition, Option<i64>>,
    batch: Vec<Record>,
    /// Positions past undelivered offsets, committed with the batch.
    skips: Skips,
    batch_bytes: usize,
    batch_started: Instant,
    /// Every retry loop and every call that can hang gives way to it.
    shutdown: Shutdown,
    /// Set when another consumer group took this one's views over.
    lost_views: Option<OwnershipError>,
    /// The batch being written, if any.
    writing: Option<Writing>,
    /// The last written batch's buffer, emptied, for the next.
    spare: Vec<(Item, Record)>,
}

/// A batch whose write is in flight, with what is needed to commit it again
/// the slow way should the write fail.
struct Writing {
    pending: Vec<(Item, Record)>,
    skips: Skips,
    /// Where its partitions stand once it lands.
    progress: Progress,
    /// Records and bytes to release from the in-flight bound once done.
    count: usize,
    bytes: usize,
    started: Instant,
    result: oneshot::Receiver<Result<(), CommitError>>,
    task: JoinHandle<()>,
}

/// What woke the pipeline up.
enum Wake {
    Shutdown,
    Event(Option<SourceEvent>),
    Linger,
    Written(Result<(), CommitError>),
}

type Boxed<'a> = Pin<Box<dyn Future<Output = Result<(), Abandoned>> + Send + 'a>>;

impl Pipeline {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        catalog: Arc<Catalog>,
        pool: PgPool,
        group: String,
        owner: String,
        start_policy: StartPolicy,
        dlq: DeadLetterQueue,
        in_flight: SharedInFlight,
        commands: std::sync::mpsc::Sender<Command>,
        limits: BatchLimits,
        metrics: Arc<IngestMetrics>,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            catalog,
            pool,
            group,
            owner,
            start_policy,
            dlq,
            in_flight,
            commands,
            limits,
            metrics,
            owned: HashMap::new(),
            position: HashMap::new(),
            batch: Vec::new(),
            skips: Skips::new(),
            batch_bytes: 0,
            batch_started: Instant::now(),
            shutdown,
            lost_views: None,
            writing: None,
            spare: Vec::new(),
        }
    }

    /// Runs until the source ends or shutdown is asked for. A batch whose
    /// commit was abandoned by shutdown stays uncommitted: its partitions'
    /// next owner consumes it again from the offsets in the store. Fails if
    /// another consumer group took the views over.
    pub async fn run(mut self, mut events: mpsc::Receiver<SourceEvent>) -> Result<(), OwnershipError> {
        let shutdown = self.shutdown.clone();
        loop {
            let linger_end = tokio::time::Instant::from_std(self.batch_started + self.limits.linger);
            let batch_is_empty = self.batch_is_empty();
            let written = async {
                match self.writing.as_mut() {
                    Some(w) => (&mut w.result).await.unwrap_or_else(|_| Err(CommitError::Lost)),
                    None => std::future::pending().await,
                }
            };
            let wake = tokio::select! {
                biased;
                _ = shutdown.requested() => Wake::Shutdown,
                result = written => Wake::Written(result),
                event = events.recv() => Wake::Event(event),
                _ = tokio::time::sleep_until(linger_end), if !batch_is_empty => Wake::Linger,
            };
            let event = match wake {
                Wake::Shutdown => break,
                Wake::Written(result) => {
                    let _ = self.finish_writing(Some(result)).await;
                    continue;
                }
                Wake::Linger => {
                    self.flush().await;
                    continue;
                }
                Wake::Event(event) => event,
            };
            match event {
                None => break,
                Some(SourceEvent::Record(record)) => {
                    self.accept(record);
                    if self.batch.len() >= self.limits.max_records || self.batch_bytes >= self.limits.max_bytes {
                        self.flush().await;
                    }
                }
                Some(SourceEvent::Progress { partition, next_offset, high_watermark }) => {
                    self.skip(partition, next_offset, high_watermark);
                }
                Some(SourceEvent::Rewound { partition, start, epoch }) => self.rewound(partition, start, epoch),
                Some(SourceEvent::Assign { partitions, reply }) => {
                    self.settle_all().await;
                    let starts = self.claim(partitions).await;
                    let _ = reply.send(starts);
                }
                Some(SourceEvent::Revoke { partitions, reply }) => {
                    self.settle_all().await;
                    for tp in &partitions {
                        self.owned.remove(tp);
                        self.position.remove(tp);
                    }
                    let _ = reply.send(());
                }
            }
        }
        tracing::info!("shutting down: committing the batch in flight (one attempt)");
        self.settle_all().await;
        let _ = self.commands.send(Command::Stop);
        // Serve the revocation of leaving the group, and drop what is left.
        while let Some(event) = events.recv().await {
            match event {
                SourceEvent::Record(r) => self.in_flight.release(1, r.size),
                SourceEvent::Revoke { reply, .. } => {
                    let _ = reply.send(());
                }
                SourceEvent::Assign { .. } | SourceEvent::Progress { .. } | SourceEvent::Rewound { .. } => {}
            }
        }
        self.lost_views.take().map_or(Ok(()), Err)
    }

    fn batch_is_empty(&self) -> bool {
        self.batch.is_empty() && self.skips.is_empty()
    }

    /// Moves an owned partition's next offset past offsets the consumer
    /// skipped without delivering them.
    fn skip(&mut self, tp: TopicPartition, next_offset: i64, high_watermark: i64) {
        let Some(next) = self.position.get_mut(&tp) else { return };
        if next.is_some_and(|n| next_offset <= n) {
            return;
        }
        *next = Some(next_offset);
        if self.batch_is_empty() {
            self.batch_started = Instant::now();
        }
        self.skips.insert(tp, (next_offset, high_watermark));
    }

    fn accept(&mut self, record: Record) {
        let tp = (record.topic.clone(), record.partition);
        let fresh = match self.position.get_mut(&tp) {
            Some(next) if next.is_none_or(|n| record.offset >= n) => {
                *next = Some(record.offset + 1);
                true
            }
            _ => false,
        };
        if !fresh {
            self.in_flight.release(1, record.size);
            return;
        }
        if self.batch_is_empty() {
            self.batch_started = Instant::now();
        }
        self.batch_bytes += record.size;
        self.batch.push(record);
    }

    /// Claims `partitions` in the store (retrying until it answers) and says
    /// where each starts.
    #[tracing::instrument(name = "claim", skip_all, fields(partitions = partitions.len()))]
    async fn claim(&mut self, partitions: Vec<TopicPartition>) -> Vec<(TopicPartition, Start)> {
        let mut by_topic: HashMap<String, Vec<i32>> = HashMap::new();
        for (topic, partition) in partitions {
            by_topic.entry(topic).or_default().push(partition);
        }
        let mut starts = Vec::new();
        for (topic, partitions) in by_topic {
            let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
            let claims = loop {
                let claimed = self.shutdown.bounded(self.try_claim(&topic, &partitions)).await;
                let Ok(claimed) = claimed else { return starts };
                match claimed {
                    Ok(claims) => break claims,
                    Err(e @ OwnershipError::OwnedByOther { .. }) => {
                        // Another group took the views over: this instance
                        // must not compute them again. Stop, claiming nothing.
                        tracing::error!(error = %e, "views taken over by another group; stopping");
                        self.lost_views = Some(e);
                        self.shutdown.request();
                        return starts;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, topic, attempt = backoff.attempts(), "claiming partitions failed; retrying");
                        // Shutting down: answer what was claimed; the poll
                        // thread then takes none of it.
                        if backoff.wait(&self.shutdown).await.is_err() {
                            return starts;
                        }
                    }
                }
            };
            for claim in claims {
                let tp = (topic.clone(), claim.partition);
                let start = self.start_at(claim.next_offset);
                tracing::info!(topic, partition = claim.partition, epoch = claim.epoch, ?start, "claimed");
                self.owned.insert(
                    tp.clone(),
                    Owned { epoch: claim.epoch, stored: claim.next_offset.unwrap_or(-1), newest_ms: claim.newest_event_ms },
                );
                self.position.insert(tp.clone(), claim.next_offset);
                starts.push((tp, start));
            }
        }
        starts
    }

    /// Checks that this group still owns the topic's views and claims the
    /// partitions, in one transaction (see `owners`).
    async fn try_claim(&self, topic: &str, partitions: &[i32]) -> Result<Vec<offsets::Claim>, OwnershipError> {
        let views: Vec<&str> = self.catalog.views_of_topic(topic).map(|v| v.name.as_str()).collect();
        let mut tx = self.pool.begin().await?;
        owners::check(&mut tx, &self.group, &views).await?;
        let claims = offsets::claim(&mut tx, &self.group, topic, partitions, &self.owner).await?;
        tx.commit().await?;
        Ok(claims)
    }

    /// Where to consume a partition whose store offset is `next_offset`.
    fn start_at(&self, next_offset: Option<i64>) -> Start {
        match (next_offset, self.start_policy) {
            (Some(offset), _) => Start::Offset(offset),
            (None, StartPolicy::Earliest) => Start::Beginning,
            (None, StartPolicy::Latest) => Start::End,
        }
    }

    /// A commit of `tp` failed its compare-and-set: drop the partition if
    /// another owner claimed it, or, if the store is still ours but stands
    /// elsewhere, drop what we hold of it and consume it again from there.
    async fn settle(&mut self, tp: TopicPartition) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let current = loop {
            match offsets::current(&self.pool, &self.group, &tp.0, tp.1).await {
                Ok(current) => break current,
                Err(e) => {
                    tracing::warn!(error = %e, attempt = backoff.attempts(), "reading a fenced partition's offset failed; retrying");
                    if backoff.wait(&self.shutdown).await.is_err() {
                        break None; // shutting down: just drop it
                    }
                }
            }
        };
        match current {
            Some(claim) if self.owned.get(&tp).is_some_and(|o| o.epoch == claim.epoch) => {
                tracing::warn!(topic = tp.0, partition = tp.1, next_offset = ?claim.next_offset, "store moved back under us; rewinding");
                self.owned.insert(
                    tp.clone(),
                    Owned { epoch: claim.epoch, stored: claim.next_offset.unwrap_or(-1), newest_ms: claim.newest_event_ms },
                );
                self.rewind(tp, self.start_at(claim.next_offset), claim.epoch);
            }
            _ => {
                tracing::warn!(topic = tp.0, partition = tp.1, "partition claimed by another owner; dropping it");
                self.owned.remove(&tp);
                self.position.remove(&tp);
            }
        }
    }

    /// Drops the records of `tp` until the poll thread has sought to `start`.
    fn rewind(&mut self, tp: TopicPartition, start: Start, epoch: i64) {
        self.position.remove(&tp);
        let _ = self.commands.send(Command::Rewind { partition: tp, start, epoch });
    }

    /// A seek took effect. Normally the one we asked for under the current
    /// epoch: accept records from `start`. A seek asked for under an older
    /// epoch may land after a new claim set the partition's position: harmless
    /// if it went back (records before the position are dropped), a gap if it
    /// went forward, so then seek again to the position.
    fn rewound(&mut self, tp: TopicPartition, start: Start, epoch: i64) {
        let Some(owned) = self.owned.get(&tp) else { return };
        let epoch_now = owned.epoch;
        match (self.position.get(&tp).copied(), start) {
            (None, _) if epoch == epoch_now => {
                let next = match start {
                    Start::Offset(o) => Some(o),
                    Start::Beginning | Start::End => None,
                };
                self.position.insert(tp, next);
            }
            (Some(Some(position)), Start::Offset(o)) if o <= position => {}
            (Some(Some(position)), _) => self.rewind(tp, Start::Offset(position), epoch_now),
            (Some(None) | None, _) => {
                let start = self.start_at((owned.stored >= 0).then_some(owned.stored));
                self.rewind(tp, start, epoch_now);
            }
        }
    }

    /// Commits the current batch and waits until nothing is in flight:
    /// before partitions change hands, and at shutdown.
    async fn settle_all(&mut self) {
        self.flush().await;
        let _ = self.finish_writing(None).await;
    }

    /// Closes the current batch: prepares it, waits for the write before it,
    /// and starts its write, or, if that write failed, commits it the slow
    /// way. Returns once its write is started, committed, or its partitions
    /// are lost.
    #[tracing::instrument(name = "batch", skip_all, fields(records = self.batch.len(), bytes = self.batch_bytes))]
    async fn flush(&mut self) {
        if self.batch_is_empty() {
            return;
        }
        // The batch's buffers are used again: allocating megabytes afresh
        // per batch had the kernel zeroing pages for a sixth of this
        // thread's time.
        let mut records = std::mem::take(&mut self.batch);
        let skips = std::mem::take(&mut self.skips);
        let bytes = std::mem::replace(&mut self.batch_bytes, 0);
        let count = records.len();
        let mut pending = std::mem::take(&mut self.spare);
        pending.reserve(count);
        for mut record in records.drain(..) {
            match self.decode(&mut record).await {
                Ok(item) => pending.push((item, record)),
                Err(_abandoned) => {
                    self.in_flight.release(count, bytes);
                    return;
                }
            }
        }
        self.batch = records;
        // Partitions lost or being rewound meanwhile: their records come again.
        pending.retain(|(i, _): &(Item, Record)| self.position.contains_key(&(i.topic.clone(), i.partition)));
        let mut skips = skips;
        skips.retain(|tp, _| self.position.contains_key(tp));
        if pending.is_empty() && skips.is_empty() {
            self.spare = pending;
            self.in_flight.release(count, bytes);
            return;
        }
        // Prepared against where the partitions stand once the write in
        // flight lands (which it nearly always does).
        let mut projected = self.owned.clone();
        if let Some(w) = &self.writing {
            projected.extend(w.progress.iter().map(|(tp, (owned, _))| (tp.clone(), owned.clone())));
        }
        let prepared = {
            let items: Vec<&Item> = pending.iter().map(|(i, _)| i).collect();
            commit::prepare(&self.catalog, &projected, &items, &skips)
        };
        match self.finish_writing(None).await {
            Ok(true) => self.start_writing(pending, skips, prepared, count, bytes),
            Ok(false) => {
                if self.commit(pending, skips).await.is_err() {
                    tracing::warn!("shutting down: batch left uncommitted");
                }
                self.in_flight.release(count, bytes);
            }
            Err(Abandoned) => self.in_flight.release(count, bytes),
        }
    }

    /// Starts writing a prepared batch on a runtime worker.
    fn start_writing(&mut self, pending: Vec<(Item, Record)>, skips: Skips, prepared: Prepared, count: usize, bytes: usize) {
        let span = self.commit_span(&pending);
        let (send, result) = oneshot::channel();
        let progress = prepared.progress.clone();
        let (pool, group) = (self.pool.clone(), self.group.clone());
        let task = tokio::spawn(
            async move {
                let _ = send.send(commit::write(&pool, &group, &prepared).await);
            }
            .instrument(span),
        );
        self.writing = Some(Writing { pending, skips, progress, count, bytes, started: Instant::now(), result, task });
    }

    /// Waits for the write in flight, if any (`result`: its outcome, if
    /// already known). `Ok(true)`: none, or it landed, and the partitions
    /// stand where it said; `Ok(false)`: it failed and its batch went the
    /// slow way, so what was prepared behind it must be prepared again.
    async fn finish_writing(&mut self, result: Option<Result<(), CommitError>>) -> Result<bool, Abandoned> {
        let Some(mut w) = self.writing.take() else { return Ok(true) };
        let result = match result {
            Some(result) => result,
            None => match self.shutdown.bounded(&mut w.result).await {
                Ok(result) => result.unwrap_or_else(|_| Err(CommitError::Lost)),
                Err(abandoned) => {
                    w.task.abort();
                    self.in_flight.release(w.count, w.bytes);
                    return Err(abandoned);
                }
            },
        };
        let outcome = match result {
            Ok(()) => {
                self.in_flight.sink_failing.store(false, Ordering::Relaxed);
                self.note_commit(w.started.elapsed(), w.pending.len(), &w.progress);
                self.owned.extend(w.progress.into_iter().map(|(tp, (owned, _))| (tp, owned)));
                w.pending.clear();
                self.spare = w.pending;
                Ok(true)
            }
            Err(e) => {
                tracing::debug!(error = ?e, "write failed; committing the batch again the slow way");
                self.commit(w.pending, w.skips).await.map(|()| false)
            }
        };
        self.in_flight.release(w.count, w.bytes);
        outcome
    }

    /// Decodes a record for every view of its topic; poison goes to the DLQ
    /// (acknowledged) before the batch that skips it can commit.
    async fn decode(&self, record: &mut Record) -> Result<Item, Abandoned> {
        let decoded = std::mem::replace(&mut record.decoded, Ok(Vec::new()));
        let mut item = Item {
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            high_watermark: record.high_watermark,
            changes: Vec::new(),
            dead: None,
        };
        match decoded {
            Ok(changes) => item.changes = changes,
            Err((poison, dlq_topic)) => {
                self.dead_letter(&mut item, record, &dlq_topic, "VALUE_CONVERTER", poison.class, &poison.message).await?;
            }
        }
        Ok(item)
    }

    #[tracing::instrument(name = "dead_letter", skip_all, fields(topic = record.topic, partition = record.partition, offset = record.offset, stage))]
    async fn dead_letter(
        &self,
        item: &mut Item,
        record: &Record,
        dlq_topic: &str,
        stage: &str,
        class: &str,
        message: &str,
    ) -> Result<(), Abandoned> {
        tracing::warn!(
            topic = record.topic,
            partition = record.partition,
            offset = record.offset,
            dlq_topic,
            class,
            message,
            "dead-lettering record"
        );
        let delivery = self.shutdown.bounded(self.dlq.send(dlq_topic, record, &Reason { stage, class, message }, &self.shutdown)).await??;
        // The table keeps the whole reason, and says what the topic lacks.
        let message = match delivery {
            Delivery::Written => message.to_string(),
            Delivery::Truncated { original_bytes } => format!("{message} (DLQ copy truncated: the value had {original_bytes} bytes)"),
            Delivery::NotWritten { error } => format!("{message} (not written to the DLQ topic: {error})"),
        };
        item.changes.clear();
        item.dead = Some(DeadLetter {
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            dlq_topic: dlq_topic.to_string(),
            error_class: class.to_string(),
            error_message: message,
        });
        Ok(())
    }

    /// Commits `pending` (items with their records) and `skips`, retrying
    /// transient failures until shutdown, isolating records Postgres
    /// rejects, and dropping partitions another owner has claimed.
    fn commit(&mut self, mut pending: Vec<(Item, Record)>, mut skips: Skips) -> Boxed<'_> {
        Box::pin(async move {
            let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(5));
            loop {
                // Partitions lost or being rewound: their records come again.
                pending.retain(|(i, _)| self.position.contains_key(&(i.topic.clone(), i.partition)));
                skips.retain(|tp, _| self.position.contains_key(tp));
                if pending.is_empty() && skips.is_empty() {
                    return Ok(());
                }
                let items: Vec<&Item> = pending.iter().map(|(i, _)| i).collect();
                let started = Instant::now();
                let span = self.commit_span(&pending);
                let committed = commit::commit(&self.pool, &self.group, &self.catalog, &self.owned, &items, &skips).instrument(span);
                match self.shutdown.bounded(committed).await? {
                    Ok(progress) => {
                        self.in_flight.sink_failing.store(false, Ordering::Relaxed);
                        self.note_commit(started.elapsed(), items.len(), &progress);
                        self.owned.extend(progress.into_iter().map(|(tp, (owned, _))| (tp, owned)));
                        return Ok(());
                    }
                    Err(CommitError::Fenced(lost)) => {
                        for tp in lost {
                            self.settle(tp).await;
                        }
                    }
                    Err(CommitError::Sql(e)) if commit::classify(&e) == Failure::Data => {
                        return self.isolate(pending, skips, &e).await;
                    }
                    Err(e) => {
                        self.in_flight.sink_failing.store(true, Ordering::Relaxed);
                        self.metrics.commit_retries.inc();
                        tracing::warn!(error = ?e, attempt = backoff.attempts(), "commit failed; partitions paused, retrying");
                        backoff.wait(&self.shutdown).await?;
                    }
                }
            }
        })
    }

    /// Postgres rejected something in `pending`: split until the record at
    /// fault is alone, dead-letter it, commit the rest, in offset order (the
    /// skips, past every record of their partitions, go last).
    /// An abandoned half stops the rest: committing the second half alone
    /// would skip the first.
    async fn isolate(&mut self, mut pending: Vec<(Item, Record)>, skips: Skips, error: &sqlx::Error) -> Result<(), Abandoned> {
        if pending.len() == 1 {
            let (item, record) = &mut pending[0];
            let dlq = self.catalog.views_of_topic(&record.topic).next().map(|v| v.dlq_topic(&record.topic)).unwrap_or_default();
            self.dead_letter(item, record, &dlq, "SINK", "freshet.sink.Rejected", &error.to_string()).await?;
            return self.commit(pending, skips).await;
        }
        let second = pending.split_off(pending.len() / 2);
        self.commit(pending, Skips::new()).await?;
        self.commit(second, skips).await
    }

    fn note_commit(&mut self, took: Duration, records: usize, progress: &Progress) {
        self.metrics.committed(took, records, progress.values().map(|(_, a)| a));
    }

    /// The span of one commit, linked to the traces of its records.
    fn commit_span(&self, pending: &[(Item, Record)]) -> tracing::Span {
        let span = tracing::info_span!(
            "commit",
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.consumer.group.name = self.group.as_str(),
            messaging.batch.message_count = pending.len(),
            db.system.name = "postgresql",
            trace_id = tracing::field::Empty,
        );
        link_producers(&span, pending);
        freshet_store::telemetry::record_trace_id(&span);
        span
    }
}

/// Links a commit span to the traces of the records it applies (W3C
/// `traceparent` in their headers): links, not a parent, since a batch has
/// many. Capped, so one huge batch cannot make a huge span.
fn link_producers(span: &tracing::Span, pending: &[(Item, Record)]) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    const MAX_LINKS: usize = 128;
    let mut linked = 0;
    for (_, record) in pending {
        if linked == MAX_LINKS {
            break;
        }
        if !record.headers.iter().any(|(k, _)| k == "traceparent") {
            continue;
        }
        let cx = freshet_store::telemetry::extract(record.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        let producer = cx.span().span_context().clone();
        if producer.is_valid() {
            span.add_link(producer);
            linked += 1;
        }
    }
}
