//! The rdkafka poll loop and the rebalance protocol.
//!
//! Offsets live in Postgres, not in Kafka. The protocol, with eager
//! rebalancing:
//!
//! - **Assign.** librdkafka calls `rebalance` on the poll thread with the new
//!   partitions. We send `SourceEvent::Assign` to the pipeline and block on
//!   its reply: the pipeline claims the partitions in Postgres (bumping their
//!   owner epoch, which fences any previous owner) and answers each stored
//!   offset. We put those offsets on the partition list and only then call
//!   `assign`, so consumption starts exactly where the last commit left off;
//!   no seek races the assignment.
//! - **Revoke.** We send `SourceEvent::Revoke` and block until the pipeline
//!   has committed or dropped everything it holds of those partitions, then
//!   `unassign`.
//! - **Flow control.** While the pipeline holds more than its bounds, or the
//!   sink is struggling, every assigned partition is paused; we keep polling
//!   so that the group membership stays alive and rebalances are served.
//!
//! Blocking here is fine: this is a dedicated OS thread, never the runtime.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, mpsc::TryRecvError},
    thread::JoinHandle,
    time::Duration,
};

use freshet_store::metrics::Metrics;
use rdkafka::{
    ClientConfig, ClientContext, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer, ConsumerContext},
    error::KafkaResult,
    message::Headers,
    statistics::Statistics,
    types::RDKafkaRespErr,
};
use tokio::sync::{mpsc, oneshot};

use super::{Command, Record, SharedInFlight, SourceEvent, Start, TopicPartition};

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
    pub metrics: Arc<Metrics>,
}

struct Context {
    events: mpsc::Sender<SourceEvent>,
    /// High watermarks from librdkafka's statistics (once a second); both
    /// callbacks run on the poll thread, so the lock is never contended.
    high_watermarks: Mutex<HashMap<TopicPartition, i64>>,
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        let mut marks = self.high_watermarks.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, t) in statistics.topics {
            for (partition, p) in t.partitions {
                if partition >= 0 && p.hi_offset >= 0 {
                    marks.insert((topic.clone(), partition), p.hi_offset);
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
                    let offset = match start {
                        Start::Offset(o) => Offset::Offset(*o),
                        Start::Beginning => Offset::Beginning,
                        Start::End => Offset::End,
                    };
                    if let Err(e) = tpl.set_partition_offset(topic, *partition, offset) {
                        tracing::error!(error = %e, topic, partition, "cannot set start offset");
                    }
                }
                if starts.len() != tpl.count() {
                    // The pipeline is gone (shutting down): take nothing.
                    tracing::warn!("assignment not claimed; leaving it unassigned");
                    let _ = consumer.unassign();
                    return;
                }
                tracing::info!(partitions = ?starts, "assigned");
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let (reply, done) = oneshot::channel();
                if self.events.blocking_send(SourceEvent::Revoke { partitions: partitions.clone(), reply }).is_ok() {
                    let _ = done.blocking_recv();
                }
                tracing::info!(?partitions, "revoked");
                let _ = consumer.unassign();
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; unassigning");
                let _ = consumer.unassign();
            }
        }
    }
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
        .set("partition.assignment.strategy", "range")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "300000")
        // Bound librdkafka's own prefetch so memory stays flat when far behind.
        .set("queued.max.messages.kbytes", "8192")
        .set("fetch.max.bytes", "8388608")
        .set("max.partition.fetch.bytes", "1048576")
        .set("statistics.interval.ms", "1000")
        // Notice soon a subscribed topic that did not exist yet (Debezium
        // creates a table's topic with its first change).
        .set("topic.metadata.refresh.interval.ms", "5000")
        .create_with_context(Context { events: events_tx.clone(), high_watermarks: Mutex::default() })?;
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
    loop {
        match commands.try_recv() {
            Ok(Command::Stop) | Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {}
        }
        let over = in_flight.over(settings.max_in_flight_records, settings.max_in_flight_bytes);
        if over != paused {
            if let Ok(assignment) = consumer.assignment() {
                let result = if over { consumer.pause(&assignment) } else { consumer.resume(&assignment) };
                match result {
                    Ok(()) => {
                        paused = over;
                        let count = if over { assignment.count() } else { 0 };
                        settings.metrics.set("freshet_ingest_paused_partitions", "Partitions paused by flow control.", &[], count as f64);
                        if over {
                            settings.metrics.add("freshet_ingest_pauses_total", "Times consumption was paused for flow control.", &[], 1.0);
                        }
                        tracing::debug!(paused, partitions = assignment.count(), "flow control");
                    }
                    Err(e) => tracing::warn!(error = %e, "pause/resume failed"),
                }
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
        let high_watermark = {
            let marks = consumer.context().high_watermarks.lock().unwrap_or_else(|e| e.into_inner());
            marks.get(&(message.topic().to_string(), message.partition())).copied().unwrap_or(-1).max(message.offset() + 1)
        };
        let record = Record {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            timestamp_ms: message.timestamp().to_millis(),
            headers: message
                .headers()
                .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect())
                .unwrap_or_default(),
            high_watermark,
        };
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
