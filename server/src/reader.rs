//! Reading feature state for a request, tier by tier: the hot tier in
//! memory (`hot.rs`), then one round trip to Redis for what it lacks, then
//! one query to Postgres for what Redis lacks. What the lower tiers return
//! fills the upper ones.
//!
//! Redis failing is not the caller's problem: reads go to Postgres and the
//! cache is marked degraded. Postgres failing is, only for what the caches
//! cannot answer: a request whose rows are all held in memory or Redis, even
//! past their TTL (within the stale window), is served, and says so; any
//! other fails at once with `UNAVAILABLE`.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use freshet_store::{
    entities,
    entities::RowKey,
    state::EntityState,
    view::{Catalog, FeatureView},
};
use tonic::Status;
use tracing::Instrument;

use crate::{
    cache::{Cache, Entry, Lookup, Stale},
    health::Postgres,
    hot::{Found, HotTier, Ticket},
    served::Served,
};

#[derive(Clone)]
pub struct Reader {
    pub postgres: Postgres,
    pub cache: Option<Cache>,
    pub hot: Option<Arc<HotTier>>,
    /// The views states are served for (a state is laid out by its view).
    pub catalog: Arc<Catalog>,
}

/// Where a request's rows came from, for its span and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Every row from the hot tier, in memory.
    Hot,
    /// The rest from Redis.
    Hit,
    Partial,
    Miss,
    Bypassed,
    /// Postgres could not be reached and rows past their TTL were served;
    /// the oldest was this old.
    Stale(Duration),
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hot => "hot",
            CacheOutcome::Hit => "hit",
            CacheOutcome::Partial => "partial",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Bypassed => "bypassed",
            CacheOutcome::Stale(_) => "stale",
        }
    }
}

/// The states of a request's rows, shared with the caches (nothing is
/// copied): view `v` and entity `e` at `v * entities + e`.
pub struct Rows {
    states: Vec<Entry>,
    entities: usize,
}

impl Rows {
    pub fn new(states: Vec<Entry>, entities: usize) -> Rows {
        Rows { states, entities }
    }

    pub fn get(&self, view: usize, entity: usize) -> Option<&Served> {
        self.states[view * self.entities + entity].as_deref()
    }
}

/// A row the hot tier could not answer.
struct Wanted<'a> {
    /// In [`Rows::states`].
    index: usize,
    row: RowKey,
    view: &'a FeatureView,
    ticket: Option<Ticket>,
    /// The youngest entry past its TTL either cache still holds.
    stale: Option<Stale>,
}

impl Reader {
    /// The states of `views` × `entities` (entities distinct), and where
    /// they came from; `deadline` is the call's.
    pub async fn read(
        &self,
        views: &[&FeatureView],
        entities: &[String],
        deadline: Option<Instant>,
    ) -> Result<(Rows, CacheOutcome), Status> {
        let mut states: Vec<Entry> = vec![None; views.len() * entities.len()];
        let mut wanted = Vec::new();
        for (v, view) in views.iter().enumerate() {
            for (e, entity) in entities.iter().enumerate() {
                let index = v * entities.len() + e;
                let (ticket, stale) = match self.hot.as_ref().map(|hot| hot.get(&view.name, entity)) {
                    Some(Found::Fresh(entry)) => {
                        states[index] = entry;
                        continue;
                    }
                    Some(Found::Refresh { ticket, stale }) => (Some(ticket), stale),
                    None => (None, None),
                };
                wanted.push(Wanted { index, row: (view.name.clone(), entity.clone()), view, ticket, stale });
            }
        }
        let outcome = match wanted.is_empty() {
            true => CacheOutcome::Hot,
            false => self.read_through(&mut states, wanted, deadline).await?,
        };
        Ok((Rows::new(states, entities.len()), outcome))
    }

    /// Reads `wanted` from Redis, then Postgres.
    async fn read_through(&self, states: &mut [Entry], wanted: Vec<Wanted<'_>>, deadline: Option<Instant>) -> Result<CacheOutcome, Status> {
        let total = wanted.len();
        let lookups = match &self.cache {
            Some(cache) => {
                let rows: Vec<(&RowKey, &FeatureView)> = wanted.iter().map(|w| (&w.row, w.view)).collect();
                let span = tracing::info_span!("redis.get", db.system.name = "redis", rows = rows.len());
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                cache.get(&rows, crate::cache::budget(rows.len(), left)).instrument(span).await
            }
            None => None,
        };
        let from_redis = lookups.is_some();
        let (mut missing, mut generations) = (Vec::new(), Vec::new());
        match lookups {
            Some(lookups) => {
                for (mut w, lookup) in wanted.into_iter().zip(lookups) {
                    match lookup {
                        Lookup::Fresh { entry, age } => {
                            self.fill_hot(&w, entry.clone(), Instant::now().checked_sub(age).unwrap_or_else(Instant::now));
                            states[w.index] = entry;
                        }
                        Lookup::Refresh { generation, stale } => {
                            w.stale = younger(w.stale, stale);
                            missing.push(w);
                            generations.push(generation);
                        }
                    }
                }
            }
            None => missing = wanted,
        }
        let outcome = match (from_redis, missing.len()) {
            (_, 0) => return Ok(CacheOutcome::Hit),
            (false, _) => CacheOutcome::Bypassed,
            (true, n) if n == total => CacheOutcome::Miss,
            (true, _) => CacheOutcome::Partial,
        };
        let born = Instant::now();
        let rows: Vec<RowKey> = missing.iter().map(|w| w.row.clone()).collect();
        let mut loaded = match self.postgres_read(&rows).await {
            Ok(loaded) => loaded,
            Err(status) => return serve_stale(states, missing, status),
        };
        let loaded: Vec<Option<EntityState>> = rows.iter().map(|row| loaded.remove(row)).collect();
        if let Some(cache) = self.cache.as_ref().filter(|_| from_redis) {
            cache.fill(
                rows.iter().zip(&generations).zip(&loaded).map(|((row, generation), state)| (row, generation.as_str(), state.as_ref())),
            );
        }
        for (w, state) in missing.into_iter().zip(loaded) {
            let entry = state.map(|state| Arc::new(Served::new(&state, w.view)));
            self.fill_hot(&w, entry.clone(), born);
            states[w.index] = entry;
        }
        Ok(outcome)
    }

    fn fill_hot(&self, wanted: &Wanted, entry: Entry, born: Instant) {
        if let (Some(hot), Some(ticket)) = (&self.hot, wanted.ticket) {
            hot.fill(wanted.row.clone(), entry, born, ticket);
        }
    }

    /// `rows` (and any other pair of their views and entities) from
    /// Postgres, in one query.
    pub async fn postgres_read(&self, rows: &[RowKey]) -> Result<HashMap<RowKey, EntityState>, Status> {
        let mut views: Vec<&str> = rows.iter().map(|(v, _)| v.as_str()).collect();
        let mut keys: Vec<&str> = rows.iter().map(|(_, e)| e.as_str()).collect();
        views.sort();
        views.dedup();
        keys.sort();
        keys.dedup();
        let span = tracing::info_span!("postgres.read", db.system.name = "postgresql", db.operation.name = "SELECT", rows = rows.len());
        self.postgres.run(entities::read(&self.postgres.pool, &views, &keys)).instrument(span).await
    }
}

fn younger(a: Option<Stale>, b: Option<Stale>) -> Option<Stale> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if a.age <= b.age { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Postgres failed with `status`: the answer from entries past their TTL
/// if every row Postgres was asked for has one, else `status`.
fn serve_stale(states: &mut [Entry], missing: Vec<Wanted<'_>>, status: Status) -> Result<CacheOutcome, Status> {
    if missing.iter().any(|w| w.stale.is_none()) {
        return Err(status);
    }
    let mut oldest = Duration::ZERO;
    for w in missing {
        let stale = w.stale.expect("checked above");
        oldest = oldest.max(stale.age);
        states[w.index] = stale.entry;
    }
    Ok(CacheOutcome::Stale(oldest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(index: usize, stale: Option<(u64, bool)>) -> Wanted<'static> {
        let stale = stale.map(|(age_ms, known)| Stale {
            entry: known.then(|| Arc::new(crate::served::bare(index as i64))),
            age: Duration::from_millis(age_ms),
        });
        let view = crate::served::reference_catalog().view("orders").unwrap();
        Wanted { index, row: ("orders".to_string(), index.to_string()), view, ticket: None, stale }
    }

    #[test]
    fn stale_entries_answer_only_when_they_cover_every_row() {
        let mut states: Vec<Entry> = vec![Some(Arc::new(crate::served::bare(0))), None, None];
        let outcome =
            serve_stale(&mut states, vec![wanted(1, Some((9000, true))), wanted(2, Some((7000, false)))], Status::unavailable("down"));
        assert_eq!(outcome.unwrap(), CacheOutcome::Stale(Duration::from_millis(9000)));
        assert!(states[0].is_some(), "what was fresh stays");
        assert_eq!(states[1].as_ref().unwrap().newest_ms, 1);
        assert!(states[2].is_none(), "an entity the view did not know stays unknown");
        let refused = serve_stale(&mut states, vec![wanted(1, Some((9000, true))), wanted(2, None)], Status::unavailable("down"));
        assert_eq!(refused.unwrap_err().code(), tonic::Code::Unavailable);
    }

    #[test]
    fn the_younger_stale_entry_is_kept() {
        let age = |s: Option<Stale>| s.map(|s| s.age.as_millis());
        let stale = |ms| wanted(0, Some((ms, true))).stale;
        assert_eq!(age(younger(stale(5), stale(3))), Some(3));
        assert_eq!(age(younger(stale(3), stale(5))), Some(3));
        assert_eq!(age(younger(None, stale(5))), Some(5));
        assert_eq!(age(younger(stale(5), None)), Some(5));
        assert_eq!(age(younger(None, None)), None);
    }
}
