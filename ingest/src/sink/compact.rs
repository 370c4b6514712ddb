//! Folding deltas into base rows, in the background.
//!
//! Commits only append deltas (`commit.rs`); without folding, an entity's
//! deltas would pile up and every read would merge them all. This task folds
//! the deltas of the entities with the oldest ones, batch after batch while
//! a backlog remains, then rests for an interval so that each entity's
//! deltas gather and one fold covers many commits. It runs on its own
//! connection and transaction, touches nothing Kafka does, and any number of
//! instances may run it at once (`entities::compact` says why).

use std::{sync::Arc, time::Duration};

use freshet_store::{entities, view::Catalog};
use sqlx::PgPool;

use crate::{backoff::Backoff, metrics::IngestMetrics, shutdown::Shutdown};

pub struct Compactor {
    pub pool: PgPool,
    pub catalog: Arc<Catalog>,
    /// Entities folded per transaction.
    pub entities_per_fold: i64,
    /// Rest between rounds once the backlog is gone.
    pub interval: Duration,
    pub metrics: Arc<IngestMetrics>,
}

impl Compactor {
    /// Runs until shutdown.
    pub async fn run(self, shutdown: Shutdown) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let catalog = &self.catalog;
            let prune = |view: &str, state: &mut freshet_store::state::EntityState| {
                if let Some(view) = catalog.view(view) {
                    state.prune(view);
                }
            };
            let rest = match shutdown.bounded(entities::compact(&self.pool, self.entities_per_fold, prune)).await {
                Err(_abandoned) => return,
                Ok(Ok(folded)) => {
                    backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
                    self.metrics.deltas_folded.inc_by(folded as u64);
                    // Folded fewer than a full round: the backlog is gone.
                    if folded < self.entities_per_fold as usize { self.interval } else { Duration::ZERO }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, attempt = backoff.attempts(), "compaction failed; retrying");
                    backoff.next_delay()
                }
            };
            if shutdown.sleep(rest).await.is_err() {
                return;
            }
        }
    }
}
