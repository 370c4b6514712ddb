//! Where a record enters: the Kafka source (and, in `postgres/`, the
//! direct Postgres source).
//!
//! The rdkafka poll loop runs on a thread of its own (`consumer.rs`) and
//! talks to the async pipeline only through two typed channels: it sends
//! [`SourceEvent`]s (records, positions, assignments, revocations, rewinds)
//! and receives [`Command`]s (rewind, stop). Flow control needs no command:
//! the poll loop pauses every assigned partition while [`InFlight`] is over
//! its bounds, or while the sink is failing with records in flight, and
//! resumes when that clears.

mod consumer;
pub mod postgres;
mod retention;

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

pub use consumer::{Settings, StartPolicy, spawn};
pub use retention::earliest_offsets;
use tokio::sync::oneshot;

use crate::transform::decode::Decoded;

/// A record copied out of librdkafka, and decoded there: decoding is the
/// costliest step per record, and on the poll thread it runs while the
/// pipeline commits the batch before.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The partition's high watermark as last seen by the consumer.
    pub high_watermark: i64,
    /// What it makes of every view of its topic (taken by the pipeline).
    pub decoded: Decoded,
    /// What it holds in memory, roughly, decoded changes included (they
    /// outweigh the payload): the in-flight bound counts this. Measured once,
    /// on the poll thread, before the pipeline moves the changes out.
    pub size: usize,
}

impl Record {
    /// Sets [`Record::size`].
    pub fn measured(mut self) -> Self {
        self.size = self.measure();
        self
    }

    fn measure(&self) -> usize {
        let decoded: usize = match &self.decoded {
            Ok(changes) => changes
                .iter()
                .map(|(_, _, e)| 128 + e.entity.len() + e.fields.iter().map(|(k, v)| 96 + k.len() + scalar_size(v)).sum::<usize>())
                .sum(),
            Err((poison, topic)) => 64 + poison.message.len() + topic.len(),
        };
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len) + 160 + decoded
    }
}

fn scalar_size(value: &freshet_store::state::Scalar) -> usize {
    match value {
        freshet_store::state::Scalar::Str(s) => s.len(),
        _ => 0,
    }
}

pub type TopicPartition = (String, i32);

pub enum SourceEvent {
    Record(Record),
    /// Partitions were assigned. The poll thread waits for the reply: where
    /// to start each partition, read from the store after claiming it.
    Assign {
        partitions: Vec<TopicPartition>,
        reply: oneshot::Sender<Vec<(TopicPartition, Start)>>,
    },
    /// The consumer's position in a partition moved past offsets it never
    /// delivers (transaction markers, aborted records): everything below
    /// `next_offset` was delivered or is not to be applied.
    Progress {
        partition: TopicPartition,
        next_offset: i64,
        high_watermark: i64,
    },
    /// A [`Command::Rewind`] took effect: records of the partition from here
    /// on start at `start`.
    Rewound {
        partition: TopicPartition,
        start: Start,
        epoch: i64,
    },
    /// Partitions are being revoked. The poll thread waits for the reply,
    /// sent once nothing of theirs can be committed by this instance.
    Revoke {
        partitions: Vec<TopicPartition>,
        reply: oneshot::Sender<()>,
    },
}

/// Where to start consuming a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Offset(i64),
    Beginning,
    End,
}

pub enum Command {
    /// Consume the partition again from `start`: the store, still ours,
    /// stands elsewhere than the pipeline thought (it lost its newest
    /// commits in a crash), and the store is the truth.
    /// `epoch` is the owner epoch it was asked under, returned in the answer.
    Rewind { partition: TopicPartition, start: Start, epoch: i64 },
    /// Leave the group and end the poll thread.
    Stop,
}

/// What has been handed to the pipeline and not yet committed or dropped.
///
/// A slow sink needs no flag of its own: records pile up while a commit
/// runs, the bounds are reached and consumption pauses until the commit
/// frees them, so memory stays bounded and batches grow to their limit.
#[derive(Default)]
pub struct InFlight {
    records: AtomicUsize,
    bytes: AtomicUsize,
    /// Set by the sink while a commit is failing and being retried.
    pub sink_failing: AtomicBool,
}

impl InFlight {
    pub fn add(&self, record: &Record) {
        self.records.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(record.size, Ordering::Relaxed);
    }

    pub fn release(&self, records: usize, bytes: usize) {
        self.records.fetch_sub(records, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Whether to be paused, given whether we are. Pause at the bounds,
    /// resume below half of them: every resume restarts librdkafka's
    /// fetches, and resuming as soon as one batch commits (a pause per
    /// batch) held ingest to a fifth of its speed. A failing sink pauses
    /// only while it holds records: the commit of those clears the flag or
    /// is retried; with nothing in flight no commit could ever clear it, and
    /// consumption must go on.
    fn over(&self, max_records: usize, max_bytes: usize, paused: bool) -> bool {
        let (max_records, max_bytes) = if paused { (max_records / 2, max_bytes / 2) } else { (max_records, max_bytes) };
        let records = self.records.load(Ordering::Relaxed);
        records >= max_records.max(1)
            || self.bytes.load(Ordering::Relaxed) >= max_bytes.max(1)
            || (records > 0 && self.sink_failing.load(Ordering::Relaxed))
    }
}

pub type SharedInFlight = Arc<InFlight>;
