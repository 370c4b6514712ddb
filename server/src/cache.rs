//! The Redis cache in front of Postgres: read-through, invalidated by ingest
//! commits.
//!
//! Each (view, entity) state is cached under `{prefix}:s:{view}:{entity}`,
//! encoded as in Postgres (an empty value marks an entity the view does not know), next to a generation
//! counter `{prefix}:g:{view}:{entity}`. Ingest's commit transaction sends a
//! Postgres NOTIFY naming the rows it changed; notifications are delivered
//! only after the commit, and the server's listener then bumps each row's
//! generation and deletes its entry.
//!
//! A miss reads Postgres and fills the cache only if the generation is still
//! the one seen before the read (checked and set atomically in Redis), so a
//! fill racing a commit cannot put back what the commit replaced. If the
//! listener misses notifications (its connection dropped), entries are
//! refreshed from Postgres once older than `ttl`: that is the staleness bound
//! in the worst case; in the normal case a commit is visible as soon as its
//! notification is handled.
//!
//! Entries live `stale_for` longer than `ttl` in Redis (their age is read
//! from their remaining time to live): an entry past its TTL is refreshed
//! like a miss, but while Postgres cannot be reached it is still served,
//! and the answer says so. Past `ttl + stale_for` it is gone.
//!
//! A slow Redis costs one call, not the server: each read waits at most a
//! budget sized to it ([`budget`]: a base plus a share per row, never more
//! than half the time the call has left), then that call reads Postgres
//! instead. Only Redis *failing* (errors, not slowness) marks the cache
//! degraded.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use freshet_store::{codec, entities::RowKey, state::EntityState, view::FeatureView};
use redis::aio::ConnectionManager;

use crate::{metrics::ServerMetrics, served::Served};

/// A cached row: its state, or `None` for an entity the view does not know.
/// Shared: the hot tier, the call and the evaluation all read one copy.
pub type Entry = Option<Arc<Served>>;

/// What the cache said about one row.
pub enum Lookup {
    /// Cached, and younger than the TTL; `age` since it was filled.
    Fresh { entry: Entry, age: Duration },
    /// Not cached, or cached longer than the TTL: read Postgres and fill the
    /// entry with `generation`. An entry past its TTL comes along, to serve
    /// while Postgres cannot be reached.
    Refresh { generation: String, stale: Option<Stale> },
}

/// A cache entry past its TTL.
pub struct Stale {
    pub entry: Entry,
    /// Since it was filled.
    pub age: Duration,
}

#[derive(Clone)]
pub struct Cache {
    redis: ConnectionManager,
    prefix: Arc<str>,
    ttl: Duration,
    /// How long past `ttl` an entry is kept for Postgres outages.
    stale_for: Duration,
    /// Set while Redis is failing: reads go straight to Postgres.
    pub degraded: Arc<AtomicBool>,
    metrics: Arc<ServerMetrics>,
}

/// The longest any Redis command is waited for: fills and invalidations,
/// which no caller waits on, and the connection itself.
const BACKSTOP: Duration = Duration::from_secs(1);

/// What a read of `rows` may wait for Redis: enough to carry their states
/// on a busy Redis (a base, plus a share per row, as big reads take
/// longer), and never more than half of what the call has `left`, so that
/// Postgres still has time to answer instead.
pub fn budget(rows: usize, left: Option<Duration>) -> Duration {
    const BASE: Duration = Duration::from_millis(25);
    const PER_ROW: Duration = Duration::from_micros(500);
    let sized = BASE + PER_ROW * rows.min(100_000) as u32;
    left.map_or(sized, |left| sized.min(left / 2))
}

/// Sets the entry only if the generation is unchanged since the read.
const FILL: &str =
    "if (redis.call('GET', KEYS[2]) or '') == ARGV[2] then return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3]) end return 0";

impl Cache {
    pub async fn connect(
        url: &str,
        prefix: &str,
        ttl: Duration,
        stale_for: Duration,
        metrics: Arc<ServerMetrics>,
    ) -> redis::RedisResult<Cache> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            // Calls time their own reads out (`budget`); this only bounds
            // what a connection keeps waiting for.
            .set_response_timeout(Some(BACKSTOP))
            .set_connection_timeout(Some(Duration::from_millis(200)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let redis = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Cache { redis, prefix: prefix.into(), ttl, stale_for, degraded: Arc::default(), metrics })
    }

    fn state_key(&self, (view, entity): &RowKey) -> String {
        format!("{}:s:{view}:{entity}", self.prefix)
    }

    fn generation_key(&self, (view, entity): &RowKey) -> String {
        format!("{}:g:{view}:{entity}", self.prefix)
    }

    /// Looks `rows` (each with its view) up in one round trip, waiting at
    /// most `budget`; `None` if Redis failed or took longer.
    pub async fn get(&self, rows: &[(&RowKey, &FeatureView)], budget: Duration) -> Option<Vec<Lookup>> {
        let mut pipe = redis::pipe();
        for (row, _) in rows {
            let key = self.state_key(row);
            pipe.get(&key).pttl(&key).get(self.generation_key(row));
        }
        let mut redis = self.redis.clone();
        let values: Vec<(Option<Vec<u8>>, i64, Option<String>)> = match tokio::time::timeout(budget, pipe.query_async(&mut redis)).await {
            Ok(result) => self.observe(result).ok()?,
            Err(_) => {
                tracing::debug!(?budget, rows = rows.len(), "Redis slower than this call's budget: reading Postgres");
                return None;
            }
        };
        let lifetime = self.ttl + self.stale_for;
        Some(
            values
                .into_iter()
                .zip(rows)
                .map(|((bytes, remaining_ms, generation), (_, view))| {
                    let entry = bytes.and_then(|bytes| match bytes.is_empty() {
                        true => Some(None),
                        false => codec::decode(&bytes).ok().map(|state| Some(Arc::new(Served::new(&state, view)))),
                    });
                    // PTTL: -1 for a key without expiry (not one of ours), -2 for none.
                    let age = lifetime.saturating_sub(Duration::from_millis(remaining_ms.max(0) as u64));
                    match entry {
                        Some(entry) if remaining_ms == -1 || age < self.ttl => Lookup::Fresh { entry, age },
                        stale => {
                            Lookup::Refresh { generation: generation.unwrap_or_default(), stale: stale.map(|entry| Stale { entry, age }) }
                        }
                    }
                })
                .collect(),
        )
    }

    /// Fills missed rows (row, generation seen before the read, state or
    /// `None` for an unknown entity) in the background: the caller already
    /// has its answer.
    pub fn fill<'a>(&self, rows: impl Iterator<Item = (&'a RowKey, &'a str, Option<&'a EntityState>)>) {
        let mut pipe = redis::pipe();
        let lifetime = (self.ttl + self.stale_for).as_millis() as u64;
        let mut any = false;
        for (row, generation, entry) in rows {
            any = true;
            pipe.cmd("EVAL")
                .arg(FILL)
                .arg(2)
                .arg(self.state_key(row))
                .arg(self.generation_key(row))
                .arg(entry.map(codec::encode).unwrap_or_default())
                .arg(generation)
                .arg(lifetime)
                .ignore();
        }
        if !any {
            return;
        }
        let cache = self.clone();
        tokio::spawn(async move {
            let mut redis = cache.redis.clone();
            if let Ok(result) = tokio::time::timeout(BACKSTOP, pipe.query_async::<()>(&mut redis)).await {
                let _ = cache.observe(result);
            }
        });
    }

    /// Invalidates rows a commit changed: new generation, entry gone.
    pub async fn invalidate(&self, rows: &[RowKey]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for row in rows {
            let generation = self.generation_key(row);
            pipe.incr(&generation, 1).ignore().pexpire(&generation, 3_600_000).ignore().del(self.state_key(row)).ignore();
        }
        let result = pipe.query_async(&mut self.redis.clone()).await;
        self.observe(result)
    }

    /// Whether Redis answers within `limit`; failing marks it degraded.
    pub async fn ping(&self, limit: Duration) -> bool {
        let mut redis = self.redis.clone();
        match tokio::time::timeout(limit, redis::cmd("PING").query_async::<String>(&mut redis)).await {
            Ok(result) => self.observe(result).is_ok(),
            Err(_) => false,
        }
    }

    fn observe<T>(&self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        let failed = result.is_err();
        if self.degraded.swap(failed, Ordering::Relaxed) != failed {
            self.metrics.cache_degraded.set(failed as i64);
            match &result {
                Err(e) => tracing::warn!(error = %e, "Redis failing: serving from Postgres (degraded)"),
                Ok(_) => tracing::info!("Redis is back: cache in use"),
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_waits_by_its_size_within_half_the_calls_time() {
        let one = budget(1, None);
        let hundred = budget(100, None);
        assert!(one >= Duration::from_millis(25) && hundred > one, "{one:?} {hundred:?}");
        assert_eq!(budget(100, Some(Duration::from_millis(40))), Duration::from_millis(20), "half of what is left");
        assert_eq!(budget(1, Some(Duration::from_secs(1))), one, "sized by the read when time allows");
        assert_eq!(budget(1, Some(Duration::ZERO)), Duration::ZERO);
        assert!(budget(usize::MAX, None) < Duration::from_secs(60));
    }
}
