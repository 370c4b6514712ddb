//! Ingest benchmark: exactly-once ingest beside a raw rdkafka consume-only
//! loop on the same topic, same machine, same run.
//!
//! Run through `tests/bench/run.sh ingest` (release build, services started).
//! Two cases, each on a topic of its own: 100,000 events over 10,000 users,
//! and 1,000,000 over 100,000 (state larger than any cache); `BENCH_RECORDS`
//! and `BENCH_USERS` run one case of your own instead, `BENCH_BATCHES`
//! (e.g. `5000,20000`) only those batch sizes. Each case produces
//! Debezium-shaped `user_events` change events (committed in transactions, as
//! Debezium with exactly-once writes them), then:
//! - baseline: a `BaseConsumer` with read_committed that only counts records;
//! - Freshet: `freshet-ingest` with the reference `user_activity` view, at
//!   several batch sizes, each into a fresh database, timed from its first
//!   commit to its last (so group join is not counted against it; the
//!   baseline is likewise timed from its first record), with its peak RSS,
//!   and how long after the last commit compaction had folded every delta.

use std::time::{Duration, Instant};

use freshet_tests::{brokers, create_topic, fresh_database, ingest_with, reference_views, unique, views_file};
use rand::Rng;
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};

fn produce(topic: &str, n: usize, users: u32) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("transactional.id", unique("bench"))
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "200000")
        .create()
        .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    let mut rng = rand::rng();
    let types = ["view", "click", "add_to_cart", "purchase"];
    // Event times 5 ms apart, the newest a minute ago (never in the future).
    let base = chrono::Utc::now() - chrono::Duration::milliseconds(n as i64 * 5 + 60_000);
    for chunk in (0..n).collect::<Vec<_>>().chunks(2000) {
        producer.begin_transaction().unwrap();
        for &i in chunk {
            let at = (base + chrono::Duration::milliseconds(i as i64 * 5)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let value = format!(
                r#"{{"before":null,"after":{{"event_id":{i},"user_id":{},"event_type":"{}","occurred_at":"{at}"}},"source":{{"table":"user_events","schema":"public","lsn":{i}}},"op":"c","ts_ms":0}}"#,
                rng.random_range(1..=users),
                types[i % 4]
            );
            let key = format!(r#"{{"event_id":{i}}}"#);
            let mut record = BaseRecord::to(topic).key(&key).payload(&value);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        producer.poll(Duration::from_millis(5));
                        record = r;
                    }
                }
            }
        }
        producer.commit_transaction(Duration::from_secs(60)).unwrap();
    }
}

fn raw_consume(topic: &str, n: usize) -> f64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("raw"))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = 0;
    let mut first = None;
    while seen < n {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            seen += 1;
        }
    }
    n as f64 / first.unwrap().elapsed().as_secs_f64()
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

async fn deltas(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM feature_deltas").fetch_one(pool).await.unwrap_or(-1)
}

#[tokio::main]
async fn main() {
    let setting = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
    let cases: Vec<(usize, u32, Vec<usize>)> = match (setting("BENCH_RECORDS"), setting("BENCH_USERS")) {
        (None, None) => vec![(100_000, 10_000, vec![2000, 5000, 20000]), (1_000_000, 100_000, vec![20000])],
        (n, users) => vec![(n.unwrap_or(100_000), users.unwrap_or(10_000) as u32, vec![2000, 5000, 20000])],
    };
    // BENCH_BATCHES="20000" (comma-separated): only these batch sizes.
    let cases = match std::env::var("BENCH_BATCHES") {
        Ok(list) => {
            let batches: Vec<usize> = list.split(',').filter_map(|b| b.trim().parse().ok()).collect();
            cases.into_iter().map(|(n, users, _)| (n, users, batches.clone())).collect()
        }
        Err(_) => cases,
    };
    println!("| case | consumer | records/s | vs raw | peak RSS MiB | deltas folded after |");
    println!("|---|---|---|---|---|---|");
    for (n, users, batches) in cases {
        run_case(n, users, &batches).await;
    }
}

async fn run_case(n: usize, users: u32, batches: &[usize]) {
    let case = format!("{n} events, {users} users");
    let topic = unique("bench_events");
    create_topic(&topic, 4).await;
    let started = Instant::now();
    tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || produce(&topic, n, users)
    })
    .await
    .unwrap();
    eprintln!("{case}: produced in {:.1}s (transactions of 2000)", started.elapsed().as_secs_f64());
    let views = std::fs::read_to_string(reference_views()).unwrap().replace("app.public.user_events", &topic);
    let (_dir, path) = views_file(&views);

    let raw = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || raw_consume(&topic, n)
    })
    .await
    .unwrap();
    println!("| {case} | raw rdkafka consume-only loop (read_committed) | {raw:.0} | 100% | - | - |");
    for &batch in batches {
        let url = fresh_database().await;
        let group = unique("bench");
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let mut process = ingest_with(&path, &url, &group, "bench", &["--batch-records", &batch.to_string()]);
        let pid = process.child.id();
        let mut first = None;
        let mut peak: f64 = 0.0;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            peak = peak.max(rss_mib(pid));
            let applied: i64 =
                sqlx::query_scalar("SELECT coalesce(sum(records_applied), 0)::int8 FROM ingest_offsets WHERE consumer_group = $1")
                    .bind(&group)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            if applied > 0 {
                first.get_or_insert_with(Instant::now);
            }
            if applied as usize >= n {
                break;
            }
        }
        let rate = n as f64 / first.unwrap().elapsed().as_secs_f64();
        let done = Instant::now();
        while deltas(&pool).await > 0 && done.elapsed() < Duration::from_secs(600) {
            peak = peak.max(rss_mib(pid));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let folded = done.elapsed().as_secs_f64();
        println!(
            "| {case} | freshet-ingest exactly-once, batch ≤ {batch} | {rate:.0} | {:.0}% | {peak:.0} | {folded:.1} s |",
            100.0 * rate / raw
        );
        process.kill();
    }
}
