//! Serving benchmark: what freshet-server does per call, measured so that
//! the figures are the server's rather than the load generator's.
//!
//! Run through `tests/bench/run.sh serve` (release build, Postgres and Redis
//! started, this process pinned to the generator's core). The server runs
//! on a core of its own (`BENCH_SERVER_CPUS`, default 0) with one runtime
//! thread; this process, `ghz`, Postgres and Redis on the other
//! (`BENCH_LOAD_CPUS`, default 1). 10,000 users of a 50-feature view.
//!
//! For each serving mode (hot tier warm when the server has one, Redis
//! warm, Postgres only) and each call (the empty RPC: the server's own
//! `grpc.health.v1.Health/Check`; 1 entity × 50 features; 100 entities ×
//! 10 features), with the project's generator and with `ghz`:
//! - capacity: a closed loop of 16 callers;
//! - latency at half of capacity: an open loop, counted from each call's
//!   scheduled time, with the generator's send slip beside it;
//! - the server's own latency histogram over the same calls (from /metrics);
//! - CPU time per call of the server, and of Redis and Postgres.
//!
//! Then 5× capacity against `--max-in-flight 8` (admitted and refused
//! calls, RSS during and after), tracing on and off, and Feast's Python
//! feature server on the same data shape when `run.sh --with-feast` set it up.
//! `BENCH_ONLY=hot-all,overload` (modes `hot`, `hot-all`, `redis`,
//! `postgres`; `overload`; `tracing`) runs only those parts.

mod feast;
mod ghz;
mod load;
mod probe;

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use freshet_proto::v1::{EntityKey, FeatureStatus, GetFeaturesRequest, entity_key::Key, feature_service_client::FeatureServiceClient};
use freshet_store::{
    entities,
    state::{Direction, EntityState, Event, Scalar},
    view::Catalog,
};
use freshet_tests::histogram::Histogram;
use freshet_tests::{Process, env, fresh_database, unique, views_file};
use load::{Load, Outcome, Sample};
use probe::{Cpu, Metrics, Processes};
use prost::{Message, bytes::Bytes};
use rand::{SeedableRng, seq::SliceRandom};

const USERS: i64 = 10_000;
const PHASE: Duration = Duration::from_secs(4);
const CALLERS: usize = 16;
const HEALTH: &str = "/grpc.health.v1.Health/Check";
const GET_FEATURES: &str = "/freshet.v1.FeatureService/GetFeatures";

fn wide_views() -> String {
    let mut text = String::from(
        "[[view]]\nname = \"wide\"\nentity = \"user\"\nentity_type = \"int64\"\nmax_age = \"7d\"\nfreshness_budget = \"5s\"\n\
         [view.source]\ntopics = [\"bench\"]\nformat = \"json\"\nevent_time = \"at\"\n",
    );
    for i in 0..25 {
        text += &format!("[[view.feature]]\nname = \"n_{i}\"\naggregation = \"count\"\nwindow = \"{}m\"\n", i + 1);
        text += &format!("[[view.feature]]\nname = \"last_{i}\"\naggregation = \"last\"\nfield = \"f{i}\"\ntype = \"double\"\n");
    }
    text
}

/// 20 events per user over the last 200 s, stored as ingest stores them.
async fn load_states(url: &str, catalog: &Catalog) {
    let view = &catalog.views[0];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let users: Vec<i64> = (1..=USERS).collect();
    for chunk in users.chunks(1000) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|&user| {
                let mut state = EntityState::default();
                for e in 0..20 {
                    let fields = (0..25).map(|i| (format!("f{i}"), Scalar::Double((user * e + i) as f64))).collect();
                    state.apply(view, &Event { entity: user.to_string(), at_ms: now - e * 10_000, fields }, Direction::Add, true);
                }
                (("wide".to_string(), user.to_string()), state)
            })
            .collect();
        let mut tx = pool.begin().await.unwrap();
        entities::store(&mut tx, &rows).await.unwrap();
        tx.commit().await.unwrap();
    }
}

/// Which cores the server gets, and which everything else.
struct Cores {
    server: String,
    load: String,
}

impl Cores {
    fn from_env() -> Cores {
        let or = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
        Cores { server: or("BENCH_SERVER_CPUS", "0"), load: or("BENCH_LOAD_CPUS", "1") }
    }
}

/// Where GetFeatures reads come from.
#[derive(Clone, Copy)]
enum Mode {
    /// The in-memory hot tier at its default size, warm, in front of Redis.
    Hot,
    /// The same, writing each frame as tonic does alone, not coalescing the
    /// frames of the answers ready at one time into one write.
    HotUncoalesced,
    /// The same, sized to hold every user: the in-memory path alone.
    HotHoldingAll,
    /// Redis warm, no hot tier.
    Redis,
    /// No Redis, no hot tier: every read from Postgres.
    Postgres,
}

impl Mode {
    /// Its name in `BENCH_ONLY`.
    fn id(self) -> &'static str {
        match self {
            Mode::Hot => "hot",
            Mode::HotUncoalesced => "hot-uncoalesced",
            Mode::HotHoldingAll => "hot-all",
            Mode::Redis => "redis",
            Mode::Postgres => "postgres",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Hot => "hot tier (warm)",
            Mode::HotUncoalesced => "hot tier, writes not coalesced",
            Mode::HotHoldingAll => "hot tier holding all (1 GiB)",
            Mode::Redis => "Redis only (warm)",
            Mode::Postgres => "Postgres only",
        }
    }

    /// Server arguments; `hot_tier` says whether the server has one to turn
    /// off. Each server gets Redis keys of its own, which it warms itself.
    fn args(self, redis: &str, hot_tier: bool, max_in_flight: usize) -> Vec<String> {
        let mut args: Vec<String> = vec!["--max-in-flight".into(), max_in_flight.to_string()];
        if !matches!(self, Mode::Postgres) {
            let prefix = unique("bench");
            args.extend(["--redis-url", redis, "--cache-prefix", prefix.as_str(), "--cache-ttl-ms", "600000"].map(String::from));
        }
        match self {
            Mode::HotHoldingAll => args.extend(["--hot-cache-bytes", "1073741824"].map(String::from)),
            Mode::HotUncoalesced => args.extend(["--coalesce-writes", "false"].map(String::from)),
            Mode::Redis | Mode::Postgres if hot_tier => args.extend(["--hot-cache-bytes", "0"].map(String::from)),
            _ => {}
        }
        args
    }
}

#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    entities: usize,
    features: usize,
}

const SHAPES: [Shape; 2] = [Shape { name: "1 × 50", entities: 1, features: 50 }, Shape { name: "100 × 10", entities: 100, features: 10 }];

fn request(entities: &[i64], features: usize) -> GetFeaturesRequest {
    GetFeaturesRequest {
        features: (0..features).map(|f| if f % 2 == 0 { format!("wide:n_{}", f / 2) } else { format!("wide:last_{}", f / 2) }).collect(),
        entities: entities.iter().map(|&e| EntityKey { key: Some(Key::Int64Key(e)) }).collect(),
        max_age: None,
    }
}

/// The requests of `shape`, encoded once: one per user for a single entity,
/// else 1000 draws of distinct users.
fn prepared(shape: Shape) -> Vec<Bytes> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let encode = |users: &[i64]| Bytes::from(request(users, shape.features).encode_to_vec());
    if shape.entities == 1 {
        let mut users: Vec<i64> = (1..=USERS).collect();
        users.shuffle(&mut rng);
        users.iter().map(|u| encode(&[*u])).collect()
    } else {
        (0..1000)
            .map(|_| {
                let users: Vec<i64> =
                    rand::seq::index::sample(&mut rng, USERS as usize, shape.entities).into_iter().map(|i| i as i64 + 1).collect();
                encode(&users)
            })
            .collect()
    }
}

/// Reads every user's 50 features once, so caches are warm, and checks the
/// answers: a benchmark of wrong answers would be worthless.
async fn warm_and_check(address: SocketAddr) {
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    let mut client = FeatureServiceClient::new(channel);
    let users: Vec<i64> = (1..=USERS).collect();
    for chunk in users.chunks(100) {
        let answer = client.get_features(request(chunk, 50)).await.unwrap().into_inner();
        assert_eq!(answer.results.len(), chunk.len(), "one row per entity");
        for row in &answer.results {
            assert_eq!(row.values.len(), 50, "one value per feature");
            assert!(row.values.iter().all(|v| v.status != FeatureStatus::NotFound as i32), "every user is stored");
        }
    }
}

/// freshet-server pinned to its core, with metrics on.
struct Server {
    _process: Process,
    address: SocketAddr,
    metrics: u16,
    processes: Processes,
}

impl Server {
    fn start(views: &Path, url: &str, args: &[String], vars: &[(&str, &str)], cores: &Cores, stores: Processes) -> Server {
        let metrics = freshet_tests::free_port();
        let listen = format!("127.0.0.1:{metrics}");
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.extend(["--metrics-listen", &listen]);
        // One runtime thread: it has one core.
        let vars = [&[("TOKIO_WORKER_THREADS", "1")], vars].concat();
        let (process, address) = freshet_tests::server_with_env(views, url, &all, &vars);
        let pid = process.child.id();
        probe::pin(pid, &cores.server);
        let allowed = probe::allowed_cpus(pid);
        assert_eq!(allowed, vec![cores.server.clone()], "every thread of freshet-server pinned");
        Server { _process: process, address, metrics, processes: Processes { server: pid, ..stores } }
    }

    async fn snapshot(&self) -> Snapshot {
        Snapshot { cpu: self.processes.cpu(), metrics: freshet_tests::scrape(self.metrics).await }
    }
}

/// CPU time and the server's metrics at one instant.
struct Snapshot {
    cpu: Cpu,
    metrics: Metrics,
}

/// What the server did over some calls, by its own account.
struct Delta {
    /// µs per call.
    cpu: Cpu,
    server: Option<Histogram>,
    reads: String,
}

impl Snapshot {
    fn until(&self, later: &Snapshot, path: &str, calls: usize) -> Delta {
        const CALLS: &str = "freshet_server_call_duration_seconds";
        let label = format!("method=\"{}\"", path.rsplit('/').next().unwrap());
        Delta {
            cpu: later.cpu.per_call_since(&self.cpu, calls),
            server: Some(Histogram::of(&later.metrics, CALLS, &label).since(&Histogram::of(&self.metrics, CALLS, &label))),
            reads: probe::cache_reads(&self.metrics, &later.metrics),
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// The `p` quantile of sorted durations, in ms.
fn pct(sorted: &[Duration], p: f64) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    ms(sorted[i])
}

fn sorted(samples: &[Sample], outcome: Outcome, field: impl Fn(&Sample) -> Duration) -> Vec<Duration> {
    let mut v: Vec<Duration> = samples.iter().filter(|s| s.outcome == outcome).map(field).collect();
    v.sort();
    v
}

fn cpu_cells(cpu: &Cpu) -> String {
    format!("{:.1} | {:.1} | {:.1}", cpu.server, cpu.redis, cpu.postgres)
}

/// What a row is about: the system and its mode, the call, the generator.
#[derive(Clone, Copy)]
struct Row<'a> {
    who: &'a str,
    call: &'a str,
    generator: &'a str,
}

/// The two tables every case adds a row to.
#[derive(Default)]
struct Tables {
    capacity: Vec<String>,
    latency: Vec<String>,
}

impl Tables {
    fn capacity(&mut self, Row { who, call, generator }: Row, rate: f64, empty: Option<f64>, delta: &Delta) {
        let share = empty.map_or("-".into(), |e| format!("{:.0}%", 100.0 * rate / e));
        self.capacity.push(format!("| {who} | {call} | {generator} | {rate:.0} | {share} | {} | {} |", cpu_cells(&delta.cpu), delta.reads));
        eprintln!("{}", self.capacity.last().unwrap());
    }

    fn latency(&mut self, Row { who, call, generator }: Row, rate: f64, client: [String; 3], slip: String, delta: &Delta) {
        let server = delta.server.as_ref().map_or(["-".into(), "-".into(), "-".into()], |h| [0.5, 0.99, 0.999].map(|q| h.quantile_ms(q)));
        self.latency.push(format!(
            "| {who} | {call} | {generator} | {rate:.0} | {} | {slip} | {} | {} | {} |",
            client.join(" | "),
            server.join(" | "),
            cpu_cells(&delta.cpu),
            delta.reads
        ));
        eprintln!("{}", self.latency.last().unwrap());
    }

    fn print(&self) {
        println!("Capacity (closed loop, {CALLERS} callers, {} s); CPU µs per call over the same calls:", PHASE.as_secs());
        println!();
        println!(
            "| system, mode | call | generator | calls/s | vs empty RPC | server CPU µs/call | Redis µs/call | Postgres µs/call | reads by source |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        self.capacity.iter().for_each(|r| println!("{r}"));
        println!();
        println!(
            "Latency at half of capacity (open loop, {} s): client ms from each call's scheduled time (ghz: from its send), \
             the generator's send slip, the server's own histogram (interpolated inside its buckets), CPU µs per call:",
            PHASE.as_secs()
        );
        println!();
        println!(
            "| system, mode | call | generator | calls/s | client p50 | p99 | p99.9 | send slip p99 | server p50 | p99 | p99.9 | server CPU µs/call | Redis | Postgres | reads by source |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        self.latency.iter().for_each(|r| println!("{r}"));
    }
}

/// Capacity, then latency at half of it, of `load` with the project's
/// generator; returns the capacity.
async fn own_case(tables: &mut Tables, server: &Server, who: &str, call: &str, load: &Load, path: &str, empty: Option<f64>) -> f64 {
    eprintln!("bench_serve: {who}, {call}, project generator");
    let row = Row { who, call, generator: "project's" };
    load.closed_loop(4, PHASE / 2).await;
    let before = server.snapshot().await;
    let capacity = load.closed_loop(CALLERS, PHASE).await;
    let after = server.snapshot().await;
    let delta = before.until(&after, path, (capacity * PHASE.as_secs_f64()) as usize);
    tables.capacity(row, capacity, empty, &delta);
    latency_case(tables, server, row, load, path, capacity / 2.0).await;
    capacity
}

/// `load` at `rate` in open loop: a row of the latency table.
async fn latency_case(tables: &mut Tables, server: &Server, row: Row<'_>, load: &Load, path: &str, rate: f64) {
    let before = server.snapshot().await;
    let samples = load.open_loop(rate, PHASE).await;
    let after = server.snapshot().await;
    let mut delta = before.until(&after, path, samples.len());
    let failed = samples.iter().filter(|s| s.outcome == Outcome::Failed).count();
    if failed > 0 {
        delta.reads = format!("{}; failed {failed}", delta.reads);
    }
    let latency = sorted(&samples, Outcome::Admitted, |s| s.latency);
    let slip = sorted(&samples, Outcome::Admitted, |s| s.slip);
    let client = [0.5, 0.99, 0.999].map(|p| pct(&latency, p));
    tables.latency(row, rate, client, pct(&slip, 0.99), &delta);
}

/// The same with ghz; returns the capacity it reached.
async fn ghz_case(tables: &mut Tables, server: &Server, ghz: &ghz::Ghz, row: Row<'_>, data: &Path, path: &str, empty: Option<f64>) -> f64 {
    eprintln!("bench_serve: {}, {}, ghz", row.who, row.call);
    let method = path.trim_start_matches('/').replace('/', ".");
    let address = server.address.to_string();
    let before = server.snapshot().await;
    let run = ghz.closed_loop(&address, &method, data, CALLERS, PHASE).await;
    let after = server.snapshot().await;
    tables.capacity(row, run.rate, empty, &with_failures(before.until(&after, path, run.calls), &run));
    let capacity = run.rate;

    let before = server.snapshot().await;
    let run = ghz.open_loop(&address, &method, data, capacity / 2.0, PHASE).await;
    let after = server.snapshot().await;
    let client = [0.5, 0.99, 0.999].map(|p| pct(&run.latencies, p));
    tables.latency(row, run.rate, client, "-".into(), &with_failures(before.until(&after, path, run.calls), &run));
    capacity
}

/// ghz counts the calls it cuts off at the end of its duration as
/// `Unavailable`: shown beside the reads, not hidden.
fn with_failures(mut delta: Delta, run: &ghz::Run) -> Delta {
    if !run.failures.is_empty() {
        let failures: Vec<String> = run.failures.iter().map(|(code, n)| format!("{code} {n}")).collect();
        delta.reads = format!("{}; ghz: {}", delta.reads, failures.join(", "));
    }
    delta
}

/// 5× capacity against `--max-in-flight 8`, for one call.
async fn overload(server: &Server, load: &Load, shape: Shape) -> String {
    eprintln!("bench_serve: overload, {}", shape.name);
    load.closed_loop(4, PHASE / 2).await;
    let capacity = load.closed_loop(8, PHASE).await;
    let pid = server.processes.server;
    let rss_before = probe::rss_mib(pid);
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(probe::rss_mib(pid));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let before = server.snapshot().await;
    let samples = load.open_loop(capacity * 5.0, PHASE).await;
    let after = server.snapshot().await;
    sampling.store(false, Ordering::Relaxed);
    let rss_during = sampler.join().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = probe::rss_mib(pid);
    let delta = before.until(&after, GET_FEATURES, samples.len());

    let mut slip: Vec<Duration> = samples.iter().map(|s| s.slip).collect();
    slip.sort();
    let admitted = sorted(&samples, Outcome::Admitted, |s| s.latency);
    let admitted_service = sorted(&samples, Outcome::Admitted, |s| s.service);
    let refused = sorted(&samples, Outcome::Refused, |s| s.latency);
    let refused_service = sorted(&samples, Outcome::Refused, |s| s.service);
    let failed = samples.iter().filter(|s| s.outcome == Outcome::Failed).count();
    let server_hist = delta.server.as_ref().map_or("-".into(), |h| h.quantile_ms(0.99));
    format!(
        "| {} | {capacity:.0} | {:.0} | {} / {} | {} ({:.0}/s) | {} / {} / {} | {} | {} | {} / {} | {} | {failed} | {} | {:.1} | {rss_before:.0} / {rss_during:.0} / {rss_after:.0} |",
        shape.name,
        capacity * 5.0,
        pct(&slip, 0.5),
        pct(&slip, 0.99),
        admitted.len(),
        admitted.len() as f64 / PHASE.as_secs_f64(),
        pct(&admitted, 0.5),
        pct(&admitted, 0.99),
        pct(&admitted, 0.999),
        pct(&admitted_service, 0.99),
        refused.len(),
        pct(&refused, 0.5),
        pct(&refused, 0.99),
        pct(&refused_service, 0.99),
        server_hist,
        delta.cpu.server,
    )
}

/// What the hot tier holds, from its gauges.
fn hot_tier_held(metrics: &Metrics) -> String {
    let gauge = |name: &str| metrics.get(name).copied();
    match (
        gauge("freshet_server_hot_cache_entries"),
        gauge("freshet_server_hot_cache_bytes"),
        gauge("freshet_server_hot_cache_capacity_bytes"),
    ) {
        (Some(entries), Some(bytes), Some(capacity)) if capacity > 0.0 => {
            format!("{entries:.0} entries, {:.1} of {:.1} MiB", bytes / 1048576.0, capacity / 1048576.0)
        }
        _ => "none".into(),
    }
}

fn server_has_hot_tier() -> bool {
    let out = std::process::Command::new(freshet_tests::binary("freshet-server")).args(["serve", "--help"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains("--hot-cache-bytes")
}

/// Whether `BENCH_ONLY` (a comma-separated list of modes, `overload` and
/// `tracing`) asks for `part`; unset, every part runs.
fn wanted(part: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| only.split(',').any(|p| p.trim() == part))
}

fn pid_from_env(name: &str) -> Option<u32> {
    std::env::var(name).ok().and_then(|p| p.parse().ok())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cores = Cores::from_env();
    let (_dir, views) = views_file(&wide_views());
    let catalog = Catalog::load(&views).unwrap();
    let url = fresh_database().await;
    eprintln!("bench_serve: storing {USERS} users");
    load_states(&url, &catalog).await;
    let redis = env("FRESHET_REDIS_URL");
    let stores = Processes { server: 0, redis: pid_from_env("BENCH_REDIS_PID"), postgres: pid_from_env("BENCH_POSTGRES_PID") };
    let hot_tier = server_has_hot_tier();
    let modes: &[Mode] = if hot_tier {
        &[Mode::Hot, Mode::HotUncoalesced, Mode::HotHoldingAll, Mode::Redis, Mode::Postgres]
    } else {
        &[Mode::Redis, Mode::Postgres]
    };
    let chosen: Vec<Mode> = modes.iter().copied().filter(|m| wanted(m.id())).collect();
    let ghz = ghz::Ghz::from_env(&cores.load);
    let requests: Vec<Vec<Bytes>> = SHAPES.iter().map(|s| prepared(*s)).collect();
    let ghz_data: Option<(std::path::PathBuf, Vec<std::path::PathBuf>)> = ghz.as_ref().map(|g| {
        // An empty HealthCheckRequest, count-prefixed: a single 0.
        let empty = g.data("empty.bin", &[Bytes::new()]);
        (empty, SHAPES.iter().zip(&requests).map(|(s, r)| g.data(&format!("{}x{}.bin", s.entities, s.features), r)).collect())
    });

    let mut tables = Tables::default();
    let mut hot_tier_notes = Vec::new();
    for &mode in &chosen {
        let server = Server::start(&views, &url, &mode.args(&redis, hot_tier, 10_000), &[], &cores, stores);
        let connections = load::connect(server.address).await;
        warm_and_check(server.address).await;
        // The tier's gauges are updated every second.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let rss = probe::rss_mib(server.processes.server);
        hot_tier_notes.push(format!("{}: {}, server RSS {rss:.0} MiB", mode.name(), hot_tier_held(&server.snapshot().await.metrics)));
        let empty = Load::new(&connections, HEALTH, vec![Bytes::new()]);
        let empty_capacity = own_case(&mut tables, &server, mode.name(), "empty RPC", &empty, HEALTH, None).await;
        for (shape, requests) in SHAPES.iter().zip(&requests) {
            let load = Load::new(&connections, GET_FEATURES, requests.clone());
            let capacity = own_case(&mut tables, &server, mode.name(), shape.name, &load, GET_FEATURES, Some(empty_capacity)).await;
            if shape.entities == 1 {
                // Empty RPCs at the same rate: the tail the generator, the
                // transport and the shared cores give any call at this rate.
                let row = Row { who: mode.name(), call: "empty RPC at 1 × 50's rate", generator: "project's" };
                latency_case(&mut tables, &server, row, &empty, HEALTH, capacity / 2.0).await;
            }
        }
        if let (Some(ghz), Some((empty, data))) = (&ghz, &ghz_data) {
            let row = |call| Row { who: mode.name(), call, generator: "ghz" };
            let empty_capacity = ghz_case(&mut tables, &server, ghz, row("empty RPC"), empty, HEALTH, None).await;
            for (shape, data) in SHAPES.iter().zip(data) {
                ghz_case(&mut tables, &server, ghz, row(shape.name), data, GET_FEATURES, Some(empty_capacity)).await;
            }
        }
    }

    let feast = feast::Feast::from_env();
    let mut feast_version = String::new();
    if let Some(feast) = feast {
        feast_version = feast.version();
        let cores_server = cores.server.clone();
        let cores_load = cores.load.clone();
        let runs = tokio::task::spawn_blocking(move || {
            let (mut serve, url) = feast.start(&cores_server);
            let runs: Vec<_> = SHAPES
                .iter()
                .map(|s| {
                    eprintln!("bench_serve: Feast, {}", s.name);
                    let shape = (s.entities, s.features);
                    (feast.wrk(&serve, &url, &cores_load, shape, 8, PHASE * 2), feast.wrk(&serve, &url, &cores_load, shape, 1, PHASE * 2))
                })
                .collect();
            serve.terminate();
            runs
        })
        .await
        .unwrap();
        for (shape, (busy, light)) in SHAPES.iter().zip(runs) {
            let who = "Feast, 1 worker, Redis";
            let errors = |run: &feast::Run| if run.errors.is_empty() { "-".to_string() } else { format!("wrk: {}", run.errors) };
            let delta = |run: &feast::Run| Delta { cpu: run.cpu, server: None, reads: errors(run) };
            tables.capacity(Row { who, call: shape.name, generator: "wrk, 8 connections" }, busy.rate, None, &delta(&busy));
            let client = [light.p50.clone(), light.p99.clone(), "-".into()];
            let row = Row { who, call: shape.name, generator: "wrk, 1 connection (closed loop)" };
            tables.latency(row, light.rate, client, "-".into(), &delta(&light));
        }
    }

    // Overload: the best mode this server has, limited to 8 calls in flight.
    let best = modes[0];
    let mut overloads = Vec::new();
    if wanted("overload") {
        let args = best.args(&redis, hot_tier, 8);
        let server = Server::start(&views, &url, &args, &[], &cores, stores);
        let connections = load::connect(server.address).await;
        warm_and_check(server.address).await;
        for (shape, requests) in SHAPES.iter().zip(&requests) {
            overloads.push(overload(&server, &Load::new(&connections, GET_FEATURES, requests.clone()), *shape).await);
        }
    }

    // Tracing on vs off: the same server and call, exporting every span to
    // a local OTLP endpoint, against not exporting.
    let mut tracing = Tables::default();
    let (collector, endpoint) = freshet_tests::start_collector().await;
    let exporting = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "200")];
    let runs = [("tracing off", &[][..]), ("tracing on, every span exported", &exporting[..])];
    for (name, vars) in runs.into_iter().filter(|_| wanted("tracing")) {
        let args = Mode::Postgres.args(&redis, hot_tier, 10_000);
        let server = Server::start(&views, &url, &args, vars, &cores, stores);
        let connections = load::connect(server.address).await;
        let load = Load::new(&connections, GET_FEATURES, requests[0].clone());
        own_case(&mut tracing, &server, &format!("Postgres only, {name}"), SHAPES[0].name, &load, GET_FEATURES, None).await;
        // Let the batch processor deliver what it holds before the server goes.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let spans = collector.spans.lock().unwrap().len();

    println!(
        "Serving benchmark, {USERS} users × 50 features; freshet-server on CPU {}, generator, ghz, Postgres and Redis on CPU {}{}",
        cores.server,
        cores.load,
        if hot_tier { "" } else { "; this server has no hot tier (no --hot-cache-bytes): Redis only is its default" }
    );
    if !feast_version.is_empty() {
        println!("Feast: {feast_version}, `feast serve` on CPU {}, wrk and its Redis on CPU {}", cores.server, cores.load);
    }
    println!("Hot tier after every user was read once: {}", hot_tier_notes.join("; "));
    println!();
    tables.print();
    println!();
    println!(
        "Overload: {}, --max-in-flight 8, 5× the capacity of 8 callers for {} s; ms from the scheduled time unless \"from send\"; RSS MiB:",
        best.name(),
        PHASE.as_secs()
    );
    println!();
    println!(
        "| call | capacity | offered/s | send slip p50 / p99 | admitted (goodput) | admitted p50 / p99 / p99.9 | admitted p99 from send | refused | refused p50 / p99 | refused p99 from send | failed | server p99, all calls | server CPU µs/call | RSS before / during / after |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    overloads.iter().for_each(|r| println!("{r}"));
    println!();
    println!("Tracing overhead ({spans} spans received by the local collector):");
    println!();
    tracing.print();
}
