//! Hostile input against real Kafka and Postgres: one record must never stop
//! or poison the pipeline, and an operator's mistake in the view file is
//! refused before anything runs (issue 13).

use std::{process::Command, time::Duration};

use freshet_store::{
    entities,
    state::{Reading, Scalar},
    view::Catalog,
};
use freshet_tests::{binary, brokers, create_topic, eventually, fresh_database, ingest, unique, views_file};
use rdkafka::{
    ClientConfig,
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};
use serde_json::json;

fn views(topic: &str, key_type: &str) -> String {
    format!(
        r#"
[[view]]
name = "acts"
entity = "user"
entity_type = "{key_type}"
max_age = "1d"
freshness_budget = "5s"
allowed_lateness = "1m"
[view.source]
topics = ["{topic}"]
format = "json"
event_time = "at"
[[view.feature]]
name = "n_1h"
aggregation = "count"
window = "1h"
[[view.feature]]
name = "last_note"
aggregation = "last"
field = "note"
type = "string"
"#
    )
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Produces `values` to `topic`, in order, stamped with the time of sending.
async fn produce(topic: &str, values: Vec<String>) {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
        for v in &values {
            producer.send(BaseRecord::<str, str>::to(&topic).key("k").payload(v)).unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    })
    .await
    .unwrap();
}

/// (next offset, applied, dead, late) of the group's one partition, once it
/// has committed `records` records.
async fn progress_after(url: &str, group: &str, records: i64) -> (i64, i64, i64, i64) {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    eventually(Duration::from_secs(60), || async {
        let row: Option<(i64, i64, i64, i64)> =
            sqlx::query_as("SELECT next_offset, records_applied, records_dead, records_late FROM ingest_offsets WHERE consumer_group = $1")
                .bind(group)
                .fetch_optional(&pool)
                .await
                .unwrap();
        row.filter(|r| r.0 >= records)
    })
    .await
    .unwrap_or_else(|| panic!("ingest did not get through {records} records"))
}

/// `(payload, error class)` of the first `n` dead letters in `dlq`.
async fn dead_letters(dlq: &str, n: usize) -> Vec<(String, String)> {
    let letters = freshet_tests::dlq::dead_letters(dlq, n).await;
    letters.into_iter().map(|(payload, headers)| (payload, headers["__connect.errors.exception.class.name"].clone())).collect()
}

/// What `acts` serves for `entity` now: (events in the last hour, last note).
async fn served(url: &str, views_text: &str, entity: &str) -> (Reading, Reading) {
    let catalog = Catalog::parse(views_text, "test").unwrap();
    let view = &catalog.views[0];
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let states = entities::read(&pool, &["acts"], &[entity]).await.unwrap();
    let state = &states[&("acts".to_string(), entity.to_string())];
    let now = now_ms();
    (state.read(view.feature("n_1h").unwrap(), now), state.read(view.feature("last_note").unwrap(), now))
}

/// One event dated 2100 used to become the partition's lateness reference,
/// so every current event after it was "late" and left out of all windows.
#[tokio::test(flavor = "multi_thread")]
async fn a_far_future_event_is_dead_lettered_and_current_events_are_counted() {
    let topic = unique("future");
    create_topic(&topic, 1).await;
    let url = fresh_database().await;
    let group = unique("g");
    let text = views(&topic, "int64");
    let (_dir, path) = views_file(&text);
    let _ingest = ingest(&path, &url, &group, "one");

    let future = json!({"user": 1, "at": "2100-01-01T00:00:00Z", "note": "from the future"}).to_string();
    let now = now_ms();
    let mut values = vec![future.clone()];
    values.extend((1..=3).map(|i| json!({"user": 1, "at": now - 4000 + i * 1000, "note": format!("now {i}")}).to_string()));
    produce(&topic, values).await;

    let (_, applied, dead, late) = progress_after(&url, &group, 4).await;
    assert_eq!((applied, dead, late), (3, 1, 0), "three current events applied, none late; the future one dead");
    let (count, last) = served(&url, &text, "1").await;
    assert_eq!(count, Reading::Value { value: Scalar::Int(3), at_ms: now - 1000 });
    assert_eq!(last, Reading::Value { value: Scalar::Str("now 3".into()), at_ms: now - 1000 });
    assert_eq!(dead_letters(&format!("{topic}.dlq"), 1).await, [(future, "freshet.decode.FutureEventTime".to_string())]);
}

/// Wrongly typed values holding multi-byte text used to panic ingest (and
/// again at every restart); keys the server refuses used to be stored.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_values_and_keys_are_dead_lettered_and_ingest_goes_on() {
    let topic = unique("hostile");
    create_topic(&topic, 1).await;
    let url = fresh_database().await;
    let group = unique("g");
    let text = views(&topic, "string");
    let (_dir, path) = views_file(&text);
    let mut process = ingest(&path, &url, &group, "one");

    let now = now_ms();
    let poison = [
        (json!({"user": "u1", "at": "é".repeat(45)}), "freshet.decode.WrongType"),
        (json!({"user": ["✓".repeat(40)], "at": now}), "freshet.decode.WrongType"),
        (json!({"user": "u1", "at": now, "note": ["😀".repeat(30)]}), "freshet.decode.WrongType"),
        (json!({"user": "", "at": now}), "freshet.decode.InvalidKey"),
        (json!({"user": "k".repeat(1500), "at": now}), "freshet.decode.InvalidKey"),
    ];
    let good = json!({"user": "u1", "at": now, "note": "fine"}).to_string();
    let mut values: Vec<String> = poison.iter().map(|(v, _)| v.to_string()).collect();
    values.push(good);
    produce(&topic, values).await;

    let (_, applied, dead, _) = progress_after(&url, &group, 6).await;
    assert_eq!((applied, dead), (1, 5));
    assert!(process.child.try_wait().unwrap().is_none(), "ingest is still running");
    let (count, last) = served(&url, &text, "u1").await;
    assert_eq!(count, Reading::Value { value: Scalar::Int(1), at_ms: now });
    assert_eq!(last, Reading::Value { value: Scalar::Str("fine".into()), at_ms: now });
    let expected: Vec<(String, String)> = poison.iter().map(|(v, class)| (v.to_string(), class.to_string())).collect();
    assert_eq!(dead_letters(&format!("{topic}.dlq"), poison.len()).await, expected);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT entity FROM feature_state UNION SELECT entity FROM feature_deltas").fetch_all(&pool).await.unwrap();
    assert_eq!(keys, ["u1"], "no key the server would refuse is stored");
}

/// A dead-letter topic that is a source loops poison forever; ingest
/// refuses the file at start, naming file, line and setting.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_topic_that_is_a_source_is_refused_at_start() {
    let topic = unique("loop");
    let text = views(&topic, "int64").replace("event_time = \"at\"\n", &format!("event_time = \"at\"\ndlq_topic = \"{topic}\"\n"));
    let (_dir, path) = views_file(&text);
    let out = Command::new(binary("freshet-ingest"))
        .arg("run")
        .env("FRESHET_VIEWS", &path)
        .env("FRESHET_DATABASE_URL", "postgres://127.0.0.1:1/none")
        .env("FRESHET_KAFKA_BROKERS", brokers())
        .env("FRESHET_GROUP", unique("g"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().position(|l| l.starts_with("dlq_topic")).unwrap() + 1;
    let expected = format!("{}:{line}: view \"acts\": source.dlq_topic \"{topic}\" is a source topic", path.display());
    assert!(stderr.contains(&expected), "{stderr}");
}
