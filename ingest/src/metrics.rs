//! Ingest's Prometheus metrics: every family registered once, at start-up,
//! and recorded through typed handles (atomics).
//!
//! Per partition: records applied, dead-lettered and late, the committed
//! offset, the consumer lag, and the newest event and last commit as
//! timestamps (`time() - x` is an age that keeps growing when ingest stops).
//! Per batch: commit latency and size. Flow control: retries, pauses and
//! paused partitions. Compaction: deltas folded. Postgres sources, per
//! slot: WAL the slot retains on the source, and WAL not yet confirmed. Names, types and labels are what `deploy/validate.sh`,
//! the dashboard and the alert rules use (the test below holds them to it).
//!
//! Partition series appear with the partition's first commit; the others
//! are there, at 0, from the start.

use std::{
    sync::atomic::AtomicU64,
    time::{Duration, SystemTime},
};

use freshet_store::{
    metrics::{AtomicHistogram, SECONDS, SIZES},
    offsets::Advance,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SlotLabels {
    slot: String,
}

/// A gauge holding seconds since the epoch.
type Timestamp = Gauge<f64, AtomicU64>;

pub struct IngestMetrics {
    applied: Family<PartitionLabels, Counter>,
    dead_lettered: Family<PartitionLabels, Counter>,
    late: Family<PartitionLabels, Counter>,
    committed_offset: Family<PartitionLabels, Gauge>,
    consumer_lag: Family<PartitionLabels, Gauge>,
    newest_event: Family<PartitionLabels, Timestamp>,
    last_commit: Family<PartitionLabels, Timestamp>,
    commit_duration: AtomicHistogram,
    batch_records: AtomicHistogram,
    pub commit_retries: Counter,
    pub pauses: Counter,
    pub paused_partitions: Gauge,
    pub deltas_folded: Counter,
    slot_retained_wal: Family<SlotLabels, Gauge>,
    slot_confirmed_lag: Family<SlotLabels, Gauge>,
}

impl IngestMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = IngestMetrics {
            applied: Family::default(),
            dead_lettered: Family::default(),
            late: Family::default(),
            committed_offset: Family::default(),
            consumer_lag: Family::default(),
            newest_event: Family::default(),
            last_commit: Family::default(),
            commit_duration: AtomicHistogram::new(SECONDS),
            batch_records: AtomicHistogram::new(SIZES),
            commit_retries: Counter::default(),
            pauses: Counter::default(),
            paused_partitions: Gauge::default(),
            deltas_folded: Counter::default(),
            slot_retained_wal: Family::default(),
            slot_confirmed_lag: Family::default(),
        };
        // Counters are named without `_total`: the encoder adds it.
        let r = registry;
        r.register("freshet_ingest_records_applied", "Records applied to feature state", m.applied.clone());
        r.register("freshet_ingest_records_dead_lettered", "Records sent to the dead-letter topic", m.dead_lettered.clone());
        r.register("freshet_ingest_late_events", "Events later than the allowed lateness, kept out of windows", m.late.clone());
        r.register("freshet_ingest_committed_offset", "Next offset to apply, as committed", m.committed_offset.clone());
        r.register("freshet_ingest_consumer_lag_records", "High watermark minus committed offset", m.consumer_lag.clone());
        r.register("freshet_ingest_newest_event_timestamp_seconds", "Event time of the newest event applied", m.newest_event.clone());
        r.register("freshet_ingest_last_commit_timestamp_seconds", "When the partition last committed", m.last_commit.clone());
        r.register("freshet_ingest_commit_duration_seconds", "Time to commit one batch (state and offsets)", m.commit_duration.clone());
        r.register("freshet_ingest_batch_records", "Records per committed batch", m.batch_records.clone());
        r.register("freshet_ingest_commit_retries", "Commits retried after a transient failure", m.commit_retries.clone());
        r.register("freshet_ingest_pauses", "Times consumption was paused for flow control", m.pauses.clone());
        r.register("freshet_ingest_paused_partitions", "Partitions paused by flow control", m.paused_partitions.clone());
        r.register("freshet_ingest_deltas_folded", "Deltas folded into base rows by compaction", m.deltas_folded.clone());
        r.register(
            "freshet_ingest_slot_retained_wal_bytes",
            "WAL a Postgres source's slot keeps on the source, from its restart point",
            m.slot_retained_wal.clone(),
        );
        r.register(
            "freshet_ingest_slot_confirmed_lag_bytes",
            "Source WAL past what the slot's consumer confirmed (committed in Freshet)",
            m.slot_confirmed_lag.clone(),
        );
        m
    }

    /// One batch committed in `took`, with `records` records, advancing
    /// `partitions`. Once a batch, not a record: looking the partitions'
    /// series up by label here costs nothing next to the commit.
    pub fn committed<'a>(&self, took: Duration, records: usize, partitions: impl IntoIterator<Item = &'a Advance>) {
        self.commit_duration.observe(took.as_secs_f64());
        self.batch_records.observe(records as f64);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        for a in partitions {
            let labels = PartitionLabels { topic: a.topic.clone(), partition: a.partition };
            self.applied.get_or_create(&labels).inc_by(a.applied.max(0) as u64);
            self.dead_lettered.get_or_create(&labels).inc_by(a.dead.max(0) as u64);
            self.late.get_or_create(&labels).inc_by(a.late.max(0) as u64);
            self.committed_offset.get_or_create(&labels).set(a.next_offset);
            self.consumer_lag.get_or_create(&labels).set((a.high_watermark - a.next_offset).max(0));
            if let Some(newest) = a.newest_event_ms {
                self.newest_event.get_or_create(&labels).set(newest as f64 / 1000.0);
            }
            self.last_commit.get_or_create(&labels).set(now);
        }
    }
}

impl IngestMetrics {
    /// A Postgres source's slot, as last measured on the source.
    pub fn slot_wal(&self, slot: &str, retained_bytes: i64, confirmed_lag_bytes: i64) {
        let labels = SlotLabels { slot: slot.to_string() };
        self.slot_retained_wal.get_or_create(&labels).set(retained_bytes);
        self.slot_confirmed_lag.get_or_create(&labels).set(confirmed_lag_bytes);
    }
}

#[cfg(test)]
mod tests {
    use freshet_store::metrics::exported;

    use super::*;

    fn advance(topic: &str, partition: i32) -> Advance {
        Advance {
            topic: topic.into(),
            partition,
            epoch: 1,
            expected: 10,
            next_offset: 15,
            high_watermark: 20,
            newest_event_ms: Some(1_700_000_000_019),
            applied: 4,
            dead: 1,
            late: 0,
        }
    }

    fn render(registry: &Registry) -> String {
        freshet_store::metrics::render(registry).unwrap()
    }

    #[test]
    fn exports_what_the_deploy_checks_expect() {
        let mut registry = Registry::default();
        let metrics = IngestMetrics::new(&mut registry);
        // Partition series appear with a partition's first commit.
        metrics.committed(Duration::from_millis(3), 5, [&advance("t", 0)]);
        metrics.slot_wal("s", 1 << 20, 4096);
        let rendered = exported::rendered(&render(&registry));
        assert_eq!(rendered, exported::expected(include_str!("../../deploy/validate.sh"), &["freshet_ingest_"]));
    }

    #[test]
    fn counts_add_up_per_partition_and_gauges_hold_the_last_commit() {
        let mut registry = Registry::default();
        let metrics = IngestMetrics::new(&mut registry);
        let text = render(&registry);
        // Before any commit: the unlabelled ones are there, at 0.
        for series in
            ["freshet_ingest_commit_retries_total 0\n", "freshet_ingest_paused_partitions 0\n", "freshet_ingest_batch_records_count 0\n"]
        {
            assert!(text.contains(series), "{series} in {text}");
        }
        metrics.committed(Duration::from_millis(3), 5, [&advance("t", 0), &advance("t", 1)]);
        metrics.committed(Duration::from_millis(2), 5, [&Advance { next_offset: 20, ..advance("t", 0) }]);
        let text = render(&registry);
        for series in [
            "freshet_ingest_records_applied_total{topic=\"t\",partition=\"0\"} 8\n",
            "freshet_ingest_records_applied_total{topic=\"t\",partition=\"1\"} 4\n",
            "freshet_ingest_records_dead_lettered_total{topic=\"t\",partition=\"0\"} 2\n",
            "freshet_ingest_committed_offset{topic=\"t\",partition=\"0\"} 20\n",
            "freshet_ingest_consumer_lag_records{topic=\"t\",partition=\"0\"} 0\n",
            "freshet_ingest_consumer_lag_records{topic=\"t\",partition=\"1\"} 5\n",
            "freshet_ingest_newest_event_timestamp_seconds{topic=\"t\",partition=\"1\"} 1700000000.019\n",
            "freshet_ingest_commit_duration_seconds_count 2\n",
            "freshet_ingest_batch_records_bucket{le=\"10\"} 2\n",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
    }
}
