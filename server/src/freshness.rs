//! Freshness verdicts: how far behind its source a view is, from what ingest
//! committed per partition (offsets, high watermark, newest event, last
//! commit) and the view's budget; for a direct Postgres view, also the WAL
//! its slot holds on the source.

use std::time::Duration;

use freshet_proto::v1::{FreshnessVerdict, PartitionFreshness, ReplicationSlot};
use freshet_store::{offsets::PartitionStatus, view::PostgresSource};

use crate::service::timestamp;

/// What GetFreshness says of one partition as of `now_ms`.
///
/// A direct Postgres view's pseudo-partition (`postgres:<slot>`) also gets
/// its slot's retained WAL and confirmed-flush lag from `slots`: what the
/// server read from the source database's `pg_replication_slots` for this
/// call. Read there, not stored by ingest with its checkpoint, because the
/// figures matter most when ingest is down or stuck: then the slot keeps
/// growing while a stored figure would stay frozen at ingest's last commit.
/// The server reads that view for its `replication_slots` list anyway, so
/// this costs no query; without `--source-database-url` (or with a slot on
/// another server) the fields stay unset, and ingest's metrics still have
/// them.
pub fn partition(p: &PartitionStatus, budget: Duration, now_ms: i64, slots: &[ReplicationSlot]) -> PartitionFreshness {
    let slot = slots.iter().find(|s| PostgresSource::topic(&s.name) == p.topic);
    PartitionFreshness {
        topic: p.topic.clone(),
        partition: p.partition,
        committed_offset: p.next_offset,
        high_watermark: p.high_watermark,
        lag_records: lag(p),
        newest_event_time: p.newest_event_ms.map(timestamp),
        last_commit_time: p.last_commit_ms.map(timestamp),
        verdict: verdict(p, budget, now_ms) as i32,
        retained_wal_bytes: slot.map(|s| s.retained_bytes),
        confirmed_lag_bytes: slot.map(|s| s.lag_bytes),
    }
}

/// The verdict for one partition as of `now_ms`.
///
/// Caught up is fresh however old the newest event is (a quiet source is not
/// a late one). Behind: lagging while the newest applied event is within the
/// budget, stale beyond it, stalled when ingest has not committed within the
/// budget either (it is not moving).
pub fn verdict(p: &PartitionStatus, budget: Duration, now_ms: i64) -> FreshnessVerdict {
    let Some(last_commit_ms) = p.last_commit_ms else {
        return FreshnessVerdict::Unknown;
    };
    let budget_ms = budget.as_millis() as i64;
    // Ingest commits the consumer's position, which moves past transaction
    // markers and aborted records: a caught-up partition has no lag at all.
    if lag(p) == 0 {
        return FreshnessVerdict::Fresh;
    }
    let age_ms = p.newest_event_ms.map_or(i64::MAX, |t| now_ms - t);
    if now_ms - last_commit_ms > budget_ms {
        FreshnessVerdict::Stalled
    } else if age_ms > budget_ms {
        FreshnessVerdict::Stale
    } else {
        FreshnessVerdict::Lagging
    }
}

pub fn lag(p: &PartitionStatus) -> i64 {
    if p.next_offset < 0 { p.high_watermark.max(0) } else { (p.high_watermark - p.next_offset).max(0) }
}

/// A view is as fresh as its worst partition.
pub fn worst(verdicts: impl IntoIterator<Item = FreshnessVerdict>) -> FreshnessVerdict {
    let rank = |v: &FreshnessVerdict| match v {
        FreshnessVerdict::Fresh => 0,
        FreshnessVerdict::Lagging => 1,
        FreshnessVerdict::Stale => 2,
        FreshnessVerdict::Stalled => 3,
        _ => 4,
    };
    verdicts.into_iter().max_by_key(rank).unwrap_or(FreshnessVerdict::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(next: i64, hw: i64, newest: Option<i64>, commit: Option<i64>) -> PartitionStatus {
        PartitionStatus {
            topic: "t".into(),
            partition: 0,
            next_offset: next,
            high_watermark: hw,
            newest_event_ms: newest,
            last_commit_ms: commit,
            records_applied: 0,
            records_dead: 0,
            records_late: 0,
        }
    }

    #[test]
    fn verdicts() {
        let budget = Duration::from_secs(5);
        let now = 100_000;
        assert_eq!(verdict(&status(10, 10, Some(0), Some(0)), budget, now), FreshnessVerdict::Fresh);
        assert_eq!(verdict(&status(10, 11, Some(now - 1000), Some(now - 100)), budget, now), FreshnessVerdict::Lagging);
        assert_eq!(verdict(&status(10, 50, Some(now - 1000), Some(now - 100)), budget, now), FreshnessVerdict::Lagging);
        assert_eq!(verdict(&status(10, 50, Some(now - 9000), Some(now - 100)), budget, now), FreshnessVerdict::Stale);
        assert_eq!(verdict(&status(10, 50, Some(now - 9000), Some(now - 9000)), budget, now), FreshnessVerdict::Stalled);
        assert_eq!(verdict(&status(-1, 50, None, None), budget, now), FreshnessVerdict::Unknown);
        assert_eq!(lag(&status(10, 50, None, None)), 40);
        assert_eq!(worst([FreshnessVerdict::Fresh, FreshnessVerdict::Stale, FreshnessVerdict::Lagging]), FreshnessVerdict::Stale);
    }

    #[test]
    fn a_slot_partition_reports_its_wal_and_a_kafka_one_none() {
        let slots = [ReplicationSlot { name: "app".into(), active: false, lag_bytes: 300, retained_bytes: 500 }];
        let budget = Duration::from_secs(5);
        let slot = partition(&PartitionStatus { topic: "postgres:app".into(), ..status(10, 10, None, Some(0)) }, budget, 0, &slots);
        assert_eq!((slot.retained_wal_bytes, slot.confirmed_lag_bytes), (Some(500), Some(300)));
        // A topic that happens to share the slot's name is not the slot.
        let kafka = partition(&PartitionStatus { topic: "app".into(), ..status(10, 10, None, Some(0)) }, budget, 0, &slots);
        assert_eq!((kafka.retained_wal_bytes, kafka.confirmed_lag_bytes), (None, None));
        let unknown = partition(&PartitionStatus { topic: "postgres:other".into(), ..status(10, 10, None, Some(0)) }, budget, 0, &slots);
        assert_eq!(unknown.retained_wal_bytes, None);
    }
}
