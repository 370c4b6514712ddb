//! `freshet-server`: serves features over gRPC.
//!
//! `serve` runs the FeatureService with health checking and reflection behind
//! the admission layers of `layers/`; `migrate` applies the store's schema;
//! `views` checks a feature-view file and prints what it declares.

mod cache;
mod coalesce;
mod commits;
mod evaluate;
mod freshness;
mod health;
mod hot;
mod layers;
mod metrics;
mod reader;
mod request;
mod served;
mod service;
mod watermarks;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use freshet_proto::v1::{FILE_DESCRIPTOR_SET, feature_service_server::FeatureServiceServer};
use freshet_store::{db, view::Catalog};
use futures::TryStreamExt as _;

/// glibc malloc and free were a tenth of a call's CPU; jemalloc, as in
/// ingest, takes less (see tests/bench/README.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "freshet-server", version, about = "Serves Freshet's features over gRPC")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve GetFeatures, GetFreshness and ListFeatureViews.
    Serve(Box<ServeArgs>),
    /// Apply the store's migrations to the database.
    Migrate(DbArgs),
    /// Check a feature-view file and print what it declares.
    Views(ViewsArgs),
}

#[derive(Args)]
struct DbArgs {
    /// Postgres URL of Freshet's store.
    #[arg(long, env = "FRESHET_DATABASE_URL")]
    database_url: String,
}

#[derive(Args)]
struct ViewsArgs {
    /// Feature-view file (TOML).
    #[arg(long, env = "FRESHET_VIEWS", default_value = "deploy/views/reference.toml")]
    views: PathBuf,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    views: ViewsArgs,
    /// Address to listen on; port 0 picks a free port (printed at start).
    #[arg(long, env = "FRESHET_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Ingest's consumer group, whose progress GetFreshness reports.
    #[arg(long, env = "FRESHET_GROUP", default_value = "freshet")]
    group: String,
    /// Whether the frames of the answers ready at one time go to the socket
    /// in one write (see server/src/coalesce.rs); false writes each as tonic
    /// does alone.
    #[arg(long, env = "FRESHET_COALESCE_WRITES", default_value_t = true, action = clap::ArgAction::Set)]
    coalesce_writes: bool,
    /// Streams one HTTP/2 connection may have open at once (its
    /// SETTINGS_MAX_CONCURRENT_STREAMS); a client past it waits on its
    /// side. Without a bound a flooding client opens a stream, and the server
    /// a task, for every call it sends, and memory grows with its backlog.
    #[arg(long, env = "FRESHET_MAX_STREAMS_PER_CONNECTION", default_value_t = 200)]
    max_streams_per_connection: u32,
    /// Calls in flight before new ones are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "FRESHET_MAX_IN_FLIGHT", default_value_t = 256)]
    max_in_flight: usize,
    /// Deadline for calls that bring none (and cap for those that do), in ms.
    #[arg(long, env = "FRESHET_DEFAULT_DEADLINE_MS", default_value_t = 1000)]
    default_deadline_ms: u64,
    /// Entities per GetFeatures request.
    #[arg(long, env = "FRESHET_MAX_ENTITIES", default_value_t = 1000)]
    max_entities: usize,
    /// Feature references per GetFeatures request.
    #[arg(long, env = "FRESHET_MAX_FEATURES", default_value_t = 1000)]
    max_features: usize,
    /// Values per GetFeatures answer (entities × features): what bounds one
    /// call's memory and time.
    #[arg(long, env = "FRESHET_MAX_VALUES", default_value_t = 100_000)]
    max_values: usize,
    /// Largest request message accepted, in bytes.
    #[arg(long, env = "FRESHET_MAX_REQUEST_BYTES", default_value_t = 4 << 20)]
    max_request_bytes: usize,
    /// Kafka brokers: GetFreshness then reports lag against the broker's
    /// own high watermarks, not only those ingest last saw.
    #[arg(long, env = "FRESHET_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// The CDC source database (Debezium's, or the direct source's): GetFreshness
    /// then reports its logical replication slots and how far behind they
    /// are, and a direct view's partition its slot's WAL.
    #[arg(long, env = "FRESHET_SOURCE_DATABASE_URL")]
    source_database_url: Option<String>,
    /// Redis URL of the cache; without it every read goes to Postgres.
    #[arg(long, env = "FRESHET_REDIS_URL")]
    redis_url: Option<String>,
    /// Prefix of the cache's keys; by default "freshet:<database name>", so
    /// that several stores can share one Redis.
    #[arg(long, env = "FRESHET_CACHE_PREFIX")]
    cache_prefix: Option<String>,
    /// Bytes of decoded state the hot tier keeps in the server's memory (in
    /// front of Redis and Postgres, refreshed on commit); 0 turns it off.
    /// The default keeps the server well under 256 MiB.
    #[arg(long, env = "FRESHET_HOT_CACHE_BYTES", default_value_t = 96 << 20)]
    hot_cache_bytes: u64,
    /// Longest a cached entry (in memory or Redis) may outlive a missed
    /// invalidation, in ms.
    #[arg(long, env = "FRESHET_CACHE_TTL_MS", default_value_t = 5000)]
    cache_ttl_ms: u64,
    /// While Postgres cannot be reached: how long past --cache-ttl-ms cached
    /// entries are still served (answers say so), and how long health stays
    /// SERVING on the caches alone, in ms; 0 turns this off.
    #[arg(long, env = "FRESHET_CACHE_STALE_MS", default_value_t = 60_000)]
    cache_stale_ms: u64,
    /// File of accepted bearer tokens, one per line; without it, no auth.
    #[arg(long, env = "FRESHET_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
    /// PEM certificate (chain) to serve TLS with; needs --tls-key.
    #[arg(long, env = "FRESHET_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FRESHET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`GET /metrics`); off if unset.
    #[arg(long, env = "FRESHET_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Postgres connections.
    #[arg(long, env = "FRESHET_DB_CONNECTIONS", default_value_t = 16)]
    db_connections: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    freshet_store::tls::install_crypto_provider();
    let _telemetry = freshet_store::telemetry::init("freshet-server").map_err(|e| anyhow::anyhow!(e))?;
    match Cli::parse().command {
        Command::Migrate(args) => db::migrate_command(&args.database_url).await?,
        Command::Views(args) => {
            let catalog = Catalog::load(&args.views)?;
            for view in &catalog.views {
                let features: Vec<&str> = view.features.iter().map(|f| f.name.as_str()).collect();
                println!("{}: {} features from {:?}: {}", view.name, features.len(), view.source.topics, features.join(", "));
            }
        }
        Command::Serve(args) => serve(*args).await?,
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let catalog = Arc::new(Catalog::load(&args.views.views)?);
    let tokens = match &args.tokens_file {
        Some(path) => layers::auth::read_tokens(path)?,
        None => Vec::new(),
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(metrics::ServerMetrics::new(&mut registry, layers::METHODS.iter().map(|(_, method)| *method)));
    if let Some(address) = args.metrics_listen {
        let bound = freshet_store::metrics::serve(Arc::new(registry), address).await?;
        println!("freshet-server metrics on http://{bound}/metrics");
    }
    let pool = db::connect(&args.db.database_url, args.db_connections).await?;
    db::ensure_migrated(&pool).await?;

    let ttl = Duration::from_millis(args.cache_ttl_ms);
    let stale_for = Duration::from_millis(args.cache_stale_ms);
    let hot = (args.hot_cache_bytes > 0).then(|| Arc::new(hot::HotTier::new(args.hot_cache_bytes, ttl, stale_for)));
    if let Some(hot) = &hot {
        metrics.hot_capacity.set(args.hot_cache_bytes as i64);
        tokio::spawn(watch_hot(hot.clone(), metrics.clone()));
    }
    let cache = match &args.redis_url {
        Some(url) => {
            let prefix = match &args.cache_prefix {
                Some(prefix) => prefix.clone(),
                None => format!("freshet:{}", sqlx::query_scalar::<_, String>("SELECT current_database()::text").fetch_one(&pool).await?),
            };
            Some(cache::Cache::connect(url, &prefix, ttl, stale_for, metrics.clone()).await?)
        }
        None => None,
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    let caches = health::Caches { redis: cache.clone(), hot: hot.clone(), stale_for };
    let (postgres, probe) = health::start(pool, caches, health.clone(), metrics.clone()).await;
    let reader = reader::Reader { postgres, cache, hot, catalog: catalog.clone() };
    if reader.cache.is_some() || reader.hot.is_some() {
        tokio::spawn(commits::follow(reader.clone(), metrics.clone()));
    }

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let watermarks = watermarks::Watermarks::default();
    if let Some(brokers) = &args.kafka_brokers {
        watermarks.follow(brokers, catalog.kafka_topics())?;
    }
    let source = match &args.source_database_url {
        Some(url) => {
            let source = db::connect(url, 2).await?;
            tokio::spawn(watch_slots(source.clone(), metrics.clone()));
            Some(source)
        }
        None => None,
    };
    let features = service::Features {
        watermarks,
        source,
        metrics: metrics.clone(),
        catalog,
        reader,
        group: args.group,
        limits: request::Limits { max_features: args.max_features, max_entities: args.max_entities, max_values: args.max_values },
    };
    let default_deadline = Duration::from_millis(args.default_deadline_ms);
    let limits = layers::Limits { max_in_flight: args.max_in_flight, default_deadline, metrics: metrics.clone(), tokens };
    let mut builder = tonic::transport::Server::builder().max_concurrent_streams(args.max_streams_per_connection);
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let identity = tonic::transport::Identity::from_pem(
            std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?,
            std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?,
        );
        builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }

    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    // Tests and scripts read this line to find the port.
    println!("freshet-server listening on {address}");
    tracing::info!(%address, "serving");

    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stopping, stopped) = tokio::sync::oneshot::channel();
    let server = builder
        .layer(layers::compose(&limits))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(FeatureServiceServer::new(features).max_decoding_message_size(args.max_request_bytes))
        .serve_with_incoming_shutdown(incoming.map_ok(|tcp| coalesce::Coalesced::new(tcp, args.coalesce_writes)), async {
            shutdown_signal().await;
            probe.abort();
            let _ = probe.await;
            health::stopping(health).await;
            tracing::info!("shutting down: NOT_SERVING; draining calls in flight");
            let _ = stopping.send(());
        });
    // No unary call outlives the default deadline; a stream that would hold
    // the drain open longer is cut.
    let drain = default_deadline + Duration::from_secs(1);
    let drained = async {
        match stopped.await {
            Ok(()) => tokio::time::sleep(drain).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        result = server => result?,
        () = drained => tracing::warn!(?drain, "calls still open after the drain period; stopping"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// The hot tier's size as metrics; evictions it owes are done first.
async fn watch_hot(hot: Arc<hot::HotTier>, metrics: Arc<metrics::ServerMetrics>) {
    loop {
        let (bytes, entries) = hot.usage();
        metrics.hot_bytes.set(bytes as i64);
        metrics.hot_entries.set(entries as i64);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Replication slot lag as metrics, so an alert fires before WAL fills the disk.
async fn watch_slots(source: sqlx::PgPool, metrics: Arc<metrics::ServerMetrics>) {
    loop {
        match service::replication_slots(&source).await {
            Ok(slots) => {
                for slot in slots {
                    metrics.slot(&slot.name, slot.lag_bytes, slot.retained_bytes, slot.active);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the source's replication slots"),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
