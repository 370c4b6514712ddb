//! Exactly-once ingest against real Kafka and Postgres: aborted transactions
//! are never applied, SIGKILL at random points loses and doubles nothing,
//! and poison records go to the DLQ with their origin while the rest flows.

use std::{collections::BTreeMap, time::Duration};

use freshet_store::{
    entities,
    state::{Reading, Scalar},
    view::Catalog,
};
use freshet_tests::{brokers, create_topic, eventually, fresh_database, ingest, unique, views_file};
use rand::{Rng, SeedableRng};
use rdkafka::{
    ClientConfig, Message,
    consumer::{BaseConsumer, Consumer},
    message::Headers,
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};

fn views(topic: &str) -> String {
    format!(
        r#"
[[view]]
name = "acts"
entity = "user"
entity_type = "int64"
max_age = "3650d"
freshness_budget = "5s"
allowed_lateness = "3650d"
[view.source]
topics = ["{topic}"]
format = "json"
event_time = "at"
dlq_topic = "{topic}.dlq"
[[view.feature]]
name = "n"
aggregation = "count"
window = "3650d"
[[view.feature]]
name = "total"
aggregation = "sum"
field = "amount"
type = "int64"
window = "3650d"
[[view.feature]]
name = "biggest"
aggregation = "max"
field = "amount"
type = "int64"
window = "3650d"
[[view.feature]]
name = "last_amount"
aggregation = "last"
field = "amount"
type = "int64"
[[view.feature]]
name = "last_note"
aggregation = "last"
field = "note"
type = "string"
"#
    )
}

#[derive(Clone, Copy)]
struct Act {
    user: i64,
    at_ms: i64,
    amount: i64,
}

impl Act {
    fn json(&self) -> String {
        format!(r#"{{"user": {}, "at": {}, "amount": {}, "extra": "ignored"}}"#, self.user, self.at_ms, self.amount)
    }
}

/// Per user: (count, sum, max, amount of the newest act), computed from the
/// committed acts alone, without any of Freshet's code.
fn reference(acts: &[Act]) -> BTreeMap<i64, (i64, i64, i64, i64)> {
    let mut by_user: BTreeMap<i64, Vec<Act>> = BTreeMap::new();
    for a in acts {
        by_user.entry(a.user).or_default().push(*a);
    }
    by_user
        .into_iter()
        .map(|(user, acts)| {
            let newest = acts.iter().max_by_key(|a| a.at_ms).unwrap();
            (user, (acts.len() as i64, acts.iter().map(|a| a.amount).sum(), acts.iter().map(|a| a.amount).max().unwrap(), newest.amount))
        })
        .collect()
}

/// What the store holds, read with the server's code path.
async fn stored(url: &str, views_text: &str, users: &[i64]) -> BTreeMap<i64, (i64, i64, i64, i64)> {
    let catalog = Catalog::parse(views_text, "test").unwrap();
    let view = &catalog.views[0];
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let keys: Vec<String> = users.iter().map(i64::to_string).collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let states = entities::read(&pool, &["acts"], &key_refs).await.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let int = |r: Reading| match r {
        Reading::Value { value: Scalar::Int(i), .. } => i,
        other => panic!("expected an int, got {other:?}"),
    };
    states
        .into_iter()
        .map(|((_, entity), s)| {
            let f = |name: &str| int(s.read(view.feature(name).unwrap(), now));
            (entity.parse().unwrap(), (f("n"), f("total"), f("biggest"), f("last_amount")))
        })
        .collect()
}

async fn applied(url: &str, group: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query_scalar("SELECT coalesce(sum(records_applied), 0)::int8 FROM ingest_offsets WHERE consumer_group = $1")
        .bind(group)
        .fetch_one(&pool)
        .await
        .unwrap()
}

/// Produces `acts` in transactions of `per_tx`, aborting about one in
/// `abort_one_in`; returns the acts of committed transactions.
fn produce_transactions(topic: &str, acts: Vec<Act>, per_tx: usize, abort_one_in: u32, seed: u64) -> Vec<Act> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("transactional.id", unique("producer"))
        .set("linger.ms", "5")
        .create()
        .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut committed = Vec::new();
    for chunk in acts.chunks(per_tx) {
        producer.begin_transaction().unwrap();
        for act in chunk {
            let key = act.user.to_string();
            let value = act.json();
            let mut record = BaseRecord::to(topic).key(&key).payload(&value);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        // Queue full: let it drain.
                        producer.poll(Duration::from_millis(10));
                        record = r;
                    }
                }
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        if rng.random_ratio(1, abort_one_in) {
            producer.abort_transaction(Duration::from_secs(30)).unwrap();
        } else {
            producer.commit_transaction(Duration::from_secs(30)).unwrap();
            committed.extend_from_slice(chunk);
        }
    }
    committed
}

fn random_acts(n: usize, users: i64, seed: u64) -> Vec<Act> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let base = 1_700_000_000_000i64;
    // Unique event times, shuffled: arrival order is not event-time order.
    let mut times: Vec<i64> = (0..n as i64).map(|i| base + i * 7).collect();
    use rand::seq::SliceRandom;
    times.shuffle(&mut rng);
    times.into_iter().map(|at_ms| Act { user: rng.random_range(1..=users), at_ms, amount: rng.random_range(-50..1000) }).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn aborted_transactions_are_never_applied() {
    let topic = unique("acts");
    create_topic(&topic, 3).await;
    let url = fresh_database().await;
    let group = unique("g");
    let text = views(&topic);
    let (_dir, path) = views_file(&text);
    let _ingest = ingest(&path, &url, &group, "one");

    let acts = random_acts(3000, 40, 1);
    let committed = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || produce_transactions(&topic, acts, 50, 3, 2)
    })
    .await
    .unwrap();
    assert!(committed.len() < 3000 && !committed.is_empty(), "some transactions aborted, some committed");

    let expected = committed.len() as i64;
    eventually(Duration::from_secs(60), || async { (applied(&url, &group).await >= expected).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("ingest did not apply {expected} records in time"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(applied(&url, &group).await, expected, "exactly the committed records are applied");
    let users: Vec<i64> = (1..=40).collect();
    assert_eq!(stored(&url, &text, &users).await, reference(&committed));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_points_loses_nothing_and_doubles_nothing() {
    let topic = unique("torture");
    create_topic(&topic, 4).await;
    let url = fresh_database().await;
    let group = unique("g");
    let text = views(&topic);
    let (_dir, path) = views_file(&text);

    let acts = random_acts(20_000, 200, 3);
    let producer = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || produce_transactions(&topic, acts, 200, 5, 4)
    });

    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut kills = 0;
    let mut process = ingest(&path, &url, &group, "torture");
    while kills < 8 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(700..2500))).await;
        process.kill();
        kills += 1;
        process = ingest(&path, &url, &group, "torture");
    }
    let committed = producer.await.unwrap();
    let expected = committed.len() as i64;
    eventually(Duration::from_secs(120), || async { (applied(&url, &group).await >= expected).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("ingest did not apply {expected} records after {kills} kills"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(applied(&url, &group).await, expected, "no record applied twice");
    let users: Vec<i64> = (1..=200).collect();
    assert_eq!(stored(&url, &text, &users).await, reference(&committed), "state equals the reference after {kills} SIGKILLs");
    // A clean stop works too: SIGTERM commits and leaves the group.
    assert!(process.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_goes_to_the_dlq_with_its_origin_and_the_rest_flows() {
    let topic = unique("poison");
    create_topic(&topic, 1).await;
    let url = fresh_database().await;
    let group = unique("g");
    // String keys, so that one record can carry a key Postgres refuses.
    let text = views(&topic).replace("entity_type = \"int64\"", "entity_type = \"string\"");
    let (_dir, path) = views_file(&text);
    let _ingest = ingest(&path, &url, &group, "one");

    let records: Vec<(&str, Option<&str>)> = vec![
        (r#"{"user": "u1", "at": 1700000000000, "amount": 10}"#, None),
        ("{not json", Some("freshet.decode.InvalidJson")),
        (r#"{"at": 1700000000001, "amount": 3}"#, Some("freshet.decode.MissingField")),
        (r#"{"user": "u1", "at": 1700000000002, "amount": "three"}"#, Some("freshet.decode.WrongType")),
        // Valid JSON, but Postgres refuses a NUL character in text.
        (r#"{"user": "u\u00002", "at": 1700000000003, "amount": 4}"#, Some("freshet.sink.Rejected")),
        (r#"{"user": "u1", "at": 1700000000004, "amount": 20}"#, None),
        (r#"{"user": "u3", "at": 1700000000005, "amount": 5}"#, None),
    ];
    tokio::task::spawn_blocking({
        let topic = topic.clone();
        let records: Vec<String> = records.iter().map(|(r, _)| r.to_string()).collect();
        move || {
            let producer: ThreadedProducer<DefaultProducerContext> =
                ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
            for r in &records {
                producer.send(BaseRecord::<str, str>::to(&topic).key("k").payload(r)).unwrap();
            }
            producer.flush(Duration::from_secs(10)).unwrap();
        }
    })
    .await
    .unwrap();

    eventually(Duration::from_secs(60), || async { (applied(&url, &group).await >= 3).then_some(()) }).await.expect("good records applied");
    let catalog = Catalog::parse(&text, "test").unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let states = entities::read(&pool, &["acts"], &["u1", "u3"]).await.unwrap();
    let count =
        |user: &str| states[&("acts".to_string(), user.to_string())].read(catalog.views[0].feature("total").unwrap(), 1_700_000_001_000);
    assert_eq!(count("u1"), Reading::Value { value: Scalar::Int(30), at_ms: 1_700_000_000_004 });
    assert_eq!(count("u3"), Reading::Value { value: Scalar::Int(5), at_ms: 1_700_000_000_005 });
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM feature_state").fetch_one(&pool).await.unwrap();
    assert_eq!(rows, 2, "the rejected record left no trace");

    // The DLQ holds each poison record with its origin and error.
    let dlq = format!("{topic}.dlq");
    let letters = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("dlq-reader"))
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        consumer.subscribe(&[&dlq]).unwrap();
        let mut letters = Vec::new();
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while letters.len() < 4 && std::time::Instant::now() < end {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let headers: BTreeMap<String, String> = m
                    .headers()
                    .map(|h| {
                        h.iter().map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect()
                    })
                    .unwrap_or_default();
                letters.push((String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(), headers));
            }
        }
        letters
    })
    .await
    .unwrap();
    let poison: Vec<(usize, &str)> = records.iter().enumerate().filter_map(|(i, (_, class))| class.map(|c| (i, c))).collect();
    assert_eq!(letters.len(), poison.len(), "{letters:?}");
    for ((payload, headers), (offset, class)) in letters.iter().zip(&poison) {
        assert_eq!(payload, records[*offset].0);
        assert_eq!(headers["__connect.errors.topic"], topic);
        assert_eq!(headers["__connect.errors.partition"], "0");
        assert_eq!(headers["__connect.errors.offset"], offset.to_string());
        assert_eq!(headers["__connect.errors.exception.class.name"], *class);
        assert!(!headers["__connect.errors.exception.message"].is_empty());
        let stage = if *class == "freshet.sink.Rejected" { "SINK" } else { "VALUE_CONVERTER" };
        assert_eq!(headers["__connect.errors.stage"], stage);
    }
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let (dead, next): (i64, i64) = sqlx::query_as("SELECT records_dead, next_offset FROM ingest_offsets WHERE consumer_group = $1")
        .bind(&group)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((dead, next), (4, records.len() as i64), "dead letters are committed with the offsets that skip them");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_share_partitions_through_restarts_and_kills() {
    let topic = unique("rebalance");
    create_topic(&topic, 4).await;
    let url = fresh_database().await;
    let group = unique("g");
    let text = views(&topic);
    let (_dir, path) = views_file(&text);

    let acts = random_acts(20_000, 100, 11);
    let producer = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || produce_transactions(&topic, acts, 100, 6, 12)
    });
    let mut a = ingest(&path, &url, &group, "a");
    let mut b = ingest(&path, &url, &group, "b");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // B stops cleanly and comes back: partitions move to A and back.
    assert!(b.terminate().success());
    tokio::time::sleep(Duration::from_secs(2)).await;
    b = ingest(&path, &url, &group, "b");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Both die at once, without warning, and restart.
    a.kill();
    b.kill();
    let _a = ingest(&path, &url, &group, "a");
    let _b = ingest(&path, &url, &group, "b");

    let committed = producer.await.unwrap();
    let expected = committed.len() as i64;
    eventually(Duration::from_secs(120), || async { (applied(&url, &group).await >= expected).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("ingest did not apply {expected} records"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(applied(&url, &group).await, expected, "no record applied twice");
    let users: Vec<i64> = (1..=100).collect();
    assert_eq!(stored(&url, &text, &users).await, reference(&committed));
    // Both instances took part: each partition was claimed more than once.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let owners: Vec<String> = sqlx::query_scalar("SELECT DISTINCT owner FROM ingest_offsets WHERE consumer_group = $1 AND owner_epoch > 1")
        .bind(&group)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(!owners.is_empty());
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_outage_pauses_ingest_which_then_resumes_exactly() {
    use freshet_tests::{fresh_database_at, service_env, services, tempfile_dir};
    // A Postgres of this test's own, to stop without disturbing others.
    let pg = tempfile_dir::Dir::new();
    let pg_dir = pg.path.to_str().unwrap().to_string();
    services(&["start", "--only", "postgres", &pg_dir]);
    let url = fresh_database_at(&service_env(&pg.path, "FRESHET_DATABASE_URL")).await;
    let topic = unique("outage");
    create_topic(&topic, 2).await;
    let group = unique("g");
    let text = views(&topic);
    let (_dir, path) = views_file(&text);
    let mut process = ingest(&path, &url, &group, "one");
    let pid = process.child.id();

    let acts = random_acts(30_000, 50, 21);
    let producer = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || produce_transactions(&topic, acts, 500, 8, 22)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    services(&["pg-stop", &pg_dir]);
    // While the sink is down ingest keeps running, keeps its memory bounded
    // although records keep arriving, and commits nothing.
    let mut peak = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(process.child.try_wait().unwrap().is_none(), "ingest must survive a Postgres outage");
        peak = peak.max(rss_kib(pid));
    }
    assert!(peak > 0 && peak < 256 * 1024, "RSS {peak} KiB during the outage");
    services(&["pg-start", &pg_dir]);

    let committed = producer.await.unwrap();
    let expected = committed.len() as i64;
    eventually(Duration::from_secs(120), || async { (applied(&url, &group).await >= expected).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("ingest did not resume and apply {expected} records"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(applied(&url, &group).await, expected);
    let users: Vec<i64> = (1..=50).collect();
    assert_eq!(stored(&url, &text, &users).await, reference(&committed));
    assert!(process.terminate().success());
    services(&["stop", &pg_dir]);
}

#[tokio::test(flavor = "multi_thread")]
async fn freshness_reports_lag_against_the_broker_when_ingest_stops() {
    use freshet_proto::v1::{FreshnessVerdict, GetFreshnessRequest, feature_service_client::FeatureServiceClient};
    let topic = unique("fresh");
    create_topic(&topic, 1).await;
    let url = fresh_database().await;
    let group = unique("g");
    let text = views(&topic);
    let (_dir, path) = views_file(&text);
    let mut process = ingest(&path, &url, &group, "one");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let batch = |from: i64| (from..from + 10).map(|i| Act { user: 1, at_ms: now + i, amount: 1 }).collect::<Vec<_>>();
    let produce = |acts: Vec<Act>| {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || produce_transactions(&topic, acts, 100, u32::MAX, 1))
    };
    produce(batch(0)).await.unwrap();
    eventually(Duration::from_secs(60), || async { (applied(&url, &group).await >= 10).then_some(()) }).await.expect("applied");

    let (_server, address) = freshet_tests::server(&path, &url, &["--group", &group, "--kafka-brokers", &brokers()]);
    let client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let freshness = |mut client: FeatureServiceClient<tonic::transport::Channel>| async move {
        let r = client.get_freshness(GetFreshnessRequest { views: vec!["acts".into()] }).await.unwrap().into_inner();
        let view = r.views[0].clone();
        (view.verdict(), view.partitions[0].lag_records, view.partitions[0].committed_offset)
    };
    let (verdict, lag, committed) = freshness(client.clone()).await;
    assert_eq!((verdict, committed), (FreshnessVerdict::Fresh, 10), "caught up (lag {lag}: the commit marker)");

    // Ingest stops; the source moves on. The server sees it from the broker.
    process.kill();
    produce(batch(10)).await.unwrap();
    let (verdict, lag) = eventually(Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            let (verdict, lag, _) = freshness(client).await;
            (lag >= 10).then_some((verdict, lag))
        }
    })
    .await
    .expect("lag seen from the broker's high watermark");
    assert_ne!(verdict, FreshnessVerdict::Fresh, "lag {lag}");
    // Past the budget (5 s) without a commit, ingest is stalled.
    let stalled = eventually(Duration::from_secs(15), || {
        let client = client.clone();
        async move { (freshness(client).await.0 == FreshnessVerdict::Stalled).then_some(()) }
    })
    .await;
    assert!(stalled.is_some(), "verdict should become STALLED");
}

#[tokio::test(flavor = "multi_thread")]
async fn events_later_than_the_allowed_lateness_are_counted_not_windowed() {
    let topic = unique("late");
    create_topic(&topic, 1).await;
    let url = fresh_database().await;
    let group = unique("g");
    let text = views(&topic).replace("allowed_lateness = \"3650d\"", "allowed_lateness = \"1m\"");
    let (_dir, path) = views_file(&text);
    let _ingest = ingest(&path, &url, &group, "one");
    let t0 = 1_700_000_000_000i64;
    let acts = vec![
        Act { user: 1, at_ms: t0, amount: 1 },
        Act { user: 1, at_ms: t0 - 30_000, amount: 2 }, // late, within a minute: counted in windows
        Act { user: 1, at_ms: t0 - 120_000, amount: 4 }, // too late: kept out of windows
        Act { user: 1, at_ms: t0 + 1, amount: 8 },
    ];
    tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || produce_transactions(&topic, acts, 10, u32::MAX, 1)
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(60), || async { (applied(&url, &group).await >= 4).then_some(()) }).await.expect("applied");
    let state = stored(&url, &text, &[1]).await;
    assert_eq!(state[&1], (3, 11, 8, 8), "the too-late event is not in count, sum or max; last is the newest");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let late: i64 = sqlx::query_scalar("SELECT records_late FROM ingest_offsets WHERE consumer_group = $1")
        .bind(&group)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(late, 1);
}
