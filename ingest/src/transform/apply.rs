//! Applying decoded events to entity state, in record order, with lateness
//! judged against the partition's newest event time.
//!
//! The reference for lateness is committed with the offsets, so replaying a
//! batch after a crash makes the same late/not-late decisions. One record
//! cannot move it far: decode dead-letters events dated more than the view's
//! `max_future` ahead of their record. As a second guard (and for a reference
//! stored before that check existed) lateness is never judged against a time
//! ahead of the wall clock; that can only let more events into windows.
//! Lateness applies to additions; a retraction always takes its event out of
//! the tile that holds it (a no-op once the tile has aged out). The one case
//! this gets wrong is a row that arrived too late to be counted and is later
//! deleted: rare, and such rows are already counted as late.

use std::collections::HashMap;

use chrono::Utc;
use freshet_store::{
    entities::RowKey,
    state::{Direction, EntityState, Event},
    view::Catalog,
};

/// One change to one view's entity: (index of the view in the catalog, direction, event).
pub type Change = (usize, Direction, Event);

/// Applies `changes` (all from one partition, in offset order) to `states`,
/// advancing `newest_ms`, the partition's newest event time. Returns how many
/// events were too late for windows.
pub fn apply(catalog: &Catalog, states: &mut HashMap<RowKey, EntityState>, changes: &[Change], newest_ms: &mut Option<i64>) -> i64 {
    apply_as_of(catalog, states, changes, newest_ms, Utc::now().timestamp_millis())
}

/// [`apply`] with the wall clock at `now_ms`.
fn apply_as_of(
    catalog: &Catalog,
    states: &mut HashMap<RowKey, EntityState>,
    changes: &[Change],
    newest_ms: &mut Option<i64>,
    now_ms: i64,
) -> i64 {
    let mut late = 0;
    for (v, direction, event) in changes {
        let view = &catalog.views[*v];
        let newest = newest_ms.unwrap_or(i64::MIN);
        let reference = newest.min(now_ms);
        // Lateness gates additions only: a retraction (a row deleted hours
        // later) must take its event back out of whatever tile still holds it.
        let in_windows =
            *direction == Direction::Retract || event.at_ms >= reference.saturating_sub(view.allowed_lateness.as_millis() as i64);
        if !in_windows {
            late += 1;
        }
        if *direction == Direction::Add {
            *newest_ms = Some(newest.max(event.at_ms));
        }
        let state = states.entry((view.name.clone(), event.entity.clone())).or_default();
        state.apply(view, event, *direction, in_windows);
    }
    late
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshet_store::state::Reading;
    use std::collections::BTreeMap;

    fn catalog() -> Catalog {
        Catalog::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/reference.toml"))).unwrap()
    }

    fn e(at_ms: i64) -> Event {
        Event { entity: "1".into(), at_ms, fields: BTreeMap::new() }
    }

    #[test]
    fn events_past_allowed_lateness_are_counted_and_kept_out_of_windows() {
        let catalog = catalog();
        let v = catalog.views.iter().position(|v| v.name == "user_activity").unwrap();
        let base = 1_000_000_000;
        // Lateness is 1m: 30 s late is fine, 2 min late is not.
        let changes = vec![(v, Direction::Add, e(base)), (v, Direction::Add, e(base - 30_000)), (v, Direction::Add, e(base - 120_000))];
        let mut states = HashMap::new();
        let mut newest = None;
        assert_eq!(apply(&catalog, &mut states, &changes, &mut newest), 1);
        assert_eq!(newest, Some(base));
        let state = &states[&("user_activity".to_string(), "1".to_string())];
        let hour = catalog.views[v].feature("events_1h").unwrap();
        assert_eq!(state.read(hour, base), Reading::Value { value: freshet_store::state::Scalar::Int(2), at_ms: base });

        // Deleting the half-minute-late row much later still takes it back.
        let retract = vec![(v, Direction::Add, e(base + 600_000)), (v, Direction::Retract, e(base - 30_000))];
        assert_eq!(apply(&catalog, &mut states, &retract, &mut newest), 0);
        let state = &states[&("user_activity".to_string(), "1".to_string())];
        assert_eq!(state.read(hour, base + 600_000), Reading::Value { value: freshet_store::state::Scalar::Int(2), at_ms: base + 600_000 });
    }

    /// A reference far in the future (stored before decode refused such
    /// events) does not push current events out of windows.
    #[test]
    fn lateness_is_never_judged_against_a_time_ahead_of_the_clock() {
        let catalog = catalog();
        let v = catalog.views.iter().position(|v| v.name == "user_activity").unwrap();
        let now = 1_795_600_800_000;
        let year_2100 = 4_102_444_800_000;
        let mut newest = Some(year_2100);
        let mut states = HashMap::new();
        // Lateness is 1m: 30 s before now is in windows, 2 min before is late.
        let changes = vec![(v, Direction::Add, e(now - 30_000)), (v, Direction::Add, e(now - 120_000))];
        assert_eq!(apply_as_of(&catalog, &mut states, &changes, &mut newest, now), 1);
        assert_eq!(newest, Some(year_2100), "the stored reference only grows; the clamp is applied when judging");
        let hour = catalog.views[v].feature("events_1h").unwrap();
        let state = &states[&("user_activity".to_string(), "1".to_string())];
        assert_eq!(state.read(hour, now), Reading::Value { value: freshet_store::state::Scalar::Int(1), at_ms: now - 30_000 });
    }
}
