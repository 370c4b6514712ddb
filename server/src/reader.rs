//! Reading feature state for a request: one round trip to Redis for every
//! (view, entity) pair it needs, and one to Postgres for the misses.
//!
//! Redis failing is not the caller's problem: reads go to Postgres and the
//! cache is marked degraded. Postgres failing is, only for what the cache
//! cannot answer: a request whose rows are all cached, even past their TTL
//! (within the stale window), is served, and says so; any other fails at once
//! with `UNAVAILABLE`.

use std::{collections::HashMap, time::Duration};

use freshet_store::{entities, entities::RowKey, state::EntityState, view::FeatureView};
use tonic::Status;
use tracing::Instrument;

use crate::{
    cache::{Cache, Lookup},
    health::Postgres,
};

#[derive(Clone)]
pub struct Reader {
    pub postgres: Postgres,
    pub cache: Option<Cache>,
}

/// Where a request's rows came from, for its span and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
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
            CacheOutcome::Hit => "hit",
            CacheOutcome::Partial => "partial",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Bypassed => "bypassed",
            CacheOutcome::Stale(_) => "stale",
        }
    }
}

impl Reader {
    pub async fn read(&self, views: &[&FeatureView], entities: &[String]) -> Result<(HashMap<RowKey, EntityState>, CacheOutcome), Status> {
        let mut rows: Vec<RowKey> = views.iter().flat_map(|v| entities.iter().map(|e| (v.name.clone(), e.clone()))).collect();
        rows.sort();
        rows.dedup();
        let mut found = HashMap::with_capacity(rows.len());
        let lookups = match &self.cache {
            Some(cache) => {
                cache.get(&rows).instrument(tracing::info_span!("redis.get", db.system.name = "redis", rows = rows.len())).await.ok()
            }
            None => None,
        };
        let Some(lookups) = lookups else {
            return Ok((self.postgres_read(&rows).await?, CacheOutcome::Bypassed));
        };
        let mut refresh = Vec::new();
        for (row, lookup) in rows.into_iter().zip(lookups) {
            match lookup {
                Lookup::Fresh(Some(state)) => {
                    found.insert(row, state);
                }
                Lookup::Fresh(None) => {}
                Lookup::Refresh { generation, stale } => refresh.push((row, generation, stale)),
            }
        }
        let outcome = match (refresh.is_empty(), found.is_empty()) {
            (true, _) => return Ok((found, CacheOutcome::Hit)),
            (false, true) => CacheOutcome::Miss,
            (false, false) => CacheOutcome::Partial,
        };
        let wanted: Vec<RowKey> = refresh.iter().map(|(r, _, _)| r.clone()).collect();
        let loaded = match self.postgres_read(&wanted).await {
            Ok(loaded) => loaded,
            Err(status) => return serve_stale(found, refresh.into_iter().map(|(row, _, stale)| (row, stale)), status),
        };
        if let Some(cache) = &self.cache {
            cache.fill(
                refresh
                    .into_iter()
                    .map(|(row, generation, _)| {
                        let state = loaded.get(&row);
                        (row, generation, state)
                    })
                    .collect(),
            );
        }
        found.extend(loaded);
        Ok((found, outcome))
    }

    async fn postgres_read(&self, rows: &[RowKey]) -> Result<HashMap<RowKey, EntityState>, Status> {
        let mut views: Vec<&str> = rows.iter().map(|(v, _)| v.as_str()).collect();
        let mut keys: Vec<&str> = rows.iter().map(|(_, e)| e.as_str()).collect();
        views.dedup();
        keys.sort();
        keys.dedup();
        let span = tracing::info_span!("postgres.read", db.system.name = "postgresql", db.operation.name = "SELECT", rows = rows.len());
        self.postgres.run(entities::read(&self.postgres.pool, &views, &keys)).instrument(span).await
    }
}

/// Postgres failed with `status`: the answer from entries past their TTL
/// if every row Postgres was asked for has one, else `status`.
fn serve_stale(
    mut found: HashMap<RowKey, EntityState>,
    wanted: impl Iterator<Item = (RowKey, Option<crate::cache::Stale>)>,
    status: Status,
) -> Result<(HashMap<RowKey, EntityState>, CacheOutcome), Status> {
    let mut oldest = Duration::ZERO;
    for (row, stale) in wanted {
        let Some(stale) = stale else { return Err(status) };
        oldest = oldest.max(stale.age);
        if let Some(state) = stale.entry {
            found.insert(row, state);
        }
    }
    Ok((found, CacheOutcome::Stale(oldest)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Stale;

    fn row(entity: &str) -> RowKey {
        ("orders".to_string(), entity.to_string())
    }

    #[test]
    fn stale_entries_answer_only_when_they_cover_every_row() {
        let fresh: HashMap<RowKey, EntityState> = [(row("1"), EntityState::default())].into_iter().collect();
        let stale = |age_ms, known: bool| Some(Stale { entry: known.then(EntityState::default), age: Duration::from_millis(age_ms) });
        let (rows, outcome) = serve_stale(
            fresh.clone(),
            [(row("2"), stale(9000, true)), (row("3"), stale(7000, false))].into_iter(),
            Status::unavailable("down"),
        )
        .unwrap();
        assert_eq!(outcome, CacheOutcome::Stale(Duration::from_millis(9000)));
        assert!(rows.contains_key(&row("1")) && rows.contains_key(&row("2")));
        assert!(!rows.contains_key(&row("3")), "an entity the view did not know stays unknown");
        let refused = serve_stale(fresh, [(row("2"), stale(9000, true)), (row("4"), None)].into_iter(), Status::unavailable("down"));
        assert_eq!(refused.unwrap_err().code(), tonic::Code::Unavailable);
    }
}
