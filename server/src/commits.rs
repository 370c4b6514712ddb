//! Following ingest's commits, so that the caches serve what was committed.
//!
//! Each commit's NOTIFY (sent by `freshet_store::entities::notify_changes`,
//! delivered only if the commit is) names the rows it changed. For each
//! notification, in this order:
//!
//! 1. Redis drops the rows' entries and bumps their generations (`cache.rs`);
//! 2. the hot tier voids fills in flight and stops serving the rows (`hot.rs`);
//! 3. the rows the hot tier held are read again from Postgres, in one query,
//!    and put back, so the next read is served from memory, new value and all.
//!
//! Redis goes first: a read that misses the hot tier after step 2 must not
//! find the old state in Redis and put it back in memory. Refreshes run
//! beside the listener, a few at a time; when they fall behind, rows are left
//! marked changed and read on demand. If the listener loses its connection,
//! it reconnects, and the hot tier reads everything again once back
//! (notifications may have been missed); Redis entries expire by their TTL.

use std::{sync::Arc, time::Duration};

use freshet_store::{entities, entities::RowKey};
use tokio::sync::Semaphore;

use crate::{
    hot::{HotTier, Ticket},
    metrics::ServerMetrics,
    reader::Reader,
    served::Served,
};

/// Refresh queries at once; more rows wait for their next read.
const REFRESHES: usize = 4;

pub async fn follow(reader: Reader, metrics: Arc<ServerMetrics>) {
    let pool = reader.postgres.pool.clone();
    let refreshes = Arc::new(Semaphore::new(REFRESHES));
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for commits; cache entries expire by TTL meanwhile");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(entities::CHANGES_CHANNEL).await {
            tracing::warn!(error = %e, "LISTEN failed");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if let Some(hot) = &reader.hot {
            hot.distrust_all();
        }
        metrics.listening.set(1);
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => {
                    let rows = entities::parse_changes(notification.payload());
                    if let Some(cache) = &reader.cache
                        && let Err(e) = cache.invalidate(&rows).await
                    {
                        tracing::warn!(error = %e, rows = rows.len(), "invalidation failed; entries expire by TTL");
                    }
                    let Some(hot) = &reader.hot else { continue };
                    let held = hot.changed(rows);
                    if held.is_empty() {
                        continue;
                    }
                    // No permit: the rows stay marked changed, read on demand.
                    if let Ok(permit) = refreshes.clone().try_acquire_owned() {
                        let (reader, hot, metrics) = (reader.clone(), hot.clone(), metrics.clone());
                        tokio::spawn(async move {
                            refresh(&reader, &hot, held, &metrics).await;
                            drop(permit);
                        });
                    }
                }
                Ok(None) => {
                    tracing::warn!("commit notifications interrupted; reconnecting (entries expire by TTL meanwhile)");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "commit notifications failed; reconnecting");
                    break;
                }
            }
        }
        metrics.listening.set(0);
    }
}

/// Reads `rows` again and puts them back in the hot tier, unless a later
/// commit changed them meanwhile (their tickets say).
async fn refresh(reader: &Reader, hot: &HotTier, rows: Vec<(RowKey, Ticket)>, metrics: &ServerMetrics) {
    let born = std::time::Instant::now();
    let keys: Vec<RowKey> = rows.iter().map(|(row, _)| row.clone()).collect();
    let Ok(mut states) = reader.postgres_read(&keys).await else {
        // Left marked changed: the next read goes to the store.
        return;
    };
    for (row, ticket) in rows {
        // The tier holds only rows of views this server serves.
        let Some(view) = reader.catalog.view(&row.0) else { continue };
        let entry = states.remove(&row).map(|state| Arc::new(Served::new(&state, view)));
        if hot.fill(row, entry, born, ticket) {
            metrics.hot_refreshed.inc();
        }
    }
}
