//! The rdkafka poll loop and the rebalance protocol.
//!
//! Offsets live in Postgres, not in Kafka. The protocol, with cooperative
//! (incremental) rebalancing, so that a member joining or leaving moves only
//! the partitions that change hands while the others keep flowing:
//!
//! - **Assign.** librdkafka calls `rebalance` on the poll thread with the
//!   partitions added to this member. We send `SourceEvent::Assign` to the
//!   pipeline and block on its reply: the pipeline claims the partitions in
//!   Postgres (bumping their owner epoch, which fences any previous owner) and
//!   answers each stored offset. We put those offsets on the partition list
//!   and only then call `incremental_assign`, so consumption starts exactly
//!   where the last commit left off; no seek races the assignment.
//! - **Revoke.** We send `SourceEvent::Revoke` with the partitions taken away
//!   and block until the pipeline has committed or dropped everything it holds
//!   of them, then `incremental_unassign`.
//! - **Progress.** read_committed never delivers transaction markers or
//!   aborted records, so "last delivered offset + 1" would stay below the
//!   end of a partition for good. The consumer's position does move past
//!   them; when it is ahead of what was delivered we send
//!   `SourceEvent::Progress`, and the pipeline commits it like a record that
//!   changes nothing. Positions only move in fetch order, so every offset
//!   below one was delivered or was never meant to be.
//! - **Rewind.** If a commit finds the store, still owned by us, at another
//!   offset than expected (Postgres lost its newest commits in a crash), the
//!   pipeline sends `Command::Rewind`; we seek there and answer
//!   `SourceEvent::Rewound`. A seek discards what librdkafka had fetched
//!   for the partition, and the pipeline drops the partition's records
//!   until the answer arrives, so nothing from before the seek is applied.
//! - **Flow control.** While the pipeline holds more than its bounds, or the
//!   sink is struggling, every assigned partition is paused (including those
//!   assigned while paused); we keep polling so that the group membership
//!   stays alive and rebalances are served.
//!
//! Blocking here is fine: this is a dedicated OS thread, never the runtime.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc::TryRecvError,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, ClientContext, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol},
    error::KafkaResult,
    message::Headers,
    statistics::Statistics,
    types::RDKafkaRespErr,
};
use tokio::sync::{mpsc, oneshot};

use freshet_store::view::Catalog;

use super::{Command, Record, SharedInFlight, SourceEvent, Start, TopicPartition};
use crate::metrics::IngestMetrics;
use crate::transform::decode::decode_record;

/// Where to start a partition that has no stored offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StartPolicy {
    Earliest,
    Latest,
}

pub struct Settings {
    pub brokers: String,
    pub group: String,
    pub instance_id: Option<String>,
    pub topics: Vec<String>,
    pub max_in_flight_records: usize,
    pub max_in_flight_bytes: usize,
    /// The views records are decoded for.
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<IngestMetrics>,
}

/// How often the poll loop compares positions with what it delivered.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

struct Context {
    events: mpsc::Sender<SourceEvent>,
    /// Last stable offsets from librdkafka's statistics (once a second): the
    /// end of what read_committed can read. The callbacks and the poll loop
    /// all run on the poll thread, so these locks are never contended.
    high_watermarks: Mutex<HashMap<TopicPartition, i64>>,
    /// Per assigned partition, the offset after the last record handed to
    /// the pipeline (or the start offset), to tell when the position moved
    /// past records that are never delivered.
    delivered: Mutex<HashMap<TopicPartition, i64>>,
    /// Whether flow control has paused consumption.
    paused: AtomicBool,
}

impl Context {
    fn high_watermark(&self, tp: &TopicPartition) -> i64 {
        self.high_watermarks.lock().unwrap_or_else(|e| e.into_inner()).get(tp).copied().unwrap_or(-1)
    }

    fn delivered(&self) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, i64>> {
        self.delivered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Consumption of `tp` (re)starts at `start`: nothing is delivered yet.
    fn starts_at(&self, tp: &TopicPartition, start: Start) {
        match start {
            Start::Offset(o) => self.delivered().insert(tp.clone(), o),
            Start::Beginning | Start::End => self.delivered().remove(tp),
        };
    }
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        let mut marks = self.high_watermarks.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, t) in statistics.topics {
            for (partition, p) in t.partitions {
                if partition >= 0 && p.ls_offset >= 0 {
                    marks.insert((topic.clone(), partition), p.ls_offset);
                }
            }
        }
    }
}

impl ConsumerContext for Context {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let partitions: Vec<TopicPartition> = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let (reply, answer) = oneshot::channel();
                let starts = match self.events.blocking_send(SourceEvent::Assign { partitions, reply }) {
                    Ok(()) => answer.blocking_recv().unwrap_or_default(),
                    Err(_) => Vec::new(),
                };
                for ((topic, partition), start) in &starts {
                    if let Err(e) = tpl.set_partition_offset(topic, *partition, offset(*start)) {
                        tracing::error!(error = %e, topic, partition, "cannot set start offset");
                    }
                }
                if starts.len() != tpl.count() {
                    // The pipeline is gone (shutting down): take nothing.
                    tracing::warn!("assignment not claimed; leaving it unassigned");
                    return;
                }
                tracing::info!(partitions = ?starts, "assigned");
                for (tp, start) in &starts {
                    self.starts_at(tp, *start);
                }
                let assigned = if cooperative(consumer) { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                if let Err(e) = assigned {
                    tracing::error!(error = %e, "assign failed");
                } else if self.paused.load(Ordering::Relaxed) {
                    // Flow control paused the partitions we had; these too.
                    if let Err(e) = consumer.pause(tpl) {
                        tracing::warn!(error = %e, "cannot pause newly assigned partitions");
                    }
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let (reply, done) = oneshot::channel();
                if self.events.blocking_send(SourceEvent::Revoke { partitions: partitions.clone(), reply }).is_ok() {
                    let _ = done.blocking_recv();
                }
                tracing::info!(?partitions, lost = consumer.assignment_lost(), "revoked");
                self.delivered().retain(|tp, _| !partitions.contains(tp));
                let _ = if cooperative(consumer) { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; unassigning");
                let _ = match consumer.assignment() {
                    Ok(all) if cooperative(consumer) => consumer.incremental_unassign(&all),
                    _ => consumer.unassign(),
                };
            }
        }
    }
}

fn offset(start: Start) -> Offset {
    match start {
        Start::Offset(o) => Offset::Offset(o),
        Start::Beginning => Offset::Beginning,
        Start::End => Offset::End,
    }
}

fn cooperative(consumer: &BaseConsumer<Context>) -> bool {
    matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative)
}

/// Starts the poll thread. Records and rebalances arrive on the returned
/// receiver; commands go to the returned sender.
pub fn spawn(
    settings: Settings,
    in_flight: SharedInFlight,
) -> KafkaResult<(mpsc::Receiver<SourceEvent>, std::sync::mpsc::Sender<Command>, JoinHandle<()>)> {
    let (events_tx, events_rx) = mpsc::channel(settings.max_in_flight_records.max(16));
    let (commands_tx, commands_rx) = std::sync::mpsc::channel();
    let mut config = ClientConfig::new();
    if let Some(id) = &settings.instance_id {
        config.set("group.instance.id", id);
    }
    let consumer: BaseConsumer<Context> = config
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // Used only if a stored offset is out of range (retention passed it).
        .set("auto.offset.reset", "earliest")
        // Incremental rebalances: only partitions that change hands stop.
        .set("partition.assignment.strategy", "cooperative-sticky")
        // A dead member's partitions move after 6 s (the broker's minimum by
        // default); a restarted one with the same group.instance.id takes
        // them back at once. Fencing never depends on these timings.
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "300000")
        // Bound librdkafka's own prefetch so memory stays flat when far behind.
        .set("queued.max.messages.kbytes", "8192")
        // ...and fetch again soon once it drains (the default waits a second
        // after the queue was full; alone it did not change the measured
        // rate, the resume below did).
        .set("fetch.queue.backoff.ms", "10")
        .set("fetch.max.bytes", "8388608")
        .set("max.partition.fetch.bytes", "1048576")
        .set("statistics.interval.ms", "1000")
        // Notice soon a subscribed topic that did not exist yet (Debezium
        // creates a table's topic with its first change).
        .set("topic.metadata.refresh.interval.ms", "5000")
        .create_with_context(Context {
            events: events_tx.clone(),
            high_watermarks: Mutex::default(),
            delivered: Mutex::default(),
            paused: AtomicBool::new(false),
        })?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let handle = std::thread::Builder::new()
        .name("kafka-poll".into())
        .spawn(move || poll_loop(consumer, events_tx, commands_rx, in_flight, settings))
        .expect("spawn poll thread");
    Ok((events_rx, commands_tx, handle))
}

fn poll_loop(
    consumer: BaseConsumer<Context>,
    events: mpsc::Sender<SourceEvent>,
    commands: std::sync::mpsc::Receiver<Command>,
    in_flight: SharedInFlight,
    settings: Settings,
) {
    let mut paused = false;
    let mut progress_checked = Instant::now();
    let mut rewinds: Vec<(TopicPartition, Start, i64)> = Vec::new();
    'poll: loop {
        loop {
            match commands.try_recv() {
                Ok(Command::Stop) | Err(TryRecvError::Disconnected) => break 'poll,
                Ok(Command::Rewind { partition, start, epoch }) => rewinds.push((partition, start, epoch)),
                Err(TryRecvError::Empty) => break,
            }
        }
        match rewind(&consumer, &events, std::mem::take(&mut rewinds)) {
            Ok(failed) => rewinds = failed,
            Err(()) => break,
        }
        let over = in_flight.over(settings.max_in_flight_records, settings.max_in_flight_bytes, paused);
        if over != paused
            && let Ok(assignment) = consumer.assignment()
        {
            let result = if over { consumer.pause(&assignment) } else { resume(&consumer, &assignment) };
            match result {
                Ok(()) => {
                    paused = over;
                    consumer.context().paused.store(over, Ordering::Relaxed);
                    let count = if over { assignment.count() } else { 0 };
                    settings.metrics.paused_partitions.set(count as i64);
                    if over {
                        settings.metrics.pauses.inc();
                    }
                    tracing::debug!(paused, partitions = assignment.count(), "flow control");
                }
                Err(e) => tracing::warn!(error = %e, "pause/resume failed"),
            }
        }
        // Before polling: every record polled so far has been handed over,
        // so a position ahead of `delivered` is one past undelivered offsets.
        if progress_checked.elapsed() >= PROGRESS_EVERY {
            progress_checked = Instant::now();
            if report_progress(&consumer, &events).is_err() {
                break;
            }
        }
        let Some(result) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = match result {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "consumer error");
                continue;
            }
        };
        let tp = (message.topic().to_string(), message.partition());
        let high_watermark = consumer.context().high_watermark(&tp).max(message.offset() + 1);
        consumer.context().delivered().insert(tp, message.offset() + 1);
        let payload = message.payload();
        let timestamp_ms = message.timestamp().to_millis();
        let decoded = decode_record(&settings.catalog, message.topic(), payload, timestamp_ms);
        let record = Record {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: payload.map(<[u8]>::to_vec),
            timestamp_ms,
            headers: message
                .headers()
                .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect())
                .unwrap_or_default(),
            high_watermark,
            decoded,
            size: 0,
        }
        .measured();
        in_flight.add(&record);
        if events.blocking_send(SourceEvent::Record(record)).is_err() {
            break;
        }
    }
    // Leave the group: librdkafka revokes (our context replies at once, the
    // pipeline being gone) and closes cleanly.
    consumer.unsubscribe();
    drop(consumer);
}

/// Resumes `assignment`, and seeks each partition to where it stands: on a
/// resume alone librdkafka fetches again only at its next periodic wake-up
/// (up to a second later, which held catch-up to a fifth of its speed); a
/// seek wakes its fetcher at once. Pausing dropped whatever was prefetched,
/// so the seek discards nothing.
fn resume(consumer: &BaseConsumer<Context>, assignment: &TopicPartitionList) -> KafkaResult<()> {
    consumer.resume(assignment)?;
    let mut here = TopicPartitionList::new();
    for element in consumer.position()?.elements() {
        // A partition with nothing consumed yet has no position to seek to.
        if let Offset::Offset(offset) = element.offset() {
            here.add_partition_offset(element.topic(), element.partition(), Offset::Offset(offset))?;
        }
    }
    if here.count() > 0 {
        consumer.seek_partitions(here, Duration::ZERO)?;
    }
    Ok(())
}

/// Seeks each partition to its start and tells the pipeline. Returns the
/// seeks that failed, to try again on the next turn (the pipeline drops the
/// partition's records meanwhile); a partition no longer assigned is
/// forgotten. Errs once the pipeline is gone.
fn rewind(
    consumer: &BaseConsumer<Context>,
    events: &mpsc::Sender<SourceEvent>,
    rewinds: Vec<(TopicPartition, Start, i64)>,
) -> Result<Vec<(TopicPartition, Start, i64)>, ()> {
    let mut failed = Vec::new();
    for (tp, start, epoch) in rewinds {
        if let Err(e) = consumer.seek(&tp.0, tp.1, offset(start), Duration::from_secs(5)) {
            let assigned = consumer.assignment().is_ok_and(|a| a.find_partition(&tp.0, tp.1).is_some());
            tracing::warn!(error = %e, topic = tp.0, partition = tp.1, assigned, "seek failed");
            if assigned {
                failed.push((tp, start, epoch));
            }
            continue;
        }
        consumer.context().starts_at(&tp, start);
        tracing::info!(topic = tp.0, partition = tp.1, ?start, "rewound");
        events.blocking_send(SourceEvent::Rewound { partition: tp, start, epoch }).map_err(drop)?;
    }
    Ok(failed)
}

/// Tells the pipeline about partitions whose position moved past what was
/// delivered (see "Progress" above). Errs once the pipeline is gone.
fn report_progress(consumer: &BaseConsumer<Context>, events: &mpsc::Sender<SourceEvent>) -> Result<(), ()> {
    let Ok(positions) = consumer.position() else { return Ok(()) };
    let context = consumer.context();
    for element in positions.elements() {
        let Offset::Offset(position) = element.offset() else { continue };
        let tp = (element.topic().to_string(), element.partition());
        let moved = context.delivered().get(&tp).is_none_or(|&delivered| position > delivered);
        if !moved {
            continue;
        }
        context.delivered().insert(tp.clone(), position);
        let high_watermark = context.high_watermark(&tp).max(position);
        events.blocking_send(SourceEvent::Progress { partition: tp, next_offset: position, high_watermark }).map_err(drop)?;
    }
    Ok(())
}
