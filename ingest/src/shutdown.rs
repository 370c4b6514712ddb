//! Shutdown as ingest sees it: asked for (SIGTERM, or views taken over by
//! another group), then a grace period for the work in progress, then that
//! work is abandoned. Retries are unbounded, so every retry wait and every
//! call that can hang (a commit stuck on a lock, a produce to a dead broker)
//! goes through here: the process always stops within the grace period.
//! Abandoned work is safe to drop: nothing was committed, and the next
//! owner of its partitions consumes it again from the store's offsets.

use std::{
    future::Future,
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Shutdown came first: the work was left undone and uncommitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned;

#[derive(Clone)]
pub struct Shutdown {
    token: CancellationToken,
    /// How long work in progress may still run once shutdown is asked for.
    grace: Duration,
    /// When the grace ends: one deadline for all the work that remains.
    deadline: Arc<OnceLock<Instant>>,
}

impl Shutdown {
    pub fn new(grace: Duration) -> Self {
        Self { token: CancellationToken::new(), grace, deadline: Arc::default() }
    }

    pub fn request(&self) {
        self.deadline.get_or_init(|| Instant::now() + self.grace);
        self.token.cancel();
    }

    /// Resolves once shutdown is asked for.
    pub async fn requested(&self) {
        self.token.cancelled().await
    }

    /// Runs `work`, unless it is still running when the grace period that
    /// follows a shutdown request ends.
    pub async fn bounded<F: Future>(&self, work: F) -> Result<F::Output, Abandoned> {
        tokio::select! {
            out = work => Ok(out),
            _ = async {
                self.token.cancelled().await;
                tokio::time::sleep_until(*self.deadline.get().expect("set before cancelling")).await;
            } => Err(Abandoned),
        }
    }

    /// Sleeps `delay`, or less if shutdown is asked for first.
    pub async fn sleep(&self, delay: Duration) -> Result<(), Abandoned> {
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.token.cancelled() => Err(Abandoned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_gets_its_grace_then_is_abandoned() {
        let shutdown = Shutdown::new(Duration::from_secs(10));
        assert_eq!(shutdown.bounded(async { 7 }).await, Ok(7));
        shutdown.request();
        assert_eq!(shutdown.bounded(tokio::time::sleep(Duration::from_secs(5))).await, Ok(()), "within the grace");
        let started = Instant::now();
        assert_eq!(shutdown.bounded(std::future::pending::<()>()).await, Err(Abandoned), "past the grace");
        assert_eq!(started.elapsed(), Duration::from_secs(5), "one grace period for all the work, not one each");
        assert_eq!(shutdown.sleep(Duration::from_secs(3600)).await, Err(Abandoned));
    }
}
