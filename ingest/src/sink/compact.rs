//! Folding deltas into base rows, in the background.
//!
//! Commits only append deltas (`commit.rs`); without folding, an entity's
//! deltas would pile up and every read would merge them all. Folding an
//! entity rewrites its whole base, so folding right after every commit would
//! cost what appending deltas saves. This task works in passes: a pass folds
//! every entity that has a delta older than the pass's start, transaction
//! after transaction, then the task rests for an interval, so that each
//! entity's deltas gather and one fold covers many commits. Deltas then live
//! about one interval plus one pass. It runs on its own connection and
//! transactions, touches nothing Kafka does, and any number of instances may
//! run it at once (`entities::compact` says why).

use std::{sync::Arc, time::Duration};

use freshet_store::{entities, state::EntityState, view::Catalog};
use sqlx::PgPool;

use crate::{
    backoff::Backoff,
    metrics::IngestMetrics,
    shutdown::{Abandoned, Shutdown},
};

pub struct Compactor {
    pub pool: PgPool,
    pub catalog: Arc<Catalog>,
    /// Entities folded per transaction.
    pub entities_per_fold: i64,
    /// Rest between passes.
    pub interval: Duration,
    pub metrics: Arc<IngestMetrics>,
}

impl Compactor {
    /// Runs until shutdown.
    pub async fn run(self, shutdown: Shutdown) {
        loop {
            if self.pass(&shutdown).await.is_err() || shutdown.sleep(self.interval).await.is_err() {
                return;
            }
        }
    }

    /// Folds the entities with deltas up to the newest at its start; errors
    /// are retried with backoff.
    async fn pass(&self, shutdown: &Shutdown) -> Result<(), Abandoned> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let prune = |view: &str, state: &mut EntityState| {
            if let Some(view) = self.catalog.view(view) {
                state.prune(view);
            }
        };
        let cutoff = loop {
            match shutdown.bounded(entities::newest_delta(&self.pool)).await? {
                Ok(Some(newest)) => break newest,
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, attempt = backoff.attempts(), "compaction failed; retrying");
                    backoff.wait(shutdown).await?;
                }
            }
        };
        loop {
            // 0: nothing up to the cutoff is left (or free): the pass is done.
            match shutdown.bounded(entities::compact(&self.pool, self.entities_per_fold, cutoff, prune)).await? {
                Ok(0) => return Ok(()),
                Ok(folded) => {
                    self.metrics.deltas_folded.inc_by(folded as u64);
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt = backoff.attempts(), "compaction failed; retrying");
                    backoff.wait(shutdown).await?;
                }
            }
        }
    }
}
