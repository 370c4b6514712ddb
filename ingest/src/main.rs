//! `freshet-ingest`: Kafka (or a Postgres slot) in, features out, exactly once.
//!
//! A record enters in `source/` (the rdkafka poll thread and the rebalance
//! protocol), becomes events and features in `transform/`, and is committed
//! with its offsets in one Postgres transaction by `sink/`; `pipeline.rs`
//! drives batches between them. Views with `format = "postgres"` are read
//! from a replication slot by `source/postgres/` instead, through the same
//! transform and sink, and need no Kafka at all.

mod backoff;
mod metrics;
mod pipeline;
mod shutdown;
mod sink;
mod source;
mod transform;

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::{Args, Parser, Subcommand};

use freshet_store::{db, owners, view::Catalog};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc keeps freed pages for 10 s by default, which a catch-up that
/// frees batch after batch turns into RSS; a background thread returns
/// them within a second.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

use crate::{
    metrics::IngestMetrics,
    pipeline::{BatchLimits, Pipeline},
    shutdown::Shutdown,
    sink::{compact::Compactor, dlq::DeadLetterQueue},
    source::{InFlight, Settings, StartPolicy},
};

#[derive(Parser)]
#[command(name = "freshet-ingest", version, about = "Consumes Kafka into Freshet's feature store, exactly once")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the views' topics and commit features with offsets.
    Run(RunArgs),
    /// Apply the store's migrations to the database.
    Migrate {
        #[arg(long, env = "FRESHET_DATABASE_URL")]
        database_url: String,
    },
    /// Recompute a view from Kafka after its definition changed (a feature
    /// or window added): delete its state and rewind its topics to the
    /// earliest retained offsets, in one transaction. Views sharing a topic
    /// with it are rebuilt too. Run it, then start ingest with the new file.
    Rebuild {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, env = "FRESHET_KAFKA_BROKERS")]
        brokers: String,
        /// The view to recompute.
        #[arg(long)]
        view: String,
    },
    /// Move the views of a file to a consumer group, with the offsets of the
    /// group that computed them so far (whose instances are fenced): to
    /// rename a group, or to take over from one that is gone.
    TakeOver {
        /// `--group`: the group that computes the views from now on.
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Drop a replication slot Freshet created for `format = "postgres"`
    /// views, once no view of the file reads it, and forget its checkpoint.
    /// Refuses a slot Freshet did not create.
    DropSlot {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        slot: String,
        /// Environment variable holding the source database URL.
        #[arg(long, default_value = "FRESHET_SOURCE_DATABASE_URL")]
        url_env: String,
    },
}

/// Which store, which views, which consumer group: what every command
/// that touches a group's views names.
#[derive(Args)]
struct StoreArgs {
    #[arg(long, env = "FRESHET_DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "FRESHET_VIEWS", default_value = "deploy/views/reference.toml")]
    views: PathBuf,
    /// Consumer group: partitions are shared among its instances.
    #[arg(long, env = "FRESHET_GROUP", default_value = "freshet")]
    group: String,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Needed when a view reads Kafka; a file of `format = "postgres"`
    /// views runs without.
    #[arg(long, env = "FRESHET_KAFKA_BROKERS")]
    brokers: Option<String>,
    /// Static group membership (Kafka `group.instance.id`): a restarted
    /// instance with the same id takes its partitions back at once, without
    /// waiting for the session timeout. Give each replica its own.
    #[arg(long, env = "FRESHET_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Where to start partitions with no stored offset.
    #[arg(long, env = "FRESHET_START", value_enum, default_value = "earliest")]
    start: StartPolicy,
    /// Records per batch (one Postgres transaction).
    #[arg(long, env = "FRESHET_BATCH_RECORDS", default_value_t = 20000)]
    batch_records: usize,
    /// Bytes per batch.
    #[arg(long, env = "FRESHET_BATCH_BYTES", default_value_t = 8 << 20)]
    batch_bytes: usize,
    /// How long a batch waits for more records after its first, in ms.
    #[arg(long, env = "FRESHET_LINGER_MS", default_value_t = 5)]
    linger_ms: u64,
    /// Records held (queued or batched) before partitions are paused.
    #[arg(long, env = "FRESHET_MAX_IN_FLIGHT_RECORDS", default_value_t = 50_000)]
    max_in_flight_records: usize,
    /// Bytes held before partitions are paused.
    #[arg(long, env = "FRESHET_MAX_IN_FLIGHT_BYTES", default_value_t = 64 << 20)]
    max_in_flight_bytes: usize,
    /// After SIGTERM, how long (ms) a commit or dead-letter produce in
    /// progress may still run before it is abandoned (left uncommitted, to
    /// be consumed again). Keep it below the orchestrator's grace period.
    #[arg(long, env = "FRESHET_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    shutdown_grace_ms: u64,
    /// Entities whose changes compaction folds per transaction.
    #[arg(long, env = "FRESHET_COMPACT_ENTITIES", default_value_t = 2000)]
    compact_entities: i64,
    /// Rest (ms) between compaction rounds once no backlog remains: changes
    /// gather meanwhile, so one fold covers many commits.
    #[arg(long, env = "FRESHET_COMPACT_INTERVAL_MS", default_value_t = 5000)]
    compact_interval_ms: u64,
    /// Postgres sources: retained WAL (bytes) a slot may keep on the source
    /// before ingest warns that it is falling behind.
    #[arg(long, env = "FRESHET_MAX_RETAINED_WAL_BYTES", default_value_t = 1 << 30)]
    max_retained_wal_bytes: i64,
    /// Where to serve Prometheus metrics (`GET /metrics`); off if unset.
    #[arg(long, env = "FRESHET_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    freshet_store::tls::install_crypto_provider();
    let _telemetry = freshet_store::telemetry::init("freshet-ingest").map_err(|e| anyhow::anyhow!(e))?;
    match Cli::parse().command {
        Command::Migrate { database_url } => Ok(db::migrate_command(&database_url).await?),
        Command::Run(args) => run(args).await,
        Command::TakeOver { store } => take_over(&store).await,
        Command::Rebuild { store, brokers, view } => rebuild(&store, &brokers, &view).await,
        Command::DropSlot { store, slot, url_env } => drop_slot(&store, &slot, &url_env).await,
    }
}

async fn rebuild(store: &StoreArgs, brokers: &str, view: &str) -> anyhow::Result<()> {
    let StoreArgs { database_url, views, group } = store;
    let catalog = Catalog::load(views)?;
    let (names, topics) = catalog.sharing_topics_with(view).ok_or_else(|| anyhow::anyhow!("no view {view:?} in {}", views.display()))?;
    let restarts = tokio::task::spawn_blocking({
        let (brokers, topics) = (brokers.to_string(), topics.clone());
        move || source::earliest_offsets(&brokers, &topics)
    })
    .await??;
    let pool = db::connect(database_url, 1).await?;
    db::ensure_migrated(&pool).await?;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    freshet_store::rebuild::rebuild(&pool, group, &names, &restarts).await?;
    println!("rebuilding views {names:?} of group {group} from the earliest offsets of {topics:?}");
    println!("start (or restart) freshet-ingest with this view file: it recomputes them from Kafka");
    Ok(())
}

async fn drop_slot(store: &StoreArgs, slot: &str, url_env: &str) -> anyhow::Result<()> {
    let catalog = Catalog::load(&store.views)?;
    if let Some(view) = catalog.views.iter().find(|v| v.source.postgres.as_ref().is_some_and(|p| p.slot == slot)) {
        anyhow::bail!("view {} of {} still reads slot {slot}: remove it from the file first", view.name, store.views.display());
    }
    let pool = db::connect(&store.database_url, 1).await?;
    db::ensure_migrated(&pool).await?;
    source::postgres::drop_slot(&pool, &source::postgres::SourceDb::from_env(url_env)?, slot).await?;
    println!("slot {slot} dropped, and its checkpoint forgotten");
    Ok(())
}

async fn take_over(store: &StoreArgs) -> anyhow::Result<()> {
    let StoreArgs { database_url, views, group } = store;
    let catalog = Catalog::load(views)?;
    let pool = db::connect(database_url, 1).await?;
    db::ensure_migrated(&pool).await?;
    let names: Vec<&str> = catalog.views.iter().map(|v| v.name.as_str()).collect();
    for (view, previous) in owners::take_over(&pool, group, &names, &catalog.topics()).await? {
        match previous {
            Some(previous) if previous != *group => println!("view {view}: taken over from group {previous} by group {group}"),
            Some(_) => println!("view {view}: already computed by group {group}"),
            None => println!("view {view}: now computed by group {group}"),
        }
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::new(Duration::from_millis(args.shutdown_grace_ms));
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            signalled().await;
            tracing::info!("shutdown requested");
            shutdown.request();
        }
    });
    let catalog = Arc::new(Catalog::load(&args.store.views)?);
    let topics = catalog.kafka_topics();
    let brokers = match (&args.brokers, topics.is_empty()) {
        (Some(brokers), _) => Some(brokers.clone()),
        (None, true) => None,
        (None, false) => anyhow::bail!("views read Kafka topics {topics:?}: set --brokers (FRESHET_KAFKA_BROKERS)"),
    };
    let pool = db::connect(&args.store.database_url, 4).await?;
    db::ensure_migrated(&pool).await?;
    let views: Vec<&str> = catalog.views.iter().map(|v| v.name.as_str()).collect();
    owners::adopt(&pool, &args.store.group, &views).await?;
    let owner = format!("{}-{}", hostname(), std::process::id());
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(IngestMetrics::new(&mut registry));
    if let Some(address) = args.metrics_listen {
        let bound = freshet_store::metrics::serve(Arc::new(registry), address).await?;
        println!("freshet-ingest metrics on http://{bound}/metrics");
    }
    let compactor = tokio::spawn(
        Compactor {
            pool: pool.clone(),
            catalog: catalog.clone(),
            entities_per_fold: args.compact_entities,
            interval: Duration::from_millis(args.compact_interval_ms),
            metrics: metrics.clone(),
        }
        .run(shutdown.clone()),
    );
    let direct = source::postgres::streams(source::postgres::Shared {
        catalog: catalog.clone(),
        pool: pool.clone(),
        group: args.store.group.clone(),
        owner: owner.clone(),
        metrics: metrics.clone(),
        max_batch_changes: args.batch_records,
        max_retained_wal_bytes: args.max_retained_wal_bytes,
    })?;
    let direct = tokio::spawn(source::postgres::run(direct, shutdown.clone()));
    let ran = match brokers {
        Some(brokers) if !topics.is_empty() => {
            tracing::info!(?topics, group = args.store.group, owner, "starting ingest");
            let dlq = DeadLetterQueue::new(&brokers, &args.store.group, &owner)?;
            let in_flight = Arc::new(InFlight::default());
            let (events, commands, poll_thread) = source::spawn(
                Settings {
                    brokers,
                    group: args.store.group.clone(),
                    instance_id: args.instance_id.clone(),
                    topics,
                    max_in_flight_records: args.max_in_flight_records,
                    max_in_flight_bytes: args.max_in_flight_bytes,
                    catalog: catalog.clone(),
                    metrics: metrics.clone(),
                },
                in_flight.clone(),
            )?;
            let pipeline = Pipeline::new(
                catalog,
                pool,
                args.store.group,
                owner,
                args.start,
                dlq,
                in_flight,
                commands,
                BatchLimits { max_records: args.batch_records, max_bytes: args.batch_bytes, linger: Duration::from_millis(args.linger_ms) },
                metrics,
                shutdown.clone(),
            );
            let ran = pipeline.run(events).await;
            shutdown.request();
            tokio::task::spawn_blocking(move || poll_thread.join()).await?.ok();
            ran.map_err(anyhow::Error::from)
        }
        // Postgres sources only: they run until shutdown.
        _ => Ok(()),
    };
    let direct = direct.await?;
    shutdown.request();
    compactor.await?;
    tracing::info!("stopped");
    ran.and(direct)
}

async fn signalled() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "ingest".into())
}
