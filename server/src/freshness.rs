//! Freshness verdicts: how far behind its source a view is, from what ingest
//! committed per partition (offsets, high watermark, newest event, last
//! commit) and the view's budget.

use std::time::Duration;

use freshet_proto::v1::FreshnessVerdict;
use freshet_store::offsets::PartitionStatus;

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
}
