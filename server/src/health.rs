//! Whether the server can answer, and saying so.
//!
//! A probe asks Postgres on a connection of its own (so a busy pool is not
//! taken for a dead store) twice a second. While Postgres does not answer,
//! calls that need it fail at once with `UNAVAILABLE` instead of waiting for
//! their deadline, and a call already waiting is answered when the probe
//! finds the store down. Cached rows past their TTL (in memory or Redis) are
//! served meanwhile (`reader.rs`), for at most the caches' stale window.
//!
//! gRPC health is SERVING while Postgres answers, or, while it does not,
//! for the stale window if the hot tier holds rows or Redis answers (the
//! caches may then still answer); NOT_SERVING otherwise, and from the moment
//! shutdown begins. The service [`STORE`] says whether Postgres itself
//! answers, so a probe can tell "serving from its caches" from "serving".

use std::{future::Future, sync::Arc, time::Duration};

use freshet_proto::v1::feature_service_server::FeatureServiceServer;
use sqlx::{Connection, PgConnection, PgPool, postgres::PgConnectOptions};
use tokio::{sync::watch, time::Instant};
use tonic::Status;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{cache::Cache, hot::HotTier, metrics::ServerMetrics, service::Features};

/// The health service name whose status is Postgres's own: NOT_SERVING
/// while the server answers from its caches alone.
pub const STORE: &str = "freshet.store";

const PROBE_EVERY: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether Postgres answered the last probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachable {
    Yes,
    No { since: Instant },
}

/// Postgres as calls use it: the pool, behind the probe's verdict.
#[derive(Clone)]
pub struct Postgres {
    pub pool: PgPool,
    reachable: watch::Receiver<Reachable>,
}

impl Postgres {
    /// Runs `query`, unless Postgres is known to be down; gives up as soon
    /// as the probe finds it down.
    pub async fn run<T>(&self, query: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, Status> {
        let mut reachable = self.reachable.clone();
        if *reachable.borrow_and_update() != Reachable::Yes {
            return Err(down());
        }
        tokio::select! {
            result = query => result.map_err(unavailable),
            Ok(_) = reachable.wait_for(|r| *r != Reachable::Yes) => Err(down()),
        }
    }
}

fn down() -> Status {
    Status::unavailable("the feature store (Postgres) cannot be reached; retry with backoff")
}

pub fn unavailable(e: sqlx::Error) -> Status {
    tracing::warn!(error = %e, "store unavailable");
    Status::unavailable("the feature store is unavailable; retry with backoff")
}

/// The caches that can answer while Postgres cannot.
#[derive(Clone)]
pub struct Caches {
    pub redis: Option<Cache>,
    pub hot: Option<Arc<HotTier>>,
    /// How long they alone keep the server SERVING.
    pub stale_for: Duration,
}

impl Caches {
    /// Whether they may still answer some calls.
    async fn can_answer(&self) -> bool {
        if self.hot.as_ref().is_some_and(|hot| hot.holds_any()) {
            return true;
        }
        match &self.redis {
            Some(cache) => cache.ping(PROBE_EVERY).await,
            None => false,
        }
    }
}

/// Declares the server SERVING and starts probing the stores behind `pool`
/// and `caches`, keeping `health` up to date. Stop it (abort the task)
/// before [`stopping`].
pub async fn start(
    pool: PgPool,
    caches: Caches,
    health: HealthReporter,
    metrics: Arc<ServerMetrics>,
) -> (Postgres, tokio::task::JoinHandle<()>) {
    set(&health, ServingStatus::Serving).await;
    health.set_service_status(STORE, ServingStatus::Serving).await;
    let (reachable, receiver) = watch::channel(Reachable::Yes);
    let options = (*pool.connect_options()).clone();
    let task = tokio::spawn(probe(options, caches, health, reachable, metrics));
    (Postgres { pool, reachable: receiver }, task)
}

async fn probe(
    options: PgConnectOptions,
    caches: Caches,
    health: HealthReporter,
    reachable: watch::Sender<Reachable>,
    metrics: Arc<ServerMetrics>,
) {
    let mut connection: Option<PgConnection> = None;
    // Announced by `start`; from then on only changes are (Watch streams
    // hear of each one).
    let mut serving = true;
    loop {
        let up = match tokio::time::timeout(PROBE_TIMEOUT, ping(&mut connection, &options)).await {
            Ok(up) => up,
            Err(_) => {
                connection = None;
                false
            }
        };
        let stale_for = caches.stale_for;
        let changed = reachable.send_if_modified(|r| match (*r, up) {
            (Reachable::Yes, false) => {
                tracing::warn!(?stale_for, "Postgres cannot be reached: calls that need it fail; cached rows are served meanwhile");
                *r = Reachable::No { since: Instant::now() };
                true
            }
            (Reachable::No { .. }, true) => {
                tracing::info!("Postgres answers again");
                *r = Reachable::Yes;
                true
            }
            _ => false,
        });
        metrics.store_up.set(up as i64);
        if changed {
            health.set_service_status(STORE, if up { ServingStatus::Serving } else { ServingStatus::NotServing }).await;
        }
        let state = *reachable.borrow();
        let now_serving = match state {
            Reachable::Yes => true,
            Reachable::No { since } => since.elapsed() < stale_for && caches.can_answer().await,
        };
        if serving != now_serving {
            set(&health, if now_serving { ServingStatus::Serving } else { ServingStatus::NotServing }).await;
            serving = now_serving;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Whether Postgres answers, (re)connecting as needed.
async fn ping(connection: &mut Option<PgConnection>, options: &PgConnectOptions) -> bool {
    let conn = match connection {
        Some(conn) => conn,
        None => match PgConnection::connect_with(options).await {
            Ok(conn) => connection.insert(conn),
            Err(_) => return false,
        },
    };
    let ok = sqlx::query("SELECT 1").execute(&mut *conn).await.is_ok();
    if !ok {
        *connection = None;
    }
    ok
}

async fn set(health: &HealthReporter, status: ServingStatus) {
    let service = <FeatureServiceServer<Features> as tonic::server::NamedService>::NAME;
    health.set_service_status(service, status).await;
    health.set_service_status("", status).await;
}

/// Shutdown has begun: NOT_SERVING, so balancers stop sending calls while
/// those in flight drain; then the statuses are removed, which ends health
/// `Watch` streams (after they have seen NOT_SERVING) so that they do not
/// hold the drain open.
pub async fn stopping(mut health: HealthReporter) {
    set(&health, ServingStatus::NotServing).await;
    let service = <FeatureServiceServer<Features> as tonic::server::NamedService>::NAME;
    health.clear_service_status(service).await;
    health.clear_service_status("").await;
    health.clear_service_status(STORE).await;
}
