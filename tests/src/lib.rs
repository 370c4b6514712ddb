//! The end-to-end test harness: real Kafka, Postgres and Redis, started by
//! `deploy/local/run-tests.sh` (which calls `deploy/local/services.sh`) and
//! found through the `FRESHET_*` variables it exports.
//!
//! Tests are parallel-safe: each gets its own database, topics, consumer
//! group and server port.

pub mod acts;
pub mod cpu;
pub mod dlq;
pub mod freshness;
pub mod histogram;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use rand::Rng;
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
};

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests through deploy/local/run-tests.sh"))
}

pub fn brokers() -> String {
    env("FRESHET_KAFKA_BROKERS")
}

/// A name no other test (or run) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand::rng().random::<u32>())
}

/// A fresh, migrated database of its own; returns its URL.
pub async fn fresh_database() -> String {
    fresh_database_at(&env("FRESHET_DATABASE_URL")).await
}

/// A fresh, migrated database on the server of `admin_url`.
pub async fn fresh_database_at(admin_url: &str) -> String {
    let name = unique("t");
    let admin = sqlx::PgPool::connect(admin_url).await.expect("connect to Postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await.expect("create database");
    admin.close().await;
    let url = match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("unexpected database URL {admin_url}"),
    };
    let pool = freshet_store::db::connect(&url, 1).await.unwrap();
    freshet_store::db::migrate(&pool).await.unwrap();
    pool.close().await;
    url
}

pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("admin client");
    let results = admin
        .create_topics(&[NewTopic::new(name, partitions, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .expect("create topic");
    for r in results {
        r.expect("topic created");
    }
}

/// A built binary of the workspace (`cargo build --workspace --bins` ran first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // Tests run from target/<profile>/deps/, benchmarks from target/<profile>/.
    let dir = exe.parent().unwrap();
    [dir.join(name), dir.parent().unwrap().join(name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} is not built next to {}: run `cargo build --workspace --bins` first", exe.display()))
}

/// A child process killed (SIGKILL) when dropped.
pub struct Process {
    pub child: Child,
}

impl Process {
    pub fn start(command: &mut Command) -> Process {
        Process { child: command.spawn().expect("start process") }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        send_sigterm(self.child.id());
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("process {} did not stop within 30 s of SIGTERM", self.child.id());
    }
}

fn send_sigterm(pid: u32) {
    let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `freshet-ingest run` for `views`, into `database_url`, in `group`.
pub fn ingest(views: &std::path::Path, database_url: &str, group: &str, instance: &str) -> Process {
    ingest_with(views, database_url, group, instance, &[])
}

/// `ingest` with extra command-line arguments.
pub fn ingest_with(views: &std::path::Path, database_url: &str, group: &str, instance: &str, extra: &[&str]) -> Process {
    Process::start(
        Command::new(binary("freshet-ingest"))
            .arg("run")
            .args(extra)
            .env("FRESHET_VIEWS", views)
            .env("FRESHET_DATABASE_URL", database_url)
            .env("FRESHET_KAFKA_BROKERS", brokers())
            .env("FRESHET_GROUP", group)
            .env("FRESHET_INSTANCE_ID", instance)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    )
}

/// Writes a feature-view file for a test into a temporary directory.
pub fn views_file(text: &str) -> (tempfile_dir::Dir, PathBuf) {
    let dir = tempfile_dir::Dir::new();
    let path = dir.path.join("views.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// A temporary directory removed on drop.
pub mod tempfile_dir {
    pub struct Dir {
        pub path: std::path::PathBuf,
    }

    impl Dir {
        pub fn new() -> Dir {
            let path = std::env::temp_dir().join(super::unique("freshet-test"));
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }

    impl Default for Dir {
        fn default() -> Self {
            Self::new()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Polls `check` every 200 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() > end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `freshet-server serve` on a free port; returns it with its address.
pub fn server(views: &std::path::Path, database_url: &str, extra: &[&str]) -> (Process, std::net::SocketAddr) {
    server_with_env(views, database_url, extra, &[])
}

/// `server` with extra environment variables (OTEL_*, say).
pub fn server_with_env(
    views: &std::path::Path,
    database_url: &str,
    extra: &[&str],
    vars: &[(&str, &str)],
) -> (Process, std::net::SocketAddr) {
    use std::io::BufRead;
    let mut process = Process::start(server_command(views, database_url, extra).envs(vars.iter().copied()).stdout(Stdio::piped()));
    let stdout = process.child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let address = loop {
        let line = lines.next().expect("server exited before listening").unwrap();
        if let Some(address) = line.strip_prefix("freshet-server listening on ") {
            break address.parse().unwrap();
        }
    };
    // Keep draining its output so that logging never blocks or fails.
    std::thread::spawn(move || lines.for_each(drop));
    (process, address)
}

fn server_command(views: &std::path::Path, database_url: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(binary("freshet-server"));
    command
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        // Only what the test asks for: no cache or broker from the runner's environment.
        .env_remove("FRESHET_REDIS_URL")
        .env_remove("FRESHET_KAFKA_BROKERS")
        .env("FRESHET_VIEWS", views)
        .env("FRESHET_DATABASE_URL", database_url)
        .env("RUST_LOG", "warn");
    command
}

/// `freshet-server serve` that must refuse to start: returns what it said
/// on stderr. Fails the test if it is still running after 30 s.
pub fn server_refusal(views: &std::path::Path, database_url: &str, extra: &[&str]) -> String {
    use std::io::Read;
    let mut process = Process::start(server_command(views, database_url, extra).stdout(Stdio::null()).stderr(Stdio::piped()));
    for _ in 0..300 {
        if let Some(status) = process.child.try_wait().unwrap() {
            assert!(!status.success(), "freshet-server {extra:?} exited successfully instead of refusing to start");
            let mut stderr = String::new();
            process.child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
            return stderr;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("freshet-server {extra:?} started instead of refusing to");
}

/// Locks `feature_state` of the database at `url` until the returned
/// transaction is dropped: calls that read the store wait meanwhile.
pub async fn lock_feature_state(url: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE feature_state IN ACCESS EXCLUSIVE MODE").execute(&mut *blocker).await.unwrap();
    blocker
}

pub fn reference_views() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/reference.toml"))
}

/// Runs `deploy/local/services.sh` with `args` (to start private services or
/// simulate outages), returning its stdout.
pub fn services(args: &[&str]) -> String {
    let out = Command::new(env("FRESHET_SERVICES_SCRIPT")).args(args).output().expect("run services.sh");
    assert!(out.status.success(), "services.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A value exported by `services.sh start` for the services under `dir`.
pub fn service_env(dir: &std::path::Path, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join("env")).expect("services env file");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("export {name}=")))
        .unwrap_or_else(|| panic!("{name} not in {}", dir.display()))
        .trim_matches('"')
        .to_string()
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Scrapes a Prometheus endpoint: `name{labels}` → value.
pub async fn scrape(port: u16) -> std::collections::BTreeMap<String, f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return Default::default() };
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?))))
        .collect()
}

/// One event for `view`'s entity `entity` at `at_ms`, with `fields`.
pub fn event(entity: i64, at_ms: i64, fields: &[(&str, freshet_store::state::Scalar)]) -> freshet_store::state::Event {
    freshet_store::state::Event {
        entity: entity.to_string(),
        at_ms,
        fields: fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
    }
}

/// Writes `events` into `view` of the reference views, with the same code
/// ingest uses to apply and store them.
pub async fn store_events(url: &str, view: &str, events: Vec<freshet_store::state::Event>) {
    use freshet_store::state::{Direction, EntityState};
    let catalog = freshet_store::view::Catalog::load(&reference_views()).unwrap();
    let view = catalog.view(view).unwrap();
    let mut states: std::collections::BTreeMap<String, EntityState> = Default::default();
    for e in &events {
        states.entry(e.entity.clone()).or_default().apply(view, e, Direction::Add, true);
    }
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let rows: Vec<_> = states.into_iter().map(|(entity, s)| ((view.name.clone(), entity), s)).collect();
    freshet_store::entities::store(&mut tx, &rows).await.unwrap();
    tx.commit().await.unwrap();
}

/// A test-local OTLP/gRPC endpoint (the `TraceService` of the official
/// opentelemetry-proto definitions, as an OpenTelemetry Collector serves it)
/// that keeps every span it receives.
#[derive(Clone, Default)]
pub struct Collector {
    pub spans: std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

/// Starts a [`Collector`]; returns it with its endpoint URL.
pub async fn start_collector() -> (Collector, String) {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder().add_service(service).serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (collector, format!("http://{address}"))
}
