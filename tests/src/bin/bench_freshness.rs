//! Freshness benchmark: how long from an event's arrival to the moment
//! `GetFeatures` first reflects it.
//!
//! - `bench_freshness kafka`: Kafka append → servable. Starts ingest and a
//!   server on a fresh topic and database, produces 5 000 events/s for 12 s,
//!   every 50th after the first 2 s for an entity of its own (a marker), and
//!   polls GetFeatures every 10 ms for pending markers (so latencies are
//!   exact to 10 ms). Latency runs from just before the send, and is split
//!   at the broker's acknowledgement: the producer's and broker's share,
//!   then the consumer's, ingest's and the server's.
//!   Markers and their watcher: `freshet_tests::freshness`; `bench_wal`
//!   runs the Debezium and direct paths side by side.
//! - `bench_freshness debezium SERVER_ADDRESS APP_DATABASE_URL [SECONDS]`:
//!   Postgres commit → servable through Debezium, against a running pipeline
//!   (the demo's): inserts marker rows into `user_events` at 100 rows/s, each
//!   for a user of its own, timing from the moment COMMIT returns.
//! - `bench_freshness direct …`: the same against the demo's `--direct`
//!   pipeline (freshet-ingest streaming the table from a replication slot).
//!
//! Prints p50/p95/p99/max over the markers; for `kafka`, also ingest's own
//! commit durations and batch sizes over the same run (from its /metrics),
//! to tell ingest's share of a tail from the rest.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use freshet_tests::{
    brokers, create_topic, fresh_database,
    freshness::{self, Markers},
    histogram::Histogram,
    ingest_with, scrape, server, unique, views_file,
};
use rdkafka::{
    ClientConfig, ClientContext,
    producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer},
};

/// When the broker acknowledged each marker: splits a marker's latency into
/// append → acknowledged (producer and broker) and acknowledged → servable
/// (consumer, ingest, server).
#[derive(Default)]
struct Acks(std::sync::Mutex<std::collections::HashMap<i64, Instant>>);

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    /// The marker's entity, or 0 for any other event.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, marker: usize) {
        if marker != 0 && result.is_ok() {
            self.0.lock().unwrap().insert(marker as i64, Instant::now());
        }
    }
}

/// Seconds at the full rate before the first marker.
const WARM_UP: u64 = 2;

/// How long markers may take to show once the writer is done.
const DRAIN: Duration = Duration::from_secs(120);

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
    let metrics = freshet_tests::free_port();
    let _ingest = ingest_with(&path, &url, &unique("g"), "fresh", &["--metrics-listen", &format!("127.0.0.1:{metrics}")]);
    let (_server, address) = server(&path, &url, &[]);
    tokio::time::sleep(Duration::from_secs(5)).await; // group join

    let rate = 5_000u64;
    let seconds = 10u64;
    let every = 50u64;
    let markers = (rate * seconds / every) as usize;
    let pending = Arc::new(Markers::default());
    let watcher = tokio::spawn({
        let pending = pending.clone();
        async move { pending.watch(&address.to_string(), "acts:n_1h", DRAIN).await }
    });
    let before = scrape(metrics).await;
    let producer = std::thread::spawn({
        let pending = pending.clone();
        move || {
            let producer: ThreadedProducer<Acks> =
                ClientConfig::new().set("bootstrap.servers", brokers()).set("linger.ms", "1").create_with_context(Acks::default()).unwrap();
            let start = Instant::now();
            // Markers start after WARM_UP seconds at the full rate: in the
            // first half second of a run the broker's acks lagged, up to
            // 220 ms, then caught up (a burst to warm the producer first did
            // not help), which was the whole of this run's p99.
            for i in 0..rate * (WARM_UP + seconds) {
                let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let marker = i >= rate * WARM_UP && i % every == 0;
                let user = if marker { 1_000_000 + (i / every) as i64 } else { (i % 1000) as i64 };
                let value = format!(r#"{{"user": {user}, "at": {}}}"#, now_ms());
                let key = user.to_string();
                if marker {
                    pending.written(user, Instant::now());
                }
                let opaque = if marker { user as usize } else { 0 };
                let mut record = BaseRecord::with_opaque_to(&topic, opaque).key(&key).payload(&value);
                while let Err((_, r)) = producer.send(record) {
                    producer.poll(Duration::from_millis(1));
                    record = r;
                }
            }
            producer.flush(Duration::from_secs(10)).unwrap();
            std::mem::take(&mut *producer.context().0.lock().unwrap())
        }
    });
    let acks = producer.join().unwrap();
    pending.close();
    let seen = watcher.await.unwrap();
    let after = scrape(metrics).await;
    freshness::header();
    freshness::row(&format!("Kafka append → servable, {rate} events/s"), &seen, markers);
    // The same markers, split at the broker's acknowledgement.
    let split = |part: fn(Instant, &freshness::Seen) -> Duration| -> Vec<freshness::Seen> {
        seen.iter().filter_map(|s| acks.get(&s.entity).map(|&acked| freshness::Seen { latency: part(acked, s), ..*s })).collect()
    };
    freshness::row("of which append → broker acknowledged", &split(|acked, s| acked.saturating_duration_since(s.written)), markers);
    freshness::row(
        "of which acknowledged → servable",
        &split(|acked, s| (s.written + s.latency).saturating_duration_since(acked)),
        markers,
    );
    let commits = |m| Histogram::of(m, "freshet_ingest_commit_duration_seconds", "");
    let commits = commits(&after).since(&commits(&before));
    let records = |m: &std::collections::BTreeMap<String, f64>| m.get("freshet_ingest_batch_records_sum").copied().unwrap_or(0.0);
    println!();
    println!("Ingest's commits over the same run (its histogram, interpolated inside buckets):");
    println!();
    println!("| commits | records per commit | commit p50 ms | p95 | p99 | p99.9 |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {:.0} | {:.0} | {} | {} | {} | {} |",
        commits.count(),
        (records(&after) - records(&before)) / commits.count().max(1.0),
        commits.quantile_ms(0.5),
        commits.quantile_ms(0.95),
        commits.quantile_ms(0.99),
        commits.quantile_ms(0.999)
    );
}

fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

/// Postgres commit → servable against a running pipeline, `through` it.
async fn commit_to_servable(through: &str, address: String, app_url: String, seconds: u64) {
    let app = sqlx::PgPool::connect(&app_url).await.unwrap();
    let rate = 100u64;
    let markers = (rate * seconds) as usize;
    let pending = Arc::new(Markers::default());
    let watcher = tokio::spawn({
        let pending = pending.clone();
        async move { pending.watch(&address, "user_activity:events_1h", DRAIN).await }
    });
    let base = 2_000_000_000 + (std::process::id() as i64) * 100_000;
    let start = Instant::now();
    for i in 0..markers as u64 {
        tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / rate as f64)).into()).await;
        let user = base + i as i64;
        sqlx::query("INSERT INTO user_events (user_id, event_type) VALUES ($1, 'freshness-probe')").bind(user).execute(&app).await.unwrap();
        pending.written(user, Instant::now());
    }
    pending.close();
    let seen = watcher.await.unwrap();
    freshness::header();
    freshness::row(&format!("Postgres commit → servable through {through}, {rate} rows/s"), &seen, markers);
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
