//! Reading feature state for a request: one round trip to Redis for every
//! (view, entity) pair it needs, and one to Postgres for the misses.
//!
//! Redis failing is not the caller's problem: reads go to Postgres and the
//! cache is marked degraded. Postgres failing is, only for what the cache
//! does not hold: a request fully answered from the cache is served.

use std::collections::HashMap;

use freshet_store::{entities, entities::RowKey, state::EntityState, view::FeatureView};
use sqlx::PgPool;
use tonic::Status;
use tracing::Instrument;

use crate::{
    cache::{Cache, Lookup},
    service::unavailable,
};

#[derive(Clone)]
pub struct Reader {
    pub pool: PgPool,
    pub cache: Option<Cache>,
}

/// Where a request's rows came from, for its span and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Partial,
    Miss,
    Bypassed,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Partial => "partial",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Bypassed => "bypassed",
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
            return Ok((self.from_postgres(&rows).await?, CacheOutcome::Bypassed));
        };
        let mut misses = Vec::new();
        for (row, lookup) in rows.into_iter().zip(lookups) {
            match lookup {
                Lookup::Hit(Some(state)) => {
                    found.insert(row, state);
                }
                Lookup::Hit(None) => {}
                Lookup::Miss(generation) => misses.push((row, generation)),
            }
        }
        let outcome = match (misses.is_empty(), found.is_empty()) {
            (true, _) => return Ok((found, CacheOutcome::Hit)),
            (false, true) => CacheOutcome::Miss,
            (false, false) => CacheOutcome::Partial,
        };
        let missed: Vec<RowKey> = misses.iter().map(|(r, _)| r.clone()).collect();
        let loaded = self.from_postgres(&missed).await?;
        if let Some(cache) = &self.cache {
            cache.fill(
                misses
                    .into_iter()
                    .map(|(row, generation)| {
                        let state = loaded.get(&row);
                        (row, generation, state)
                    })
                    .collect(),
            );
        }
        found.extend(loaded);
        Ok((found, outcome))
    }

    async fn from_postgres(&self, rows: &[RowKey]) -> Result<HashMap<RowKey, EntityState>, Status> {
        let mut views: Vec<&str> = rows.iter().map(|(v, _)| v.as_str()).collect();
        let mut keys: Vec<&str> = rows.iter().map(|(_, e)| e.as_str()).collect();
        views.dedup();
        keys.sort();
        keys.dedup();
        let span = tracing::info_span!("postgres.read", db.system.name = "postgresql", db.operation.name = "SELECT", rows = rows.len());
        entities::read(&self.pool, &views, &keys).instrument(span).await.map_err(unavailable)
    }
}
