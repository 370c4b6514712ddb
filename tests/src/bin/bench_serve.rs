//! Serving benchmark: GetFeatures beside an empty tonic RPC (the server's own
//! `grpc.health.v1.Health/Check`), same server, same machine, same run.
//!
//! Run through `tests/bench/run.sh serve` (release build, services started).
//! Measures, for 1 entity × 50 features and 100 entities × 10 features, with
//! the Redis cache warm (hit) and without Redis (every read from Postgres):
//! capacity (closed loop, 16 callers), then latency at half of capacity
//! (open loop, latency counted from the scheduled send time, so queueing is
//! not hidden), then 5× capacity against a server limited to 8 calls in
//! flight: goodput, latency of admitted calls, latency of rejections.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use freshet_proto::v1::{EntityKey, GetFeaturesRequest, entity_key::Key, feature_service_client::FeatureServiceClient};
use freshet_store::{
    entities,
    state::{Direction, EntityState, Event, Scalar},
    view::Catalog,
};
use freshet_tests::{env, fresh_database, server, unique, views_file};
use tokio::sync::Mutex;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const USERS: i64 = 1000;
const PHASE: Duration = Duration::from_secs(4);

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

async fn load_states(url: &str, catalog: &Catalog) {
    let view = &catalog.views[0];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let mut rows = Vec::new();
    for user in 1..=USERS {
        let mut state = EntityState::default();
        for e in 0..20 {
            let fields = (0..25).map(|i| (format!("f{i}"), Scalar::Double((user * e + i) as f64))).collect();
            state.apply(view, &Event { entity: user.to_string(), at_ms: now - e * 10_000, fields }, Direction::Add, true);
        }
        rows.push((("wide".to_string(), user.to_string()), state));
    }
    let mut tx = pool.begin().await.unwrap();
    entities::store(&mut tx, &rows).await.unwrap();
    tx.commit().await.unwrap();
}

#[derive(Clone, Copy)]
enum Call {
    Empty,
    Features { entities: usize, features: usize },
}

#[derive(Clone)]
struct Clients {
    features: Vec<FeatureServiceClient<Channel>>,
    health: Vec<HealthClient<Channel>>,
}

impl Clients {
    async fn connect(address: std::net::SocketAddr) -> Clients {
        let mut features = Vec::new();
        let mut health = Vec::new();
        for _ in 0..4 {
            let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
            features.push(FeatureServiceClient::new(channel.clone()));
            health.push(HealthClient::new(channel));
        }
        Clients { features, health }
    }

    /// One call; Ok(true) admitted, Ok(false) refused with RESOURCE_EXHAUSTED.
    async fn call(&self, call: Call, n: u64) -> Result<bool, tonic::Status> {
        let i = (n % 4) as usize;
        let result = match call {
            Call::Empty => self.health[i].clone().check(HealthCheckRequest { service: String::new() }).await.map(|_| ()),
            Call::Features { entities, features } => {
                let first = (n as i64 * 7) % (USERS - entities as i64) + 1;
                let request = GetFeaturesRequest {
                    features: (0..features)
                        .map(|f| if f % 2 == 0 { format!("wide:n_{}", f / 2) } else { format!("wide:last_{}", f / 2) })
                        .collect(),
                    entities: (0..entities as i64).map(|e| EntityKey { key: Some(Key::Int64Key(first + e)) }).collect(),
                    max_age: None,
                };
                self.features[i].clone().get_features(request).await.map(|_| ())
            }
        };
        match result {
            // Admitted; a call that ran out of time still counts, at its latency.
            Ok(()) => Ok(true),
            Err(s) if s.code() == tonic::Code::DeadlineExceeded => Ok(true),
            Err(s) if s.code() == tonic::Code::ResourceExhausted => Ok(false),
            Err(s) => Err(s),
        }
    }
}

/// Calls per second with `callers` callers back to back.
async fn capacity(clients: &Clients, call: Call, callers: u64) -> f64 {
    let end = Instant::now() + PHASE;
    let mut tasks = Vec::new();
    for c in 0..callers {
        let clients = clients.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                clients.call(call, c * 1_000_000 + n).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / PHASE.as_secs_f64()
}

struct OpenLoop {
    admitted: Vec<Duration>,
    refused: Vec<Duration>,
}

/// Sends at `rate` calls/s for PHASE, latency measured from the scheduled time.
async fn open_loop(clients: &Clients, call: Call, rate: f64) -> OpenLoop {
    let results = Arc::new(Mutex::new(OpenLoop { admitted: Vec::new(), refused: Vec::new() }));
    let start = tokio::time::Instant::now();
    let total = (rate * PHASE.as_secs_f64()) as u64;
    let mut tasks = Vec::with_capacity(total as usize);
    for n in 0..total {
        let scheduled = start + Duration::from_secs_f64(n as f64 / rate);
        tokio::time::sleep_until(scheduled).await;
        let clients = clients.clone();
        let results = results.clone();
        tasks.push(tokio::spawn(async move {
            let admitted = clients.call(call, n).await.unwrap();
            let latency = scheduled.elapsed();
            let mut r = results.lock().await;
            if admitted { r.admitted.push(latency) } else { r.refused.push(latency) }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(results).ok().unwrap().into_inner()
}

fn pct(sorted: &[Duration], p: f64) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    format!("{:.2}", sorted[i].as_secs_f64() * 1000.0)
}

fn row(name: &str, cap: f64, r: &mut OpenLoop) -> String {
    r.admitted.sort();
    format!(
        "| {name} | {cap:.0} | {:.0} | {} | {} | {} |",
        cap / 2.0,
        pct(&r.admitted, 0.5),
        pct(&r.admitted, 0.99),
        pct(&r.admitted, 0.999)
    )
}

#[tokio::main]
async fn main() {
    let (_dir, views) = views_file(&wide_views());
    let catalog = Catalog::load(&views).unwrap();
    let url = fresh_database().await;
    load_states(&url, &catalog).await;
    let redis = env("FRESHET_REDIS_URL");
    let prefix = unique("bench");

    let shapes = [("1 entity × 50 features", 1, 50), ("100 entities × 10 features", 100, 10)];
    println!("| call | capacity (calls/s) | rate at half capacity | p50 ms | p99 ms | p99.9 ms |");
    println!("|---|---|---|---|---|---|");
    for (setup, extra) in [
        ("Postgres only (cache miss path)", vec![]),
        (
            "Redis warm (cache hit)",
            vec![
                "--redis-url".to_string(),
                redis.clone(),
                "--cache-prefix".into(),
                prefix.clone(),
                "--cache-ttl-ms".into(),
                "600000".into(),
            ],
        ),
    ] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (_server, address) = server(&views, &url, &[&extra[..], &["--max-in-flight", "10000"]].concat());
        let clients = Clients::connect(address).await;
        let empty_cap = capacity(&clients, Call::Empty, 16).await;
        let mut empty = open_loop(&clients, Call::Empty, empty_cap / 2.0).await;
        println!("{}", row(&format!("empty RPC (Health/Check), {setup}"), empty_cap, &mut empty));
        for (name, entities, features) in shapes {
            let call = Call::Features { entities, features };
            // Warm the cache (and the server) first.
            capacity(&clients, call, 4).await;
            let cap = capacity(&clients, call, 16).await;
            let mut r = open_loop(&clients, call, cap / 2.0).await;
            println!(
                "{} ({:.0}% of the empty RPC's throughput)",
                row(&format!("GetFeatures {name}, {setup}"), cap, &mut r),
                100.0 * cap / empty_cap
            );
        }
    }

    // Tracing on vs off: the same server and call, exporting every span to
    // a local OTLP endpoint, against not exporting.
    println!();
    println!("Tracing overhead, GetFeatures 1 × 50, Postgres only:");
    println!("| tracing | capacity (calls/s) | p50 ms | p99 ms | p99.9 ms |");
    println!("|---|---|---|---|---|");
    let (collector, endpoint) = freshet_tests::start_collector().await;
    let exporting = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "200")];
    for (name, vars) in [("off", &[][..]), ("on, every span exported over OTLP", &exporting[..])] {
        let (_server, address) = freshet_tests::server_with_env(&views, &url, &["--max-in-flight", "10000"], vars);
        let clients = Clients::connect(address).await;
        let call = Call::Features { entities: 1, features: 50 };
        capacity(&clients, call, 4).await;
        let cap = capacity(&clients, call, 16).await;
        let mut r = open_loop(&clients, call, cap / 2.0).await;
        r.admitted.sort();
        println!("| {name} | {cap:.0} | {} | {} | {} |", pct(&r.admitted, 0.5), pct(&r.admitted, 0.99), pct(&r.admitted, 0.999));
        // Let the batch processor deliver what it holds before the server goes.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!("({} spans received by the local collector)", collector.spans.lock().unwrap().len());

    // Overload: 5× capacity against a server that admits 8 calls at a time.
    let (_server, address) =
        server(&views, &url, &["--max-in-flight", "8", "--redis-url", &redis, "--cache-prefix", &prefix, "--cache-ttl-ms", "600000"]);
    let clients = Clients::connect(address).await;
    let call = Call::Features { entities: 1, features: 50 };
    capacity(&clients, call, 4).await;
    let cap = capacity(&clients, call, 8).await;
    let mut r = open_loop(&clients, call, cap * 5.0).await;
    r.admitted.sort();
    r.refused.sort();
    println!();
    println!(
        "Overload, GetFeatures 1 × 50, Redis warm, --max-in-flight 8: capacity {cap:.0}/s, offered {:.0}/s for {}s",
        cap * 5.0,
        PHASE.as_secs()
    );
    println!("| | calls | p50 ms | p99 ms | p99.9 ms |");
    println!("|---|---|---|---|---|");
    println!(
        "| admitted (goodput {:.0}/s) | {} | {} | {} | {} |",
        r.admitted.len() as f64 / PHASE.as_secs_f64(),
        r.admitted.len(),
        pct(&r.admitted, 0.5),
        pct(&r.admitted, 0.99),
        pct(&r.admitted, 0.999)
    );
    println!(
        "| rejected RESOURCE_EXHAUSTED | {} | {} | {} | {} |",
        r.refused.len(),
        pct(&r.refused, 0.5),
        pct(&r.refused, 0.99),
        pct(&r.refused, 0.999)
    );
}
