//! Exactly-once ingest against real Kafka and Postgres: aborted transactions
//! are never applied, SIGKILL at random points loses and doubles nothing,
//! and poison records go to the DLQ with their origin while the rest flows.

use std::time::Duration;

use freshet_store::{
    entities,
    state::{Reading, Scalar},
    view::Catalog,
};
use freshet_tests::{
    acts::{Act, applied, produce_transactions, random_acts, reference, stored, views},
    brokers, create_topic, eventually, fresh_database, ingest, unique, views_file,
};
use rand::{Rng, SeedableRng};
use rdkafka::{
    ClientConfig,
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};

#[tokio::test(flavor = "multi_thread")]
async fn aborted_transactions_are_never_applied() {
    let topic = unique("acts");
    create_topic(&topic, 3).await;
    let url = fresh_database().await;
    let group = unique("g");
    let text = views(&topic);
    let (_dir, path) = views_file(&text);
    let _ingest = ingest(&path, &url, &group, "one");

    let acts = random_acts(3000, 40, u32::MAX, 1);
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

    let acts = random_acts(20_000, 200, u32::MAX, 3);
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
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM (SELECT entity FROM feature_state UNION SELECT entity FROM feature_deltas) AS e")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rows, 2, "the rejected record left no trace");

    // The DLQ holds each poison record with its origin and error.
    let letters = freshet_tests::dlq::dead_letters(&format!("{topic}.dlq"), 4).await;
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

    let acts = random_acts(20_000, 100, u32::MAX, 11);
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
    // Compaction folds every delta into base rows, and the answer stays.
    let deltas = || async { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM feature_deltas").fetch_one(&pool).await.unwrap() };
    eventually(Duration::from_secs(60), || async { (deltas().await == 0).then_some(()) }).await.expect("all deltas folded");
    assert_eq!(stored(&url, &text, &users).await, reference(&committed), "the same after compaction");
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

    let acts = random_acts(30_000, 50, u32::MAX, 21);
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
    let metrics_port = freshet_tests::free_port();
    let listen = format!("127.0.0.1:{metrics_port}");
    let mut process = freshet_tests::ingest_with(&path, &url, &group, "one", &["--metrics-listen", &listen]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let batch = |from: i64| (from..from + 10).map(|i| Act::new(1, now + i, 1)).collect::<Vec<_>>();
    let produce = |acts: Vec<Act>, abort_one_in: u32| {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || produce_transactions(&topic, acts, 10, abort_one_in, 1))
    };
    // One committed transaction (offsets 0-9, its marker at 10), then two
    // aborted ones (11-20 and their marker, 22-31 and theirs): the log ends
    // at 33, and read_committed delivers nothing past offset 9.
    produce(batch(0), u32::MAX).await.unwrap();
    assert!(produce([batch(100), batch(110)].concat(), 1).await.unwrap().is_empty(), "both transactions aborted");
    eventually(Duration::from_secs(60), || async { (applied(&url, &group).await >= 10).then_some(()) }).await.expect("applied");

    let (_server, address) = freshet_tests::server(&path, &url, &["--group", &group, "--kafka-brokers", &brokers()]);
    let client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let freshness = |mut client: FeatureServiceClient<tonic::transport::Channel>| async move {
        let r = client.get_freshness(GetFreshnessRequest { views: vec!["acts".into()] }).await.unwrap().into_inner();
        let view = r.views[0].clone();
        (view.verdict(), view.partitions[0].lag_records, view.partitions[0].committed_offset)
    };
    // Caught up means lag 0 and FRESH, markers and aborted records included.
    let caught_up = eventually(Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let (verdict, lag, committed) = freshness(client).await;
            (committed == 33).then_some((verdict, lag))
        }
    })
    .await;
    assert_eq!(caught_up, Some((FreshnessVerdict::Fresh, 0)), "the committed position moves past markers and aborted records");
    let metrics = freshet_tests::scrape(metrics_port).await;
    let labels = format!("{{topic=\"{topic}\",partition=\"0\"}}");
    assert_eq!(metrics.get(&format!("freshet_ingest_consumer_lag_records{labels}")), Some(&0.0), "{metrics:?}");
    assert_eq!(metrics.get(&format!("freshet_ingest_committed_offset{labels}")), Some(&33.0));
    assert_eq!(applied(&url, &group).await, 10, "nothing aborted was applied");

    // Ingest stops; the source moves on. The server sees it from the broker.
    process.kill();
    produce(batch(10), u32::MAX).await.unwrap();
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
        Act::new(1, t0, 1),
        Act::new(1, t0 - 30_000, 2),  // late, within a minute: counted in windows
        Act::new(1, t0 - 120_000, 4), // too late: kept out of windows
        Act::new(1, t0 + 1, 8),
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

/// Two instances commit, at the same moment, events of the same entities,
/// none of which has a row yet (issue 10). The overlap is forced: a test
/// transaction holds partition 0's offsets row, so the instance owning it
/// parks its commit inside its transaction; the other instance's commit of
/// the same entities then runs (into it, or past it). Released, both must
/// land in full: neither may replace what the other wrote.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_commits_of_the_same_new_entities_lose_nothing() {
    let topic = unique("overlap");
    create_topic(&topic, 2).await;
    let url = fresh_database().await;
    let group = unique("g");
    let text = views(&topic);
    let (_dir, path) = views_file(&text);
    let _a = ingest(&path, &url, &group, "a");
    let _b = ingest(&path, &url, &group, "b");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let owners = || async {
        let owners: Vec<String> = sqlx::query_scalar("SELECT owner FROM ingest_offsets WHERE consumer_group = $1 ORDER BY partition")
            .bind(&group)
            .fetch_all(&pool)
            .await
            .unwrap();
        (owners.len() == 2 && owners[0] != owners[1]).then_some(())
    };
    eventually(Duration::from_secs(60), owners).await.expect("each instance owns one partition");

    let users: Vec<i64> = (1..=50).collect();
    let acts = |partition: i64| -> Vec<Act> {
        users.iter().flat_map(|&u| (0..3).map(move |i| Act::new(u, 1_700_000_000_000 + u * 1000 + partition * 10 + i, u + i))).collect()
    };
    let produce = |partition: i32, acts: Vec<Act>| {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || {
            let producer: ThreadedProducer<DefaultProducerContext> =
                ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
            for act in &acts {
                let (key, value) = (act.key(), act.json());
                producer.send(BaseRecord::to(&topic).partition(partition).key(&key).payload(&value)).unwrap();
            }
            producer.flush(Duration::from_secs(10)).unwrap();
        })
    };
    let waiting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };

    let mut hold = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM ingest_offsets WHERE consumer_group = $1 AND partition = 0 FOR UPDATE")
        .bind(&group)
        .execute(&mut *hold)
        .await
        .unwrap();
    let (first, second) = (acts(0), acts(1));
    produce(0, first.clone()).await.unwrap();
    eventually(Duration::from_secs(60), || async { (waiting().await >= 1).then_some(()) }).await.expect("partition 0's commit waits");
    produce(1, second.clone()).await.unwrap();
    let partition_1_done = || async {
        sqlx::query_scalar::<_, i64>("SELECT records_applied FROM ingest_offsets WHERE consumer_group = $1 AND partition = 1")
            .bind(&group)
            .fetch_one(&pool)
            .await
            .unwrap()
            == second.len() as i64
    };
    eventually(Duration::from_secs(60), || async { (waiting().await >= 2 || partition_1_done().await).then_some(()) })
        .await
        .expect("partition 1's commit runs into partition 0's, or lands while it is parked");
    hold.rollback().await.unwrap();

    let all: Vec<Act> = first.into_iter().chain(second).collect();
    let expected = all.len() as i64;
    eventually(Duration::from_secs(60), || async { (applied(&url, &group).await >= expected).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("ingest did not apply {expected} records"));
    assert_eq!(stored(&url, &text, &users).await, reference(&all), "no event of a new entity lost to a concurrent commit");
}

/// Postgres may lose its newest commits in a crash (ingest commits with
/// `synchronous_commit = off`; Kafka holds the records). The owner's next
/// compare-and-set then fails under its own epoch: it must rewind to where
/// the store stands and apply the lost records again, without a restart,
/// rather than drop a partition nobody else will take.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_lost_its_newest_commits_is_caught_up_from_kafka() {
    let topic = unique("rewind");
    create_topic(&topic, 1).await;
    let url = fresh_database().await;
    let group = unique("g");
    let text = views(&topic);
    let (_dir, path) = views_file(&text);
    let _ingest = ingest(&path, &url, &group, "one");
    let acts = random_acts(110, 10, u32::MAX, 31);
    let produce = |acts: Vec<Act>| {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || produce_transactions(&topic, acts, 10, u32::MAX, 1))
    };
    let applied_at_least = |n: i64| {
        let (url, group) = (url.clone(), group.clone());
        async move {
            eventually(Duration::from_secs(60), || async { (applied(&url, &group).await >= n).then_some(()) })
                .await
                .unwrap_or_else(|| panic!("ingest did not apply {n} records"))
        }
    };
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    produce(acts[..50].to_vec()).await.unwrap();
    applied_at_least(50).await;
    sqlx::raw_sql(
        "BEGIN ISOLATION LEVEL REPEATABLE READ;
         CREATE TABLE lost_state AS SELECT * FROM feature_state;
         CREATE TABLE lost_deltas AS SELECT * FROM feature_deltas;
         CREATE TABLE lost_offsets AS SELECT * FROM ingest_offsets;
         COMMIT",
    )
    .execute(&pool)
    .await
    .unwrap();
    produce(acts[50..100].to_vec()).await.unwrap();
    applied_at_least(100).await;
    // The store goes back to how it stood after 50 records, epoch unchanged.
    sqlx::raw_sql(
        "BEGIN;
         DELETE FROM feature_state;
         INSERT INTO feature_state SELECT * FROM lost_state;
         DELETE FROM feature_deltas;
         INSERT INTO feature_deltas SELECT * FROM lost_deltas;
         UPDATE ingest_offsets o SET next_offset = l.next_offset, records_applied = l.records_applied, newest_event_at = l.newest_event_at
         FROM lost_offsets l WHERE (o.consumer_group, o.topic, o.partition) = (l.consumer_group, l.topic, l.partition);
         COMMIT",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(applied(&url, &group).await, 50);
    produce(acts[100..].to_vec()).await.unwrap();
    applied_at_least(110).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(applied(&url, &group).await, 110, "the lost records are applied again, once");
    let users: Vec<i64> = (1..=10).collect();
    assert_eq!(stored(&url, &text, &users).await, reference(&acts));
}

/// Adding a feature to a view on a Monday morning: ingest stops, `rebuild`
/// deletes the view's state and rewinds its topic, and ingest with the new
/// file recomputes every feature, old ones and the new one, from Kafka.
#[tokio::test(flavor = "multi_thread")]
async fn rebuild_recomputes_a_view_with_a_new_feature_from_kafka() {
    let topic = unique("rebuild");
    create_topic(&topic, 2).await;
    let url = fresh_database().await;
    let group = unique("g");
    let new_file = views(&topic);
    let total = "[[view.feature]]\nname = \"total\"\naggregation = \"sum\"\nfield = \"amount\"\ntype = \"int64\"\nwindow = \"3650d\"\n";
    assert!(new_file.contains(total));
    let (_old_dir, old_path) = views_file(&new_file.replace(total, ""));
    let (_new_dir, new_path) = views_file(&new_file);
    let acts = random_acts(300, 20, u32::MAX, 61);
    let mut process = ingest(&old_path, &url, &group, "one");
    produce_transactions(&topic, acts.clone(), 50, u32::MAX, 1);
    eventually(Duration::from_secs(60), || async { (applied(&url, &group).await >= 300).then_some(()) }).await.expect("applied");
    assert!(process.terminate().success());

    let out = std::process::Command::new(freshet_tests::binary("freshet-ingest"))
        .args(["rebuild", "--view", "acts"])
        .env("FRESHET_VIEWS", &new_path)
        .env("FRESHET_DATABASE_URL", &url)
        .env("FRESHET_KAFKA_BROKERS", brokers())
        .env("FRESHET_GROUP", &group)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(applied(&url, &group).await, 0, "the view starts over");
    let _process = ingest(&new_path, &url, &group, "one");
    eventually(Duration::from_secs(60), || async { (applied(&url, &group).await >= 300).then_some(()) }).await.expect("recomputed");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(applied(&url, &group).await, 300, "each record once");
    let users: Vec<i64> = (1..=20).collect();
    assert_eq!(stored(&url, &new_file, &users).await, reference(&acts), "old and new features recomputed");
}
