//! Freshness benchmark: how long from an event's arrival to the moment
//! `GetFeatures` first reflects it.
//!
//! - `bench_freshness kafka`: Kafka append → servable. Starts ingest and a
//!   server on a fresh topic and database, produces 5 000 events/s for 10 s,
//!   every 50th for an entity of its own (a marker), and polls GetFeatures
//!   every 10 ms for pending markers (so latencies are exact to 10 ms). Latency runs from just before the send.
//! - `bench_freshness debezium SERVER_ADDRESS APP_DATABASE_URL [SECONDS]`:
//!   Postgres commit → servable through Debezium, against a running pipeline
//!   (the demo's): inserts marker rows into `user_events` at 100 rows/s, each
//!   for a user of its own, timing from the moment COMMIT returns.
//! - `bench_freshness direct …`: the same against the demo's `--direct`
//!   pipeline (freshet-ingest streaming the table from a replication slot).
//!
//! Prints p50/p95/p99/max over the markers.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use freshet_proto::v1::{EntityKey, FeatureStatus, GetFeaturesRequest, entity_key::Key, feature_service_client::FeatureServiceClient};
use freshet_tests::{brokers, create_topic, fresh_database, ingest, server, unique, views_file};
use rdkafka::{
    ClientConfig,
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};

/// How often pending markers are polled: fine enough to measure, coarse
/// enough not to load the machine it measures.
const POLL_MS: u64 = 10;

type Pending = Arc<Mutex<HashMap<i64, Instant>>>;

/// Polls `feature` for pending markers until `expected` have been seen;
/// returns their latencies.
async fn watch(address: String, feature: &str, pending: Pending, expected: usize) -> Vec<Duration> {
    let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < expected && Instant::now() < deadline {
        let users: Vec<i64> = pending.lock().unwrap().keys().copied().take(100).collect();
        if users.is_empty() {
            tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
            continue;
        }
        let request = GetFeaturesRequest {
            features: vec![feature.to_string()],
            entities: users.iter().map(|u| EntityKey { key: Some(Key::Int64Key(*u)) }).collect(),
            max_age: None,
        };
        let response = client.get_features(request).await.unwrap().into_inner();
        let now = Instant::now();
        {
            let mut pending = pending.lock().unwrap();
            for (user, row) in users.iter().zip(response.results) {
                if row.values[0].status() == FeatureStatus::Present
                    && let Some(start) = pending.remove(user)
                {
                    seen.push(now - start);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
    seen
}

fn report(what: &str, mut latencies: Vec<Duration>, expected: usize) {
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1].as_secs_f64() * 1000.0;
    println!("| {what} | {} of {expected} | {:.1} | {:.1} | {:.1} | {:.1} |", latencies.len(), pct(0.5), pct(0.95), pct(0.99), pct(1.0));
}

async fn kafka() {
    let topic = unique("fresh");
    create_topic(&topic, 3).await;
    let views = format!(
        "[[view]]\nname = \"acts\"\nentity = \"user\"\nentity_type = \"int64\"\nmax_age = \"1d\"\nfreshness_budget = \"1s\"\n\
         [view.source]\ntopics = [\"{topic}\"]\nformat = \"json\"\nevent_time = \"at\"\n\
         [[view.feature]]\nname = \"n_1h\"\naggregation = \"count\"\nwindow = \"1h\"\n"
    );
    let (_dir, path) = views_file(&views);
    let url = fresh_database().await;
    let _ingest = ingest(&path, &url, &unique("g"), "fresh");
    let (_server, address) = server(&path, &url, &[]);
    tokio::time::sleep(Duration::from_secs(5)).await; // group join

    let rate = 5_000u64;
    let seconds = 10u64;
    let every = 50u64;
    let markers = (rate * seconds / every) as usize;
    let pending: Pending = Arc::default();
    let watcher = tokio::spawn(watch(address.to_string(), "acts:n_1h", pending.clone(), markers));
    let producer = std::thread::spawn({
        let pending = pending.clone();
        move || {
            let producer: ThreadedProducer<DefaultProducerContext> =
                ClientConfig::new().set("bootstrap.servers", brokers()).set("linger.ms", "1").create().unwrap();
            let start = Instant::now();
            for i in 0..rate * seconds {
                let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let marker = i % every == 0;
                let user = if marker { 1_000_000 + (i / every) as i64 } else { (i % 1000) as i64 };
                let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
                let value = format!(r#"{{"user": {user}, "at": {at}}}"#);
                let key = user.to_string();
                if marker {
                    pending.lock().unwrap().insert(user, Instant::now());
                }
                let mut record = BaseRecord::to(&topic).key(&key).payload(&value);
                while let Err((_, r)) = producer.send(record) {
                    producer.poll(Duration::from_millis(1));
                    record = r;
                }
            }
            producer.flush(Duration::from_secs(10)).unwrap();
        }
    });
    producer.join().unwrap();
    let latencies = watcher.await.unwrap();
    println!("| path | markers seen | p50 ms | p95 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    report(&format!("Kafka append → servable, {rate} events/s"), latencies, markers);
}

/// Postgres commit → servable against a running pipeline, `through` it.
async fn commit_to_servable(through: &str, address: String, app_url: String, seconds: u64) {
    let app = sqlx::PgPool::connect(&app_url).await.unwrap();
    let rate = 100u64;
    let markers = (rate * seconds) as usize;
    let pending: Pending = Arc::default();
    let watcher = tokio::spawn(watch(address, "user_activity:events_1h", pending.clone(), markers));
    let base = 2_000_000_000 + (std::process::id() as i64) * 100_000;
    let start = Instant::now();
    for i in 0..markers as u64 {
        tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / rate as f64)).into()).await;
        let user = base + i as i64;
        sqlx::query("INSERT INTO user_events (user_id, event_type) VALUES ($1, 'freshness-probe')").bind(user).execute(&app).await.unwrap();
        pending.lock().unwrap().insert(user, Instant::now());
    }
    let latencies = watcher.await.unwrap();
    println!("| path | markers seen | p50 ms | p95 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    report(&format!("Postgres commit → servable through {through}, {rate} rows/s"), latencies, markers);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("kafka") => kafka().await,
        Some(path @ ("debezium" | "direct")) if args.len() >= 4 => {
            let through = if path == "debezium" { "Debezium" } else { "the direct source" };
            commit_to_servable(through, args[2].clone(), args[3].clone(), args.get(4).and_then(|s| s.parse().ok()).unwrap_or(10)).await
        }
        _ => eprintln!("usage: bench_freshness kafka | bench_freshness debezium|direct SERVER_ADDRESS APP_DATABASE_URL [SECONDS]"),
    }
}
