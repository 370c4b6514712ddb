//! The state of one entity in one view, and the feature math on it.
//!
//! Windowed aggregations are kept as *tiles*: partial aggregates (count, sum,
//! min, max, newest event time) of the events whose event time falls in one
//! fixed bucket. Ingest adds events to tiles; the server evaluates a window as
//! of the moment it answers by combining the tiles that overlap it, so "events
//! in the last 10 s" decays with no new events. A tile is 1/50 of its window
//! (at least 100 ms), so a window's edge is exact to 2% of its length.
//! Tiles are sparse and pruned once no window at or after the entity's newest
//! event can reach them, which bounds the state per entity.
//!
//! `last` values carry their event time and are only replaced by an event at
//! least as new, so an older event never overwrites a newer one.
//!
//! A state can also be a *delta*: what one batch did to an entity, applied to
//! an empty state. Deltas [`merge`](EntityState::merge) into a state by
//! adding tiles (a retraction is a tile of count -1), keeping the newest
//! `last` values and the newest event time. Adding commutes, so deltas of
//! concurrent commits can be written without reading or locking anything,
//! and folded later in any grouping (see `entities.rs`). Within one delta a
//! tile's count may reach zero or less (it retracts events of earlier
//! deltas), so only a merge drops empty tiles: a row's addition and its
//! retraction come from one partition, in order, so once a merge has seen a
//! retraction it has seen its addition, and a zero count means no events.
//! min and max cannot be taken back: a view that retracts declares neither
//! (checked on load).

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use crate::view::{Aggregation, Feature, FeatureView, ValueType};

/// A value taken from a source record, already checked against its declared type.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Null,
    Int(i64),
    Double(f64),
    Str(String),
    Bool(bool),
    /// Milliseconds since the Unix epoch.
    Time(i64),
}

impl Scalar {
    fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::Int(i) => Some(*i as f64),
            Scalar::Double(d) => Some(*d),
            _ => None,
        }
    }
}

/// One decoded source event, as far as a view cares.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Canonical text of the entity key.
    pub entity: String,
    /// Event time, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The fields the view's features read; absent fields are not here.
    pub fields: BTreeMap<String, Scalar>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tile {
    pub start_ms: i64,
    pub count: i64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub newest_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LastValue {
    pub at_ms: i64,
    pub value: Scalar,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EntityState {
    /// Newest event time applied to this entity.
    pub newest_ms: i64,
    /// Tile series by [`Series::key`], each sorted by start.
    pub series: BTreeMap<String, Vec<Tile>>,
    /// `last` features by name.
    pub last: BTreeMap<String, LastValue>,
}

/// What a feature reads as at some instant, before max-age is applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    Value {
        value: Scalar,
        at_ms: i64,
    },
    /// No value; `at_ms` is the newest event that says so, if any.
    Null {
        at_ms: Option<i64>,
    },
}

pub fn tile_width_ms(window_ms: i64) -> i64 {
    (window_ms / 50).max(100)
}

/// The tiles shared by the windowed features of one view that read the same
/// field with the same tile width. A view's series are worked out once, when
/// its file loads, so applying an event costs one step per series and per
/// `last` feature, however many features share a series.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Its key in [`EntityState::series`], and so in stored state.
    pub key: String,
    /// The field it aggregates; `None` for counts.
    pub field: Option<String>,
    pub width_ms: i64,
    /// The longest window that reads it: how far back its tiles are kept.
    pub horizon_ms: i64,
}

/// The key of the series a feature over `field` with `window` reads.
pub fn series_key(field: Option<&str>, window: Duration) -> String {
    format!("{}@{}", field.unwrap_or("*"), tile_width_ms(window.as_millis() as i64))
}

/// The series `features` read, in order of first use.
pub fn series_of(features: &[Feature]) -> Vec<Series> {
    let mut series: Vec<Series> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for feature in features {
        let (Some(key), Some(window)) = (&feature.series, feature.window) else {
            continue;
        };
        let window_ms = window.as_millis() as i64;
        match index.get(key.as_str()) {
            Some(&i) => series[i].horizon_ms = series[i].horizon_ms.max(window_ms),
            None => {
                index.insert(key, series.len());
                series.push(Series {
                    key: key.clone(),
                    field: feature.field.clone(),
                    width_ms: tile_width_ms(window_ms),
                    horizon_ms: window_ms,
                });
            }
        }
    }
    series
}

/// How an event changes tiles.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Direction {
    Add,
    Retract,
}

impl EntityState {
    /// Applies (or, for `Retract`, takes back) one event. `in_windows` is false
    /// for an event later than the allowed lateness: it still updates `last`
    /// values (guarded by event time) but not windows.
    pub fn apply(&mut self, view: &FeatureView, event: &Event, direction: Direction, in_windows: bool) {
        if direction == Direction::Add {
            self.newest_ms = self.newest_ms.max(event.at_ms);
            for feature in view.features.iter().filter(|f| f.aggregation == Aggregation::Last) {
                work::step();
                self.apply_last(feature, event);
            }
        }
        if in_windows {
            for series in &view.series {
                work::step();
                let value = match &series.field {
                    None => Some(0.0),
                    Some(field) => event.fields.get(field).and_then(Scalar::as_f64),
                };
                if let Some(value) = value {
                    let tiles = match self.series.get_mut(&series.key) {
                        Some(tiles) => tiles,
                        None => self.series.entry(series.key.clone()).or_default(),
                    };
                    update_tile(tiles, event.at_ms, series.width_ms, value, direction);
                }
            }
        }
        self.prune(view);
    }

    /// Folds `delta`, a later batch's changes, into this state: tiles add
    /// (a tile left with no events goes), `last` values and the newest event
    /// time keep the newest (a tie goes to the later delta, as it would to
    /// the later event).
    pub fn merge(&mut self, delta: &EntityState) {
        self.newest_ms = self.newest_ms.max(delta.newest_ms);
        for (key, tiles) in &delta.series {
            let mine = self.series.entry(key.clone()).or_default();
            for tile in tiles {
                match mine.binary_search_by_key(&tile.start_ms, |t| t.start_ms) {
                    Ok(i) => {
                        add_tile(&mut mine[i], tile);
                        if mine[i].count == 0 {
                            mine.remove(i);
                        }
                    }
                    Err(i) => mine.insert(i, *tile),
                }
            }
            if mine.is_empty() {
                self.series.remove(key);
            }
        }
        for (name, last) in &delta.last {
            if self.last.get(name).is_none_or(|old| old.at_ms <= last.at_ms) {
                self.last.insert(name.clone(), last.clone());
            }
        }
    }

    fn apply_last(&mut self, feature: &Feature, event: &Event) {
        let field = feature.field.as_deref().unwrap_or_default();
        let Some(value) = event.fields.get(field) else {
            return;
        };
        let newer = self.last.get(&feature.name).is_none_or(|old| old.at_ms <= event.at_ms);
        if newer {
            self.last.insert(feature.name.clone(), LastValue { at_ms: event.at_ms, value: value.clone() });
        }
    }

    /// Drops tiles no window evaluated at or after `newest_ms` can overlap.
    pub fn prune(&mut self, view: &FeatureView) {
        for series in &view.series {
            work::step();
            if let Some(tiles) = self.series.get_mut(&series.key) {
                // Tiles are sorted by start, so the stale ones lead.
                let stale = tiles.partition_point(|t| t.start_ms + series.width_ms <= self.newest_ms - series.horizon_ms);
                tiles.drain(..stale);
                if tiles.is_empty() {
                    self.series.remove(&series.key);
                }
            }
        }
    }

    /// Evaluates `feature` as of `now_ms`.
    pub fn read(&self, feature: &Feature, now_ms: i64) -> Reading {
        if feature.aggregation == Aggregation::Last {
            return LastValue::reading(self.last.get(&feature.name));
        }
        let window_ms = feature.window.map(|w| w.as_millis() as i64).unwrap_or_default();
        let total = feature.series.as_ref().map_or(Window::EMPTY, |key| self.window(key, window_ms, now_ms));
        self.windowed(feature, &total)
    }

    /// Series `key` over a window of `window_ms` ending at `now_ms` (see
    /// [`Window::of`]): every feature of that series and window reads from
    /// the one result.
    pub fn window(&self, key: &str, window_ms: i64, now_ms: i64) -> Window {
        self.series.get(key).map_or(Window::EMPTY, |tiles| Window::of(tiles, window_ms, now_ms))
    }

    /// What windowed `feature` reads as, given its window's `total`.
    pub fn windowed(&self, feature: &Feature, total: &Window) -> Reading {
        total.reading(feature, self.newest_ms)
    }
}

impl LastValue {
    /// What a `last` feature holding `last` reads as.
    pub fn reading(last: Option<&LastValue>) -> Reading {
        match last {
            Some(LastValue { value: Scalar::Null, at_ms }) => Reading::Null { at_ms: Some(*at_ms) },
            Some(last) => Reading::Value { value: last.value.clone(), at_ms: last.at_ms },
            None => Reading::Null { at_ms: None },
        }
    }
}

/// The tiles of one series inside one window, combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub count: i64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub newest_ms: i64,
}

impl Window {
    pub const EMPTY: Window = Window { count: 0, sum: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY, newest_ms: i64::MIN };

    /// The `tiles` (sorted by start) that a window of `window_ms` ending at
    /// `now_ms` overlaps, combined in one pass: those too old are skipped by
    /// a binary search, not visited.
    pub fn of(tiles: &[Tile], window_ms: i64, now_ms: i64) -> Window {
        let mut total = Window::EMPTY;
        for tile in &tiles[Window::first(tiles, |t| t.start_ms, window_ms, now_ms)..] {
            total.count += tile.count;
            total.sum += tile.sum;
            total.min = total.min.min(tile.min);
            total.max = total.max.max(tile.max);
            total.newest_ms = total.newest_ms.max(tile.newest_ms);
        }
        total
    }

    /// Of `tiles` sorted by start (`start_ms`), the first that a window of
    /// `window_ms` ending at `now_ms` overlaps: it and all after it are in
    /// the window.
    pub fn first<T>(tiles: &[T], start_ms: impl Fn(&T) -> i64, window_ms: i64, now_ms: i64) -> usize {
        let width = tile_width_ms(window_ms);
        tiles.partition_point(|t| start_ms(t) + width <= now_ms - window_ms)
    }

    /// What windowed `feature` reads as, given this total of its window, for
    /// an entity whose newest event is `newest_ms`.
    pub fn reading(&self, feature: &Feature, newest_ms: i64) -> Reading {
        let at_ms = if self.count > 0 { self.newest_ms } else { newest_ms };
        let typed = |x: f64| match feature.field_type {
            ValueType::Int64 => Scalar::Int(x.round() as i64),
            _ => Scalar::Double(x),
        };
        let value = match feature.aggregation {
            Aggregation::Count => Scalar::Int(self.count),
            Aggregation::Sum => typed(self.sum),
            _ if self.count == 0 => return Reading::Null { at_ms: Some(at_ms) },
            Aggregation::Min => typed(self.min),
            Aggregation::Max => typed(self.max),
            Aggregation::Avg => Scalar::Double(self.sum / self.count as f64),
            Aggregation::Last => unreachable!("not windowed"),
        };
        Reading::Value { value, at_ms }
    }
}

fn update_tile(tiles: &mut Vec<Tile>, at_ms: i64, width: i64, value: f64, direction: Direction) {
    let start_ms = at_ms.div_euclid(width) * width;
    let position = tiles.binary_search_by_key(&start_ms, |t| t.start_ms);
    match (position, direction) {
        (Ok(i), Direction::Add) => {
            let t = &mut tiles[i];
            t.count += 1;
            t.sum += value;
            t.min = t.min.min(value);
            t.max = t.max.max(value);
            t.newest_ms = t.newest_ms.max(at_ms);
        }
        (Err(i), Direction::Add) => {
            tiles.insert(i, Tile { start_ms, count: 1, sum: value, min: value, max: value, newest_ms: at_ms });
        }
        (Ok(i), Direction::Retract) => {
            tiles[i].count -= 1;
            tiles[i].sum -= value;
        }
        // The event may sit in a tile of another delta, or of the stored
        // state: record the retraction for the merge. (If its tile was
        // pruned, the retraction is as old, outside every window, and is
        // pruned in turn.)
        (Err(i), Direction::Retract) => {
            tiles.insert(i, Tile { start_ms, count: -1, sum: -value, min: f64::INFINITY, max: f64::NEG_INFINITY, newest_ms: i64::MIN });
        }
    }
}

/// Adds `other` into `tile` (same start).
fn add_tile(tile: &mut Tile, other: &Tile) {
    tile.count += other.count;
    tile.sum += other.sum;
    tile.min = tile.min.min(other.min);
    tile.max = tile.max.max(other.max);
    tile.newest_ms = tile.newest_ms.max(other.newest_ms);
}

/// Counts the steps of applying events, so a test can check that the work
/// grows linearly with a view's features; nothing outside tests.
mod work {
    #[cfg(test)]
    thread_local! {
        pub static STEPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    #[inline]
    pub fn step() {
        #[cfg(test)]
        STEPS.with(|s| s.set(s.get() + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{Catalog, MAX_FEATURES};

    const VIEWS: &str = r#"
[[view]]
name = "orders"
entity = "user_id"
entity_type = "int64"
max_age = "1d"
freshness_budget = "5s"
[view.source]
topics = ["orders"]
format = "json"
event_time = "at"
on_delete = "retract"
[[view.feature]]
name = "n_10s"
aggregation = "count"
window = "10s"
[[view.feature]]
name = "n_1h"
aggregation = "count"
window = "1h"
[[view.feature]]
name = "spend_1h"
aggregation = "sum"
field = "amount"
type = "double"
window = "1h"
[[view.feature]]
name = "avg_1h"
aggregation = "avg"
field = "amount"
type = "double"
window = "1h"
[[view.feature]]
name = "items_1h"
aggregation = "sum"
field = "items"
type = "int64"
window = "1h"
[[view.feature]]
name = "last_status"
aggregation = "last"
field = "status"
type = "string"
"#;

    fn view() -> FeatureView {
        Catalog::parse(VIEWS, "t").unwrap().views.remove(0)
    }

    fn event(at_ms: i64, amount: f64, status: &str) -> Event {
        let mut fields = BTreeMap::new();
        fields.insert("amount".into(), Scalar::Double(amount));
        fields.insert("items".into(), Scalar::Int(2));
        fields.insert("status".into(), Scalar::Str(status.into()));
        Event { entity: "1".into(), at_ms, fields }
    }

    fn value(state: &EntityState, view: &FeatureView, name: &str, now: i64) -> Reading {
        state.read(view.feature(name).unwrap(), now)
    }

    #[test]
    fn windows_decay_as_time_passes() {
        let view = view();
        let mut s = EntityState::default();
        let t0 = 1_700_000_000_000;
        for i in 0..5 {
            s.apply(&view, &event(t0 + i * 1000, 10.0, "a"), Direction::Add, true);
        }
        let now = t0 + 4000;
        assert_eq!(value(&s, &view, "n_10s", now), Reading::Value { value: Scalar::Int(5), at_ms: t0 + 4000 });
        assert_eq!(value(&s, &view, "spend_1h", now), Reading::Value { value: Scalar::Double(50.0), at_ms: t0 + 4000 });
        assert_eq!(value(&s, &view, "items_1h", now), Reading::Value { value: Scalar::Int(10), at_ms: t0 + 4000 });
        // 12.5 s after the first event only the last two are inside 10 s.
        let later = t0 + 12_500;
        assert_eq!(value(&s, &view, "n_10s", later), Reading::Value { value: Scalar::Int(2), at_ms: t0 + 4000 });
        // Much later, the 10 s window is empty but the hour still counts all.
        let quiet = t0 + 60_000;
        assert_eq!(value(&s, &view, "n_10s", quiet), Reading::Value { value: Scalar::Int(0), at_ms: t0 + 4000 });
        assert_eq!(value(&s, &view, "n_1h", quiet), Reading::Value { value: Scalar::Int(5), at_ms: t0 + 4000 });
        assert_eq!(value(&s, &view, "avg_1h", quiet), Reading::Value { value: Scalar::Double(10.0), at_ms: t0 + 4000 });
        // Past the hour, averages have nothing to say.
        assert_eq!(value(&s, &view, "avg_1h", t0 + 7_200_000), Reading::Null { at_ms: Some(t0 + 4000) });
    }

    /// A window is combined from exactly the tiles it overlaps, though the
    /// older ones are skipped rather than visited.
    #[test]
    fn a_window_combines_exactly_the_tiles_it_overlaps() {
        let view = view();
        let mut s = EntityState::default();
        let t0 = 1_000_000;
        for i in 0..500 {
            s.apply(&view, &event(t0 + i * 997, (i % 7) as f64, "a"), Direction::Add, true);
        }
        for feature in view.features.iter().filter(|f| f.series.is_some()) {
            let (key, window_ms) = (feature.series.as_deref().unwrap(), feature.window.unwrap().as_millis() as i64);
            let width = tile_width_ms(window_ms);
            for now in [t0, t0 + 5_000, t0 + 250_000, t0 + 499 * 997, t0 + 600_000, t0 + 10_000_000] {
                let mut naive = Window::EMPTY;
                for t in s.series[key].iter().filter(|t| t.start_ms + width > now - window_ms) {
                    naive.count += t.count;
                    naive.sum += t.sum;
                    naive.min = naive.min.min(t.min);
                    naive.max = naive.max.max(t.max);
                    naive.newest_ms = naive.newest_ms.max(t.newest_ms);
                }
                assert_eq!(s.window(key, window_ms, now), naive, "{} at {now}", feature.name);
            }
        }
        assert_eq!(s.window("nope", 1000, t0), Window::EMPTY);
    }

    #[test]
    fn older_event_never_overwrites_newer_last_value() {
        let view = view();
        let mut s = EntityState::default();
        s.apply(&view, &event(2000, 1.0, "new"), Direction::Add, true);
        s.apply(&view, &event(1000, 1.0, "old"), Direction::Add, true);
        assert_eq!(value(&s, &view, "last_status", 3000), Reading::Value { value: Scalar::Str("new".into()), at_ms: 2000 });
    }

    #[test]
    fn retract_takes_an_event_back() {
        let view = view();
        let mut s = EntityState::default();
        let e1 = event(1000, 5.0, "a");
        let e2 = event(1500, 7.0, "b");
        s.apply(&view, &e1, Direction::Add, true);
        s.apply(&view, &e2, Direction::Add, true);
        s.apply(&view, &e1, Direction::Retract, true);
        assert_eq!(value(&s, &view, "n_1h", 2000), Reading::Value { value: Scalar::Int(1), at_ms: 1500 });
        assert_eq!(value(&s, &view, "spend_1h", 2000), Reading::Value { value: Scalar::Double(7.0), at_ms: 1500 });
    }

    /// Applying additions and retractions to one state reads the same as
    /// applying them in batches to empty deltas and merging those: what lets
    /// commits append deltas instead of rewriting state. Two partitions feed
    /// the entity (each retracting only its own rows, as Debezium keys them),
    /// and their deltas are merged in any interleaving that keeps each
    /// partition's order, as concurrent commits land.
    #[test]
    fn merged_deltas_read_like_one_state() {
        use rand::{Rng, SeedableRng};
        let view = view();
        for seed in 0..40u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut whole = EntityState::default();
            let mut partitions: Vec<Vec<EntityState>> = Vec::new();
            for p in 0..2 {
                let mut added: Vec<Event> = Vec::new();
                let mut stream = Vec::new();
                for i in 0..300 {
                    if !added.is_empty() && rng.random_ratio(1, 4) {
                        let e = added.swap_remove(rng.random_range(0..added.len()));
                        stream.push((e, Direction::Retract));
                    } else {
                        let at = 1_000_000 + i * 20_000 + p * 7 + 2 * rng.random_range(0..7_000);
                        let e = event(at, rng.random_range(0..100) as f64, &format!("s{i}"));
                        added.push(e.clone());
                        stream.push((e, Direction::Add));
                    }
                }
                stream.iter().for_each(|(e, d)| whole.apply(&view, e, *d, true));
                let mut deltas = Vec::new();
                let mut rest = &stream[..];
                while !rest.is_empty() {
                    let (batch, tail) = rest.split_at(rng.random_range(1..=rest.len().min(40)));
                    let mut delta = EntityState::default();
                    batch.iter().for_each(|(e, d)| delta.apply(&view, e, *d, true));
                    deltas.push(delta);
                    rest = tail;
                }
                deltas.reverse();
                partitions.push(deltas);
            }
            let mut merged = EntityState::default();
            while let Some(p) = (0..2)
                .filter(|&p| !partitions[p].is_empty())
                .nth(rng.random_range(0..2))
                .or_else(|| (0..2).find(|&p| !partitions[p].is_empty()))
            {
                merged.merge(&partitions[p].pop().unwrap());
            }
            let end = whole.newest_ms;
            for f in &view.features {
                for now in [end, end + 5_000, end + 1_800_000] {
                    assert_eq!(whole.read(f, now), merged.read(f, now), "seed {seed} feature {} at {now}", f.name);
                }
            }
        }
    }

    #[test]
    fn too_late_events_stay_out_of_windows() {
        let view = view();
        let mut s = EntityState::default();
        s.apply(&view, &event(1000, 5.0, "a"), Direction::Add, false);
        assert_eq!(value(&s, &view, "n_1h", 2000), Reading::Value { value: Scalar::Int(0), at_ms: 1000 });
        assert_eq!(value(&s, &view, "last_status", 2000), Reading::Value { value: Scalar::Str("a".into()), at_ms: 1000 });
    }

    #[test]
    fn old_tiles_are_pruned() {
        let view = view();
        let mut s = EntityState::default();
        for i in 0..10_000 {
            s.apply(&view, &event(i * 1000, 1.0, "a"), Direction::Add, true);
        }
        // 10 000 s of events, one a second: the hour series keeps about an
        // hour of 72 s tiles, the 10 s one about 10 s of 200 ms tiles.
        assert!(s.series.values().all(|tiles| tiles.len() <= 52), "{:?}", s.series.values().map(Vec::len).collect::<Vec<_>>());
    }

    /// A view of `n` features: counts, sums over their own fields, averages
    /// over one shared field, and `last` values, in equal parts.
    fn wide_view(n: usize) -> FeatureView {
        let mut text = VIEWS[..VIEWS.find("[[view.feature]]").unwrap()].to_string();
        for i in 0..n {
            let kind = match i % 4 {
                0 => format!("aggregation = \"count\"\nwindow = \"{}s\"", i + 1),
                1 => format!("aggregation = \"sum\"\nfield = \"f{i}\"\ntype = \"int64\"\nwindow = \"1h\""),
                2 => "aggregation = \"avg\"\nfield = \"amount\"\ntype = \"double\"\nwindow = \"1h\"".to_string(),
                _ => format!("aggregation = \"last\"\nfield = \"l{i}\"\ntype = \"string\""),
            };
            text += &format!("[[view.feature]]\nname = \"x{i}\"\n{kind}\n");
        }
        Catalog::parse(&text, "t").unwrap().views.remove(0)
    }

    /// Steps taken to apply 20 events, each carrying every field, to one entity.
    fn steps_to_apply(view: &FeatureView) -> u64 {
        let mut fields = BTreeMap::new();
        for f in view.features.iter().filter_map(|f| f.field.as_ref()) {
            fields.insert(f.clone(), if f.starts_with('l') { Scalar::Str("s".into()) } else { Scalar::Int(3) });
        }
        let mut s = EntityState::default();
        work::STEPS.with(|c| c.set(0));
        for i in 0..20 {
            s.apply(view, &Event { entity: "1".into(), at_ms: 1_000_000 + i * 977, fields: fields.clone() }, Direction::Add, true);
        }
        work::STEPS.with(|c| c.get())
    }

    /// Applying an event is linear in a view's features: each series and
    /// each `last` feature is visited a bounded number of times, however many
    /// features there are (it used to be one scan of all features per feature).
    #[test]
    fn applying_is_linear_in_features() {
        let (half, full) = (wide_view(MAX_FEATURES / 2), wide_view(MAX_FEATURES));
        // Worked out once on load: the 250 sums have a series each, the 250
        // counts one per tile width (1 s and 5 s windows share 100 ms tiles),
        // and the 250 hourly averages of one field share a single series.
        assert_eq!(full.series.len(), 250 + 249 + 1);
        let (small, large) = (steps_to_apply(&half), steps_to_apply(&full));
        // Per event: one step per `last` feature, two per series (update, prune).
        let lasts = MAX_FEATURES as u64 / 4;
        assert_eq!(large, 20 * (lasts + 2 * full.series.len() as u64));
        assert!(large <= 20 * 3 * MAX_FEATURES as u64, "{large} steps");
        assert!(large <= 2 * small + 20 * 4, "doubling the features doubles the work: {small} → {large}");
    }

    /// Shuffling events in event time gives the same windows and last values.
    #[test]
    fn order_of_arrival_does_not_matter() {
        use rand::{SeedableRng, seq::SliceRandom};
        let view = view();
        for seed in 0..50u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let events: Vec<Event> = (0..200).map(|i| event(1_000_000 + (i * 7919) % 100_000, (i % 13) as f64, &format!("s{i}"))).collect();
            let mut shuffled = events.clone();
            shuffled.shuffle(&mut rng);
            let (mut a, mut b) = (EntityState::default(), EntityState::default());
            events.iter().for_each(|e| a.apply(&view, e, Direction::Add, true));
            shuffled.iter().for_each(|e| b.apply(&view, e, Direction::Add, true));
            for f in &view.features {
                for now in [1_050_000, 1_100_000, 1_200_000] {
                    assert_eq!(a.read(f, now), b.read(f, now), "seed {seed} feature {} at {now}", f.name);
                }
            }
        }
    }
}
