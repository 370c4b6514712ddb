//! The foundation holds: the broker the project starts does transactions,
//! the migrations build the schema, and a broken feature-view file is refused.

use std::{process::Command, time::Duration};

use freshet_tests::{binary, brokers, create_topic, env, fresh_database, unique};
use rdkafka::{
    ClientConfig, Message,
    consumer::{BaseConsumer, Consumer},
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};

fn read_all(topic: &str, isolation: &str, expect_at_least: usize) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("isolation.level", isolation)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = Vec::new();
    let end = std::time::Instant::now() + Duration::from_secs(30);
    // Keep reading a little past the expected count, so extra records show.
    let mut quiet_polls = 0;
    while std::time::Instant::now() < end && (seen.len() < expect_at_least || quiet_polls < 10) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                seen.push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
                quiet_polls = 0;
            }
            _ => quiet_polls += 1,
        }
    }
    seen
}

#[tokio::test]
async fn the_broker_hides_aborted_transactions_from_read_committed() {
    let topic = unique("tx");
    create_topic(&topic, 1).await;
    let topic_for_thread = topic.clone();
    tokio::task::spawn_blocking(move || {
        let topic = topic_for_thread;
        let producer: ThreadedProducer<DefaultProducerContext> =
            ClientConfig::new().set("bootstrap.servers", brokers()).set("transactional.id", unique("txid")).create().unwrap();
        producer.init_transactions(Duration::from_secs(30)).unwrap();
        for (outcome, commit) in [("aborted", false), ("committed", true), ("aborted-again", false)] {
            producer.begin_transaction().unwrap();
            for i in 0..3 {
                producer.send(BaseRecord::<(), str>::to(&topic).payload(&format!("{outcome}-{i}"))).unwrap();
            }
            producer.flush(Duration::from_secs(10)).unwrap();
            if commit {
                producer.commit_transaction(Duration::from_secs(10)).unwrap();
            } else {
                producer.abort_transaction(Duration::from_secs(10)).unwrap();
            }
        }
    })
    .await
    .unwrap();

    let committed = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || read_all(&topic, "read_committed", 3)
    })
    .await
    .unwrap();
    assert_eq!(committed, ["committed-0", "committed-1", "committed-2"]);
    // The aborted records were written: read_uncommitted sees all nine.
    let everything = tokio::task::spawn_blocking(move || read_all(&topic, "read_uncommitted", 9)).await.unwrap();
    assert_eq!(everything.len(), 9, "{everything:?}");
}

#[tokio::test]
async fn migrations_build_the_schema_and_binaries_refuse_an_unmigrated_database() {
    let admin = sqlx::PgPool::connect(&env("FRESHET_DATABASE_URL")).await.unwrap();
    let name = unique("bare");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await.unwrap();
    let bare_url = format!("{}/{name}", env("FRESHET_DATABASE_URL").rsplit_once('/').unwrap().0);

    // The server refuses to start on it, and says what to do.
    let out = Command::new(binary("freshet-server"))
        .args(["serve", "--listen", "127.0.0.1:0", "--views", concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/reference.toml")])
        .env("FRESHET_DATABASE_URL", &bare_url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not migrated") && stderr.contains("migrate"), "{stderr}");

    // `migrate` builds the schema.
    let out = Command::new(binary("freshet-server")).arg("migrate").env("FRESHET_DATABASE_URL", &bare_url).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pool = sqlx::PgPool::connect(&bare_url).await.unwrap();
    freshet_store::db::ensure_migrated(&pool).await.expect("migrated now");
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name IN ('feature_state', 'ingest_offsets', 'dead_letters')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for (table, column) in [
        ("feature_state", "state"),
        ("feature_state", "newest_event_at"),
        ("ingest_offsets", "next_offset"),
        ("ingest_offsets", "owner_epoch"),
        ("ingest_offsets", "high_watermark"),
        ("dead_letters", "error_class"),
    ] {
        assert!(columns.iter().any(|(t, c)| t == table && c == column), "{table}.{column} missing from {columns:?}");
    }
    // Applying again is a no-op.
    let again = fresh_database().await;
    assert!(Command::new(binary("freshet-ingest")).arg("migrate").env("FRESHET_DATABASE_URL", again).status().unwrap().success());
}

#[test]
fn a_broken_view_file_is_refused_with_its_line() {
    let (_dir, path) = freshet_tests::views_file(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/reference.toml"))
            .unwrap()
            .replace("aggregation = \"max\"", "aggregation = \"median\""),
    );
    let out = Command::new(binary("freshet-server")).arg("views").arg("--views").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("views.toml:") && stderr.contains("median"), "{stderr}");

    let good = Command::new(binary("freshet-server"))
        .args(["views", "--views", concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/reference.toml")])
        .output()
        .unwrap();
    assert!(good.status.success());
    assert!(String::from_utf8_lossy(&good.stdout).contains("user_activity: 5 features"));
}
