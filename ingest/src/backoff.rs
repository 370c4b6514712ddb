//! Exponential backoff with full jitter, for everything ingest retries:
//! Postgres commits, DLQ produces, claims. Jitter keeps several instances
//! that failed together from retrying together. Retries are unbounded, so
//! every wait gives way to shutdown: SIGTERM stops a process that is
//! retrying against a dead Postgres or broker.

use std::time::Duration;

use rand::Rng;

use crate::shutdown::{Abandoned, Shutdown};

pub struct Backoff {
    attempt: u32,
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { attempt: 0, base, max }
    }

    /// The ceiling of the next wait: base × 2^attempt, capped.
    fn ceiling(&self) -> Duration {
        self.base.saturating_mul(1u32 << self.attempt.min(20)).min(self.max)
    }

    /// The next wait: uniform in [ceiling/2, ceiling].
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt += 1;
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Waits the next delay, or less if shutdown is asked for first.
    pub async fn wait(&mut self, shutdown: &Shutdown) -> Result<(), Abandoned> {
        shutdown.sleep(self.next_delay()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_and_stays_jittered() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(5) && delays[0] <= Duration::from_millis(10));
        assert!(delays[3] >= Duration::from_millis(40) && delays[3] <= Duration::from_millis(80));
        for d in &delays[8..] {
            assert!(*d >= Duration::from_millis(500) && *d <= Duration::from_secs(1), "{d:?}");
        }
        assert_eq!(b.attempts(), 12);
    }

    #[tokio::test]
    async fn a_wait_gives_way_to_shutdown() {
        let shutdown = Shutdown::new(Duration::ZERO);
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_millis(1));
        assert_eq!(b.wait(&shutdown).await, Ok(()));
        let mut b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        shutdown.request();
        assert_eq!(b.wait(&shutdown).await, Err(Abandoned));
    }
}
