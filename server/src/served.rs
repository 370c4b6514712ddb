//! An entity's state in the form the server holds and evaluates it.
//!
//! Ingest's [`EntityState`] is built for merging: series and `last` values
//! in maps keyed by name, every tile with sum, min and max. A call only
//! reads, and reads the same few things each time, so the server converts a
//! state once, when it reads it from Redis or Postgres, into this form:
//! - series and `last` values in arrays indexed by each feature's
//!   [`slot`](freshet_store::view::Feature::slot), so evaluating a feature
//!   is an index and one pass over contiguous tiles, with no name compared
//!   and no map node chased (string compares and the tree's cache misses
//!   were half of a 100-entity call's CPU);
//! - all of an entity's tiles in one array (two: counts and the rest), so
//!   a call that reads many series streams through memory instead of
//!   missing the cache once per series;
//! - a series of counts keeps only what a count reads (24 bytes a tile, not
//!   48), so the hot tier holds about twice the entities in the same bytes.
//!
//! Series and `last` features the view no longer declares are left out;
//! those it declares and the state lacks are empty.

use std::mem::size_of;

use freshet_store::{
    state::{EntityState, LastValue, Reading, Scalar, Tile, Window},
    view::{Aggregation, Feature, FeatureView},
};

#[derive(Debug)]
pub struct Served {
    /// Newest event time applied to the entity.
    pub newest_ms: i64,
    /// By series slot: where its tiles are.
    series: Box<[Span]>,
    /// The tiles of series of counts (they aggregate no field): sum, min
    /// and max would all be zero, and no feature reads them.
    counts: Box<[Count]>,
    /// The tiles of every other series.
    values: Box<[Tile]>,
    /// By `last` slot.
    last: Box<[Option<LastValue>]>,
}

/// A series' tiles: `counts[start..end]`, or `values[start..end]`.
#[derive(Debug, Clone, Copy)]
struct Span {
    counts: bool,
    start: u32,
    end: u32,
}

/// A tile of a series of counts, holding the totals from it to the
/// series' newest tile: a window always runs to the newest, so it reads
/// one tile (found by a binary search) instead of adding up all of its own.
#[derive(Debug, Clone, Copy)]
struct Count {
    start_ms: i64,
    /// Events in this tile and every newer one.
    count: i64,
    /// The newest event time of this tile and every newer one.
    newest_ms: i64,
}

impl Served {
    pub fn new(state: &EntityState, view: &FeatureView) -> Served {
        let tiles = |key: &str| state.series.get(key).map_or(&[][..], Vec::as_slice);
        let (mut counts, mut values) = (Vec::new(), Vec::new());
        let series = view
            .series
            .iter()
            .map(|s| {
                let tiles = tiles(&s.key);
                let counts_series = s.field.is_none();
                let start = if counts_series { counts.len() } else { values.len() };
                if counts_series {
                    counts.extend(tiles.iter().map(|t| Count { start_ms: t.start_ms, count: t.count, newest_ms: t.newest_ms }));
                    let mut newer = Count { start_ms: 0, count: 0, newest_ms: i64::MIN };
                    for tile in counts[start..].iter_mut().rev() {
                        tile.count += newer.count;
                        tile.newest_ms = tile.newest_ms.max(newer.newest_ms);
                        newer = *tile;
                    }
                } else {
                    values.extend_from_slice(tiles);
                }
                // A state holds far fewer than 2^32 tiles (ingest prunes them).
                Span { counts: counts_series, start: start as u32, end: (start + tiles.len()) as u32 }
            })
            .collect();
        // Each `last` feature at the slot the view file gave it.
        let lasts: Vec<&Feature> = view.features.iter().filter(|f| f.aggregation == Aggregation::Last).collect();
        let mut last = vec![None; lasts.len()].into_boxed_slice();
        for f in lasts {
            last[f.slot] = state.last.get(&f.name).cloned();
        }
        Served { newest_ms: state.newest_ms, series, counts: counts.into(), values: values.into(), last }
    }

    /// Series `slot` over a window of `window_ms` ending at `now_ms`.
    pub fn window(&self, slot: usize, window_ms: i64, now_ms: i64) -> Window {
        let Span { counts, start, end } = self.series[slot];
        let range = start as usize..end as usize;
        match counts {
            false => Window::of(&self.values[range], window_ms, now_ms),
            true => {
                let counts = &self.counts[range];
                match counts.get(Window::first(counts, |c| c.start_ms, window_ms, now_ms)) {
                    Some(totals) => Window { count: totals.count, newest_ms: totals.newest_ms, ..Window::EMPTY },
                    None => Window::EMPTY,
                }
            }
        }
    }

    /// What `last` feature `feature` reads as.
    pub fn last(&self, feature: &Feature) -> Reading {
        LastValue::reading(self.last[feature.slot].as_ref())
    }

    /// Heap bytes it takes, besides its own size.
    pub fn heap_bytes(&self) -> usize {
        let strings: usize = self
            .last
            .iter()
            .map(|l| match l {
                Some(LastValue { value: Scalar::Str(s), .. }) => s.capacity(),
                _ => 0,
            })
            .sum();
        self.series.len() * size_of::<Span>()
            + self.counts.len() * size_of::<Count>()
            + self.values.len() * size_of::<Tile>()
            + self.last.len() * size_of::<Option<LastValue>>()
            + strings
    }
}

/// A state of no features whose newest event is `newest_ms`, for the tests
/// of what holds states.
#[cfg(test)]
pub fn bare(newest_ms: i64) -> Served {
    Served { newest_ms, series: Box::new([]), counts: Box::new([]), values: Box::new([]), last: Box::new([]) }
}

/// The reference view file's catalog, for tests.
#[cfg(test)]
pub fn reference_catalog() -> &'static freshet_store::view::Catalog {
    static CATALOG: std::sync::LazyLock<freshet_store::view::Catalog> = std::sync::LazyLock::new(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/reference.toml");
        freshet_store::view::Catalog::load(std::path::Path::new(path)).unwrap()
    });
    &CATALOG
}

#[cfg(test)]
mod tests {
    use freshet_store::{
        state::{Direction, Event},
        view::ValueType,
    };

    use super::*;

    /// Event `i` of a view: every field its features read, typed as
    /// declared, some left out (so `last` values differ in age).
    fn event(view: &FeatureView, i: i64, at_ms: i64) -> Event {
        let fields = view
            .features
            .iter()
            .filter_map(|f| Some((f.field.clone()?, f.field_type)))
            .filter(|_| i % 3 != 1)
            .map(|(field, kind)| {
                let value = match kind {
                    ValueType::Int64 => Scalar::Int(i),
                    ValueType::Double => Scalar::Double(i as f64 * 1.5),
                    ValueType::String => Scalar::Str(["a", "b", "c"][i as usize % 3].into()),
                    ValueType::Bool => Scalar::Bool(i % 2 == 0),
                    ValueType::Timestamp => Scalar::Time(at_ms - i),
                };
                (field, value)
            })
            .collect();
        Event { entity: "1".into(), at_ms, fields }
    }

    /// Every feature of every reference view reads the same from the served
    /// form as from the state it was made of, at instants before, inside
    /// and past its windows, retractions included.
    #[test]
    fn reads_as_the_state_it_was_made_of() {
        for view in &reference_catalog().views {
            let mut state = EntityState::default();
            for (i, at) in [1_000, 4_000, 9_500, 30_000, 1_200_000, 1_205_000].into_iter().enumerate() {
                state.apply(view, &event(view, i as i64, at), Direction::Add, true);
            }
            state.apply(view, &event(view, 1, 4_000), Direction::Retract, true);
            let served = Served::new(&state, view);
            assert_eq!(served.newest_ms, state.newest_ms);
            for now in [0, 5_000, 10_000, 14_000, 1_205_000, 1_209_999, 1_216_000, 5_000_000, 9_000_000] {
                for feature in &view.features {
                    let from_served = match feature.window {
                        Some(window) => served.window(feature.slot, window.as_millis() as i64, now).reading(feature, served.newest_ms),
                        None => served.last(feature),
                    };
                    assert_eq!(from_served, state.read(feature, now), "{}:{} at {now}", view.name, feature.name);
                }
            }
        }
    }

    #[test]
    fn an_empty_state_serves_empty_features_and_counts_take_less_room() {
        let view = reference_catalog().view("orders").unwrap();
        let empty = Served::new(&EntityState::default(), view);
        for feature in &view.features {
            let reading = match feature.window {
                Some(window) => empty.window(feature.slot, window.as_millis() as i64, 1000).reading(feature, empty.newest_ms),
                None => empty.last(feature),
            };
            assert_eq!(reading, EntityState::default().read(feature, 1000), "{}", feature.name);
        }
        // 100 events, 100 tiles in each series: the count series are the
        // lighter.
        let mut state = EntityState::default();
        for i in 0..100 {
            state.apply(view, &event(view, 0, 3_600_000 + i * 36_000), Direction::Add, true);
        }
        let served = Served::new(&state, view);
        let tiles: usize = state.series.values().map(Vec::len).sum();
        assert!(served.heap_bytes() < tiles * size_of::<Tile>(), "{} bytes for {tiles} tiles", served.heap_bytes());
    }
}
