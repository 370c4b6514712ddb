//! Soak run of exactly-once ingest under failures (issue 10): not a test,
//! since it takes minutes, but it ends with an exact verdict.
//!
//! Run through `tests/bench/run.sh soak` (release build, its own Postgres
//! and Kafka). Two `freshet-ingest` instances share a 4-partition topic fed
//! by a transactional producer (some transactions aborted, some records
//! poison, keys spread one user's events over every partition) while this
//! program SIGKILLs and restarts them, freezes one past its session timeout,
//! and restarts Postgres. Once the producer is done and ingest has caught
//! up, every user is compared with a reference computed from the committed
//! input, and the dead-letter topic with the committed poison records. It
//! prints the figures as Markdown and exits non-zero on any mismatch.
//!
//! `SOAK_EVENTS` (200000), `SOAK_USERS` (2000) and `SOAK_KILLS` (24) size it.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use freshet_tests::{
    Process,
    acts::{Act, applied, produce_transactions, random_acts, reference, stored, views},
    brokers, create_topic, env, ingest, services, unique, views_file,
};
use rand::{Rng, SeedableRng};
use rdkafka::{
    ClientConfig, Message,
    consumer::{BaseConsumer, Consumer},
    message::Headers,
};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn signal(process: &Process, name: &str) {
    let _ = Command::new("kill").arg(format!("-{name}")).arg(process.child.id().to_string()).status();
}

/// Every record of the dead-letter topic, by origin (partition, offset):
/// how many times each was dead-lettered, and its payload.
fn read_dlq(topic: &str) -> BTreeMap<(i32, i64), (usize, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("soak-dlq"))
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut letters: BTreeMap<(i32, i64), (usize, String)> = BTreeMap::new();
    let mut idle = Instant::now();
    while idle.elapsed() < Duration::from_secs(5) {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else { continue };
        idle = Instant::now();
        let header = |name: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let origin = (
            header("__connect.errors.partition").and_then(|p| p.parse().ok()).unwrap_or(-1),
            header("__connect.errors.offset").and_then(|o| o.parse().ok()).unwrap_or(-1),
        );
        let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
        letters.entry(origin).or_insert((0, payload)).0 += 1;
    }
    letters
}

#[tokio::main]
async fn main() {
    let events = setting("SOAK_EVENTS", 200_000) as usize;
    let users = setting("SOAK_USERS", 2000) as i64;
    let kills_wanted = setting("SOAK_KILLS", 24);
    let topic = unique("soak");
    create_topic(&topic, 4).await;
    let url = freshet_tests::fresh_database().await;
    let group = unique("soak");
    let text = views(&topic);
    let (_dir, path) = views_file(&text);
    let services_dir = env("FRESHET_SERVICES_DIR");

    let producing = Arc::new(AtomicBool::new(true));
    let producer = tokio::task::spawn_blocking({
        let (topic, producing) = (topic.clone(), producing.clone());
        move || {
            let committed = produce_transactions(&topic, random_acts(events, users, 400, 7), 200, 8, 8);
            producing.store(false, Ordering::Relaxed);
            committed
        }
    });

    // Progress (records applied or dead-lettered) sampled every 100 ms; the
    // longest time it stood still while ingest was behind is the longest gap
    // between commits.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn({
        let (url, group, watching) = (url.clone(), group.clone(), watching.clone());
        async move {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            let (mut last, mut since, mut longest) = (0i64, Instant::now(), Duration::ZERO);
            while watching.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Ok(done) = sqlx::query_scalar::<_, i64>(
                    "SELECT coalesce(sum(records_applied + records_dead), 0)::int8 FROM ingest_offsets WHERE consumer_group = $1",
                )
                .bind(&group)
                .fetch_one(&pool)
                .await
                else {
                    continue; // Postgres is restarting: that time counts as a gap.
                };
                if done != last {
                    if last > 0 {
                        longest = longest.max(since.elapsed());
                    }
                    (last, since) = (done, Instant::now());
                }
            }
            longest
        }
    });

    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut instances = [ingest(&path, &url, &group, "a"), ingest(&path, &url, &group, "b")];
    let (mut kills, mut freezes, mut pg_restarts) = (0u64, 0u64, 0u64);
    while kills < kills_wanted || producing.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..4000))).await;
        let i = rng.random_range(0..2);
        let name = ["a", "b"][i];
        if kills == kills_wanted / 3 && freezes == 0 {
            // Frozen past the session timeout: the group moves on without it,
            // and when it wakes its commits must be fenced.
            signal(&instances[i], "STOP");
            tokio::time::sleep(Duration::from_secs(8)).await;
            signal(&instances[i], "CONT");
            freezes += 1;
        } else if kills == kills_wanted / 2 && pg_restarts == 0 {
            services(&["pg-stop", &services_dir]);
            tokio::time::sleep(Duration::from_secs(2)).await;
            services(&["pg-start", &services_dir]);
            pg_restarts += 1;
        }
        instances[i].kill();
        instances[i] = ingest(&path, &url, &group, name);
        kills += 1;
    }
    let committed: Vec<Act> = producer.await.unwrap();
    let expected_applied = committed.iter().filter(|a| !a.poison).count() as i64;
    let poison: BTreeSet<String> = committed.iter().filter(|a| a.poison).map(Act::json).collect();
    let produced_at = started.elapsed();
    let mut caught_up = false;
    for _ in 0..1200 {
        if applied(&url, &group).await >= expected_applied {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    watching.store(false, Ordering::Relaxed);
    let longest_gap = watcher.await.unwrap();
    let total = started.elapsed();

    let user_ids: Vec<i64> = (1..=users).collect();
    let want = reference(&committed);
    let got = stored(&url, &text, &user_ids).await;
    let mismatched = user_ids.iter().filter(|u| want.get(u) != got.get(u)).count();
    let applied_now = applied(&url, &group).await;
    let letters = tokio::task::spawn_blocking({
        let dlq = format!("{topic}.dlq");
        move || read_dlq(&dlq)
    })
    .await
    .unwrap();
    let duplicates: usize = letters.values().map(|(n, _)| n - 1).sum();
    let dead: BTreeSet<String> = letters.values().map(|(_, p)| p.clone()).collect();
    let missing = poison.difference(&dead).count();
    let unexpected = dead.difference(&poison).count();
    for i in &mut instances {
        i.kill();
    }

    println!("| soak (`tests/bench/run.sh soak`) | value |");
    println!("|---|---|");
    println!("| events produced / in committed transactions | {events} / {} |", committed.len());
    println!("| poison records committed | {} |", poison.len());
    println!("| SIGKILLs / freezes past the session timeout / Postgres restarts | {kills} / {freezes} / {pg_restarts} |");
    println!("| records applied / expected | {applied_now} / {expected_applied} |");
    println!("| users compared / mismatched | {} / {mismatched} |", user_ids.len());
    println!(
        "| dead letters: distinct / duplicates / missing / unexpected | {} / {duplicates} / {missing} / {unexpected} |",
        letters.len()
    );
    println!("| longest gap between commits while behind | {:.1} s |", longest_gap.as_secs_f64());
    println!("| producer done / caught up after | {:.0} s / {:.0} s |", produced_at.as_secs_f64(), total.as_secs_f64());
    let exact = caught_up && mismatched == 0 && applied_now == expected_applied && missing == 0 && unexpected == 0;
    println!("\nverdict: {}", if exact { "exact" } else { "MISMATCH" });
    if !exact {
        std::process::exit(1);
    }
}
