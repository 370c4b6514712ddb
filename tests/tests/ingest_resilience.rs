//! Ingest under sink trouble and operator mistakes (issue 13): a slow
//! Postgres pauses consumption and always lets go, SIGTERM stops a process
//! stuck retrying or waiting, a record too large for the DLQ does not hold
//! its partition, long keys do not break change notifications, a database
//! whose schema is not what its migrations claim is refused, and a second
//! consumer group cannot double-count a view another group computes.

use std::{process::Command, time::Duration};

use freshet_tests::{
    acts::{Act, applied, produce_transactions, random_acts, reference, stored, views},
    binary, brokers, create_topic, eventually, fresh_database, ingest, unique, views_file,
};
use rdkafka::{
    ClientConfig,
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};

/// Sends `values` (keyed `key`) to `topic`, untransacted.
async fn send(topic: &str, values: Vec<(String, String)>) {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let producer: ThreadedProducer<DefaultProducerContext> =
            ClientConfig::new().set("bootstrap.servers", brokers()).set("message.max.bytes", "2000000").create().unwrap();
        for (key, value) in &values {
            producer.send(BaseRecord::to(&topic).key(key).payload(value)).unwrap();
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    })
    .await
    .unwrap();
}

async fn dead(url: &str, group: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query_scalar("SELECT coalesce(sum(records_dead), 0)::int8 FROM ingest_offsets WHERE consumer_group = $1")
        .bind(group)
        .fetch_one(&pool)
        .await
        .unwrap()
}

async fn applied_at_least(url: &str, group: &str, n: i64) {
    eventually(Duration::from_secs(90), || async { (applied(url, group).await >= n).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("ingest did not apply {n} records"));
}

/// Every commit made slow for a while (a test transaction holds the
/// partition's offsets row most of the time): ingest pauses to bound its
/// memory, and once the sink is fast again everything is applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_sink_pauses_consumption_and_always_lets_go() {
    let topic = unique("slow");
    create_topic(&topic, 1).await;
    let url = fresh_database().await;
    let group = unique("g");
    let text = views(&topic);
    let (_dir, path) = views_file(&text);
    let _ingest = ingest(&path, &url, &group, "one");
    let acts = random_acts(300, 20, u32::MAX, 41);
    produce_transactions(&topic, acts[..10].to_vec(), 10, u32::MAX, 1);
    applied_at_least(&url, &group, 10).await;

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let slow = tokio::spawn({
        let (pool, group) = (pool.clone(), group.clone());
        async move {
            for _ in 0..10 {
                let mut hold = pool.begin().await.unwrap();
                sqlx::query("SELECT 1 FROM ingest_offsets WHERE consumer_group = $1 FOR UPDATE")
                    .bind(&group)
                    .execute(&mut *hold)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(1200)).await;
                hold.rollback().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let producer = tokio::task::spawn_blocking({
        let (topic, acts) = (topic.clone(), acts[10..].to_vec());
        move || {
            for chunk in acts.chunks(29) {
                produce_transactions(&topic, chunk.to_vec(), 29, u32::MAX, 1);
                std::thread::sleep(Duration::from_millis(1000));
            }
        }
    });
    slow.await.unwrap();
    producer.await.unwrap();
    applied_at_least(&url, &group, 300).await;
    let users: Vec<i64> = (1..=20).collect();
    assert_eq!(stored(&url, &text, &users).await, reference(&acts));
}

/// SIGTERM stops ingest within its grace period whatever it is doing: a
/// commit retried forever ("relation does not exist") or a commit stuck on
/// a lock. Neither loses anything: the batch stays uncommitted.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_ingest_stuck_retrying_or_waiting_on_postgres() {
    for stuck in ["retrying", "waiting"] {
        let topic = unique("stuck");
        create_topic(&topic, 1).await;
        let url = fresh_database().await;
        let group = unique("g");
        let (_dir, path) = views_file(&views(&topic));
        let mut process = freshet_tests::ingest_with(&path, &url, &group, "one", &["--shutdown-grace-ms", "2000"]);
        produce_transactions(&topic, vec![Act::new(1, 1_700_000_000_000, 1)], 1, u32::MAX, 1);
        applied_at_least(&url, &group, 1).await;
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let hold = if stuck == "retrying" {
            // Every commit now fails with a transient error, retried forever.
            sqlx::query("ALTER TABLE feature_deltas RENAME TO feature_deltas_away").execute(&pool).await.unwrap();
            None
        } else {
            // Every commit now waits on this lock.
            let mut hold = pool.begin().await.unwrap();
            sqlx::query("LOCK TABLE ingest_offsets IN ACCESS EXCLUSIVE MODE").execute(&mut *hold).await.unwrap();
            Some(hold)
        };
        produce_transactions(&topic, vec![Act::new(1, 1_700_000_000_001, 2)], 1, u32::MAX, 1);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(process.child.try_wait().unwrap().is_none(), "{stuck}: still running before SIGTERM");
        // terminate() fails the test if the process outlives 30 s.
        let status = process.terminate();
        assert!(status.success(), "{stuck}: {status:?}");
        if let Some(hold) = hold {
            hold.rollback().await.unwrap();
        }
        assert_eq!(applied(&url, &group).await, 1, "{stuck}: nothing committed by the stuck batch");
    }
}

/// A schema that lacks what the migrations table claims is refused at start
/// with the table named, instead of retrying "relation does not exist".
#[tokio::test(flavor = "multi_thread")]
async fn a_database_whose_schema_lacks_a_table_is_refused_at_start() {
    let url = fresh_database().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("DROP TABLE ingest_offsets").execute(&pool).await.unwrap();
    let (_dir, path) = views_file(&views(&unique("t")));
    let out = Command::new("timeout")
        .arg("60")
        .arg(binary("freshet-ingest"))
        .arg("run")
        .env("FRESHET_VIEWS", &path)
        .env("FRESHET_DATABASE_URL", &url)
        .env("FRESHET_KAFKA_BROKERS", brokers())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("schema does not match") && text.contains("ingest_offsets"), "{text}");
}

/// A record larger than the DLQ topic takes: its copy is cut down (header
/// `freshet.dlq.value.bytes` says how big it was), the `dead_letters` table
/// says so, and the records behind it flow.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_too_large_for_the_dlq_is_cut_down_and_ingest_goes_on() {
    let topic = unique("huge");
    create_topic(&topic, 1).await;
    let url = fresh_database().await;
    let group = unique("g");
    let text = views(&topic);
    let (_dir, path) = views_file(&text);
    let mut process = ingest(&path, &url, &group, "one");
    let huge = "x".repeat(999_800);
    let good = |at: i64, amount: i64| Act::new(1, 1_700_000_000_000 + at, amount).json();
    send(&topic, vec![("1".into(), good(1, 5)), ("2".into(), huge), ("3".into(), good(2, 7))]).await;
    applied_at_least(&url, &group, 2).await;
    assert_eq!(dead(&url, &group).await, 1);
    assert_eq!(stored(&url, &text, &[1]).await[&1], (2, 12, 7, 7));

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let message: String = sqlx::query_scalar("SELECT error_message FROM dead_letters").fetch_one(&pool).await.unwrap();
    assert!(message.contains("truncated") && message.contains("999800"), "{message}");
    let letters = freshet_tests::dlq::dead_letters(&format!("{topic}.dlq"), 1).await;
    let letter = letters.first().map(|(payload, headers)| (payload.len(), headers.get("freshet.dlq.value.bytes").cloned()));
    assert_eq!(letter, Some((64 << 10, Some("999800".to_string()))));
    assert!(process.terminate().success());
}

/// Keys of 1000 control characters take 6000 bytes each once escaped in a
/// change notification: a batch of them must still be applied, not
/// dead-lettered because the notification was too long.
#[tokio::test(flavor = "multi_thread")]
async fn long_escaped_keys_are_applied_not_dead_lettered() {
    let topic = unique("keys");
    create_topic(&topic, 1).await;
    let url = fresh_database().await;
    let group = unique("g");
    let text = views(&topic).replace("entity_type = \"int64\"", "entity_type = \"string\"");
    let (_dir, path) = views_file(&text);
    let _ingest = ingest(&path, &url, &group, "one");
    let key = |i: usize| format!("{}{i}", "\\u0001".repeat(1000));
    let records =
        (0..10).map(|i| (i.to_string(), format!(r#"{{"user": "{}", "at": {}, "amount": 1}}"#, key(i), 1_700_000_000_000i64 + i as i64)));
    send(&topic, records.collect()).await;
    applied_at_least(&url, &group, 10).await;
    assert_eq!(dead(&url, &group).await, 0);
}

/// A second consumer group on the same store would read the topics from
/// the start into the same rows: it is refused, until told to take over,
/// which moves the views with their offsets and fences the first group.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_group_is_refused_until_it_takes_the_views_over() {
    let topic = unique("groups");
    create_topic(&topic, 2).await;
    let url = fresh_database().await;
    let (first, second) = (unique("g"), unique("g"));
    let text = views(&topic);
    let (_dir, path) = views_file(&text);
    let acts = random_acts(200, 10, u32::MAX, 51);
    let _first = ingest(&path, &url, &first, "one");
    produce_transactions(&topic, acts[..100].to_vec(), 20, u32::MAX, 1);
    applied_at_least(&url, &first, 100).await;

    let run = |group: &str| {
        Command::new("timeout")
            .arg("60")
            .arg(binary("freshet-ingest"))
            .arg("run")
            .env("FRESHET_VIEWS", &path)
            .env("FRESHET_DATABASE_URL", &url)
            .env("FRESHET_KAFKA_BROKERS", brokers())
            .env("FRESHET_GROUP", group)
            .output()
            .unwrap()
    };
    let refused = run(&second);
    let said = String::from_utf8_lossy(&refused.stderr).into_owned() + &String::from_utf8_lossy(&refused.stdout);
    assert!(!refused.status.success());
    assert!(said.contains(&first) && said.contains("take-over"), "{said}");

    let moved = Command::new(binary("freshet-ingest"))
        .args(["take-over", "--group", &second])
        .env("FRESHET_VIEWS", &path)
        .env("FRESHET_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(moved.status.success(), "{}", String::from_utf8_lossy(&moved.stderr));
    assert!(String::from_utf8_lossy(&moved.stdout).contains(&format!("taken over from group {first}")));
    // The first group is still running: fenced, it must not apply the rest.
    let _second = ingest(&path, &url, &second, "two");
    produce_transactions(&topic, acts[100..].to_vec(), 20, u32::MAX, 1);
    eventually(Duration::from_secs(90), || async { (applied(&url, &first).await + applied(&url, &second).await >= 200).then_some(()) })
        .await
        .expect("the second group applies the rest");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let users: Vec<i64> = (1..=10).collect();
    assert_eq!(stored(&url, &text, &users).await, reference(&acts), "every act counted once");
}
