//! Applying decoded events to entity state, in record order, with lateness
//! judged against the partition's newest event time.
//!
//! The reference for lateness is committed with the offsets, so replaying a
//! batch after a crash makes exactly the same late/not-late decisions.
//! Lateness applies to additions; a retraction always takes its event out of
//! the tile that holds it (a no-op once the tile has aged out). The one case
//! this gets wrong is a row that arrived too late to be counted and is later
//! deleted: rare, and such rows are already counted as late.

use std::collections::HashMap;

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
    let mut late = 0;
    for (v, direction, event) in changes {
        let view = &catalog.views[*v];
        let reference = newest_ms.unwrap_or(i64::MIN);
        // Lateness gates additions only: a retraction (a row deleted hours
        // later) must take its event back out of whatever tile still holds it.
        let in_windows =
            *direction == Direction::Retract || event.at_ms >= reference.saturating_sub(view.allowed_lateness.as_millis() as i64);
        if !in_windows {
            late += 1;
        }
        if *direction == Direction::Add {
            *newest_ms = Some(reference.max(event.at_ms));
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

    #[test]
    fn events_past_allowed_lateness_are_counted_and_kept_out_of_windows() {
        let catalog = Catalog::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/reference.toml"))).unwrap();
        let v = catalog.views.iter().position(|v| v.name == "user_activity").unwrap();
        let e = |at_ms| Event { entity: "1".into(), at_ms, fields: BTreeMap::new() };
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
}
