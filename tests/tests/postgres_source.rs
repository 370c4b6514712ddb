//! The direct Postgres source against the real Postgres of the test run
//! (`wal_level = logical`), with no Kafka in the ingest process: snapshot
//! plus stream equals the table, SIGKILLs while the application writes and
//! a second instance on the same slot neither lose nor double a row, bad
//! rows and type changes go to the dead-letter table, ADD/DROP COLUMN flow
//! on, TRUNCATE retracts nothing (as through Debezium), GetFreshness shows
//! the slot's WAL, and a removed view's slot is dropped (a foreign one
//! never is).
//!
//! Each test has its own source database, publication and slot, and drops
//! its slot at the end so the server retains no WAL for it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use freshet_proto::v1::{GetFreshnessRequest, feature_service_client::FeatureServiceClient};
use freshet_tests::{
    Process,
    acts::{Act, Totals, reference, stored},
    binary, eventually, fresh_database, server, tempfile_dir, unique, views_file,
};
use rand::{Rng, SeedableRng};
use sqlx::PgPool;

const SOURCE_ENV: &str = "FRESHET_SOURCE_DATABASE_URL";

/// One test's world: a source database with table `acts` in a publication,
/// a slot name, a store, the acts view (`freshet_tests::acts`) reading the
/// table through the slot, and a consumer group.
struct World {
    source_url: String,
    source: PgPool,
    slot: String,
    store: String,
    text: String,
    path: PathBuf,
    _dir: tempfile_dir::Dir,
    group: String,
}

impl World {
    /// `edit` adapts the view file to the test.
    async fn new(edit: impl FnOnce(String) -> String) -> World {
        let source_url = fresh_database().await;
        let source = PgPool::connect(&source_url).await.unwrap();
        sqlx::query("CREATE TABLE acts (id bigserial PRIMARY KEY, \"user\" int8 NOT NULL, at int8 NOT NULL, amount int8, note text)")
            .execute(&source)
            .await
            .unwrap();
        let (slot, publication) = (unique("slot"), unique("pub"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE PUBLICATION {publication} FOR TABLE acts"))).execute(&source).await.unwrap();
        let text = edit(freshet_tests::acts::views("unused").replace(
            "topics = [\"unused\"]\nformat = \"json\"\nevent_time = \"at\"\ndlq_topic = \"unused.dlq\"",
            &format!(
                "format = \"postgres\"\ntable = \"public.acts\"\nslot = \"{slot}\"\npublication = \"{publication}\"\nevent_time = \"at\""
            ),
        ));
        let (_dir, path) = views_file(&text);
        World { source_url, source, slot, store: fresh_database().await, text, path, _dir, group: unique("g") }
    }

    /// `freshet-ingest COMMAND` of the test's store, source and group, with
    /// no Kafka in its environment at all.
    fn command(&self, command: &str, views: &Path) -> Command {
        let mut c = Command::new(binary("freshet-ingest"));
        c.arg(command)
            .env("FRESHET_VIEWS", views)
            .env("FRESHET_DATABASE_URL", &self.store)
            .env(SOURCE_ENV, &self.source_url)
            .env_remove("FRESHET_KAFKA_BROKERS")
            .env("FRESHET_GROUP", &self.group)
            .env("RUST_LOG", "warn");
        c
    }

    fn ingest(&self) -> Process {
        Process::start(self.command("run", &self.path).stdout(Stdio::null()))
    }

    fn topic(&self) -> String {
        format!("postgres:{}", self.slot)
    }

    /// Drops the slot at the end, so the server keeps no WAL for it.
    async fn drop_slot(&self) {
        drop_slot(&self.source, &self.slot).await;
    }
}

/// Inserts `acts` in one transaction.
async fn insert(pool: &PgPool, acts: &[Act]) {
    let users: Vec<i64> = acts.iter().map(|a| a.user).collect();
    let ats: Vec<i64> = acts.iter().map(|a| a.at_ms).collect();
    let amounts: Vec<i64> = acts.iter().map(|a| a.amount).collect();
    sqlx::query("INSERT INTO acts (\"user\", at, amount, note) SELECT u, a, m, 'n' || m FROM UNNEST($1::int8[], $2::int8[], $3::int8[]) AS x(u, a, m)")
        .bind(&users)
        .bind(&ats)
        .bind(&amounts)
        .execute(pool)
        .await
        .unwrap();
}

/// Acts of users `1..=users` with unique event times from `first`.
fn acts(rng: &mut impl Rng, first: i64, n: i64, users: i64) -> Vec<Act> {
    (0..n).map(|i| Act::new(rng.random_range(1..=users), 1_700_000_000_000 + (first + i) * 7, rng.random_range(-50..1000))).collect()
}

/// The reference, computed from the source table's rows.
async fn table_reference(pool: &PgPool) -> Totals {
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as("SELECT \"user\", at, amount FROM acts").fetch_all(pool).await.unwrap();
    reference(&rows.into_iter().map(|(u, at, amount)| Act::new(u, at, amount)).collect::<Vec<_>>())
}

/// Waits until the store equals the table, then checks it stays equal.
async fn assert_converges(world: &World, users: i64) {
    assert_converges_to(world, users, table_reference(&world.source).await).await;
}

/// Waits until the store equals `expected`, then checks it stays equal.
async fn assert_converges_to(world: &World, users: i64, expected: Totals) {
    let (store, text) = (&world.store, &world.text);
    let ids: Vec<i64> = (1..=users).collect();
    let converged = eventually(Duration::from_secs(120), || async { (stored(store, text, &ids).await == expected).then_some(()) }).await;
    let got = stored(store, text, &ids).await;
    assert!(converged.is_some(), "the store never equalled the table: {} users stored, {} expected", got.len(), expected.len());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stored(store, text, &ids).await, expected, "nothing applied twice afterwards");
}

/// Waits until ingest committed the slot's initial snapshot: from then on,
/// changes reach it through the stream.
async fn wait_streaming(world: &World) {
    let pool = PgPool::connect(&world.store).await.unwrap();
    let done = eventually(Duration::from_secs(60), || async {
        let next: Option<i64> = sqlx::query_scalar("SELECT next_offset FROM ingest_offsets WHERE topic = $1")
            .bind(world.topic())
            .fetch_optional(&pool)
            .await
            .unwrap();
        next.filter(|n| *n >= 0)
    })
    .await;
    assert!(done.is_some(), "the snapshot of slot {} was never committed", world.slot);
    pool.close().await;
}

async fn drop_slot(source: &PgPool, slot: &str) {
    let gone = eventually(Duration::from_secs(30), || async {
        sqlx::query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1")
            .bind(slot)
            .execute(source)
            .await
            .ok()
    })
    .await;
    assert!(gone.is_some(), "slot {slot} could not be dropped");
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_then_stream_equals_the_table_and_drop_slot_cleans_up() {
    // A lateness of 1 s: snapshot rows stored newest first must still all
    // count (they span 14 s of event time).
    let w = World::new(|text| text.replace("allowed_lateness = \"3650d\"", "allowed_lateness = \"1s\"")).await;
    assert!(w.text.contains("allowed_lateness = \"1s\""));
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    // Rows from before the slot exists: only the snapshot can bring them.
    for chunk in (0..20).rev() {
        insert(&w.source, &acts(&mut rng, chunk * 100, 100, 30)).await;
    }
    let mut ingest = w.ingest();
    // Rows written while the slot is created and the snapshot read.
    for chunk in 20..60 {
        insert(&w.source, &acts(&mut rng, chunk * 100, 100, 30)).await;
    }
    assert_converges(&w, 30).await;
    let store = PgPool::connect(&w.store).await.unwrap();
    let checkpoint: i64 =
        sqlx::query_scalar("SELECT next_offset FROM ingest_offsets WHERE topic = $1").bind(w.topic()).fetch_one(&store).await.unwrap();
    let confirmed: i64 = eventually(Duration::from_secs(30), || async {
        let lsn: Option<i64> =
            sqlx::query_scalar("SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = $1")
                .bind(&w.slot)
                .fetch_one(&w.source)
                .await
                .unwrap();
        lsn.filter(|l| *l + 1 >= checkpoint)
    })
    .await
    .expect("the slot is confirmed up to Freshet's checkpoint");
    // The checkpoint is the next position to apply: the end of the last
    // applied transaction plus one, or the snapshot's consistent point.
    assert!(confirmed <= checkpoint, "never confirmed past what Freshet committed ({confirmed} vs {checkpoint})");
    assert!(ingest.terminate().success(), "SIGTERM stops a Kafka-free ingest cleanly");

    // drop-slot refuses while a view still reads the slot, and a slot it did not create.
    let drop_slot_cmd = |views: &Path, slot: &str| {
        let out = w.command("drop-slot", views).args(["--slot", slot]).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, stderr) = drop_slot_cmd(&w.path, &w.slot);
    assert!(!ok && stderr.contains("still reads slot"), "{stderr}");
    let foreign = unique("foreign");
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')").bind(&foreign).execute(&w.source).await.unwrap();
    let (_other_dir, other_views) = views_file(&freshet_tests::acts::views("other"));
    let (ok, stderr) = drop_slot_cmd(&other_views, &foreign);
    assert!(!ok && stderr.contains("did not create"), "{stderr}");
    drop_slot(&w.source, &foreign).await;
    // With the view removed, its slot goes, with its checkpoint.
    let (ok, stderr) = drop_slot_cmd(&other_views, &w.slot);
    assert!(ok, "{stderr}");
    let count = |sql: &'static str, pool: &PgPool, name: String| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).bind(name).fetch_one(&pool).await.unwrap() }
    };
    assert_eq!(count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", &w.source, w.slot.clone()).await, 0);
    let checkpoints = count("SELECT count(*) FROM ingest_offsets WHERE topic = $1", &store, w.topic()).await;
    assert_eq!(checkpoints, 0, "the checkpoint is forgotten with the slot");
}

/// The application: `transactions` inserts of 1 to 40 acts of users
/// `1..=users`, a few milliseconds apart.
fn application(source: &PgPool, seed: u64, transactions: usize, users: i64) -> tokio::task::JoinHandle<()> {
    let source = source.clone();
    tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut first = 0;
        for _ in 0..transactions {
            let n = rng.random_range(1..40);
            insert(&source, &acts(&mut rng, first, n, users)).await;
            first += n;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..15))).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkills_while_the_application_writes_lose_and_double_nothing() {
    let w = World::new(|text| text).await;
    let writer = application(&w.source, 2, 400, 50);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut ingest = w.ingest();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        ingest.kill();
        ingest = w.ingest();
    }
    writer.await.unwrap();
    assert_converges(&w, 50).await;
    ingest.kill();
    w.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_instance_on_the_same_slot_never_double_applies() {
    let w = World::new(|text| text).await;
    let writer = application(&w.source, 4, 300, 20);
    let mut first = w.ingest();
    let second = w.ingest();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Whichever streams, the other waits; killing the first hands over.
    first.kill();
    writer.await.unwrap();
    assert_converges(&w, 20).await;
    drop(second);
    w.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_drift_flows_on_and_a_type_change_dead_letters_only_its_rows() {
    // No `last_note`: column note is read by no feature here.
    let w = World::new(|text| {
        text.replace("[[view.feature]]\nname = \"last_note\"\naggregation = \"last\"\nfield = \"note\"\ntype = \"string\"\n", "")
    })
    .await;
    assert!(!w.text.contains("last_note"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    insert(&w.source, &acts(&mut rng, 0, 50, 10)).await;
    let ingest = w.ingest();
    wait_streaming(&w).await;
    sqlx::query("ALTER TABLE acts ADD COLUMN added jsonb DEFAULT '{\"x\": 1}'").execute(&w.source).await.unwrap();
    insert(&w.source, &acts(&mut rng, 50, 50, 10)).await;
    sqlx::query("ALTER TABLE acts DROP COLUMN note").execute(&w.source).await.unwrap();
    sqlx::query("INSERT INTO acts (\"user\", at, amount) VALUES (3, 1700100000000, 11)").execute(&w.source).await.unwrap();
    assert_converges(&w, 10).await;

    // amount becomes text: the rows written since are no longer int64
    // amounts, and only they are dead letters (with LSN, reason and raw row).
    let before_change = table_reference(&w.source).await;
    sqlx::query("ALTER TABLE acts ALTER COLUMN amount TYPE text").execute(&w.source).await.unwrap();
    sqlx::query("INSERT INTO acts (\"user\", at, amount) VALUES (4, 1700100000001, 'lots'), (5, 1700100000002, '12')")
        .execute(&w.source)
        .await
        .unwrap();
    let store = PgPool::connect(&w.store).await.unwrap();
    let letters: Vec<(i64, String, String)> = eventually(Duration::from_secs(60), || async {
        let rows: Vec<(i64, String, String)> =
            sqlx::query_as("SELECT \"offset\", error_class, error_message FROM dead_letters WHERE topic = $1 ORDER BY \"offset\"")
                .bind(w.topic())
                .fetch_all(&store)
                .await
                .unwrap();
        (rows.len() >= 2).then_some(rows)
    })
    .await
    .expect("the rows of the new type are dead-lettered");
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(letters[0].0 > 0 && letters[0].0 < letters[1].0, "each row's own LSN: {letters:?}");
    for ((_, class, message), raw) in letters.iter().zip(["\"amount\":\"lots\"", "\"amount\":\"12\""]) {
        assert_eq!(class, "freshet.decode.WrongType");
        assert!(message.contains("field \"amount\"") && message.contains(raw), "{message}");
    }
    let ids: Vec<i64> = (1..=10).collect();
    assert_eq!(stored(&w.store, &w.text, &ids).await, before_change, "the rows before the change stay applied, once");
    drop(ingest);
    w.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retracting_views_need_replica_identity_full_and_say_so() {
    // Retracting deletes is refused for max; a count-and-sum view retracts.
    let w = World::new(|text| {
        text.replace("event_time = \"at\"", "event_time = \"at\"\non_delete = \"retract\"").replace(
            "[[view.feature]]\nname = \"biggest\"\naggregation = \"max\"\nfield = \"amount\"\ntype = \"int64\"\nwindow = \"3650d\"\n",
            "",
        )
    })
    .await;
    let output = w.command("run", &w.path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("REPLICA IDENTITY FULL"), "{stderr}");

    // With it, deletes take rows back out of count and sum.
    sqlx::query("ALTER TABLE acts REPLICA IDENTITY FULL").execute(&w.source).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    insert(&w.source, &acts(&mut rng, 0, 100, 10)).await;
    let ingest = w.ingest();
    wait_streaming(&w).await;
    // Streamed: rows inserted, then deleted (some of them snapshot rows).
    insert(&w.source, &acts(&mut rng, 100, 100, 10)).await;
    sqlx::query("DELETE FROM acts WHERE id % 3 = 0").execute(&w.source).await.unwrap();
    let expected = table_reference(&w.source).await;
    let expected: Vec<(i64, i64, i64)> = expected.iter().map(|(u, (n, total, _, _))| (*u, *n, *total)).collect();
    let ids: Vec<i64> = (1..=10).collect();
    let converged =
        eventually(Duration::from_secs(60), || async { (stored_counts(&w.store, &w.text, &ids).await == expected).then_some(()) }).await;
    let got = stored_counts(&w.store, &w.text, &ids).await;
    assert!(converged.is_some(), "count and sum equal the table after deletes: {got:?} vs {expected:?}");
    drop(ingest);
    w.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncate_retracts_nothing_as_through_debezium_and_streaming_goes_on() {
    let w = World::new(|text| text).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut written = acts(&mut rng, 0, 100, 10);
    insert(&w.source, &written).await;
    let mut ingest = w.ingest();
    wait_streaming(&w).await;
    for first in [100, 200] {
        let more = acts(&mut rng, first, 100, 10);
        insert(&w.source, &more).await;
        written.extend(more);
        if first == 100 {
            // Snapshot rows and streamed rows go from the table; their events stay.
            sqlx::query("TRUNCATE acts").execute(&w.source).await.unwrap();
        }
    }
    assert_converges_to(&w, 10, reference(&written)).await;
    assert!(ingest.child.try_wait().unwrap().is_none(), "ingest streams on after a TRUNCATE");
    ingest.kill();
    w.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn get_freshness_reports_the_slots_retained_wal_and_confirmed_lag() {
    let w = World::new(|text| text).await;
    let mut ingest = w.ingest();
    wait_streaming(&w).await;
    ingest.kill();
    // With ingest gone, what the application writes stays unconfirmed.
    let lsn = || async { sqlx::query_scalar::<_, i64>("SELECT (pg_current_wal_lsn() - '0/0')::int8").fetch_one(&w.source).await.unwrap() };
    let before = lsn().await;
    insert(&w.source, &acts(&mut rand::rngs::StdRng::seed_from_u64(8), 0, 500, 10)).await;
    let written = lsn().await - before;
    let world = &w;
    let freshness = |extra: Vec<String>| async move {
        let mut extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        extra.extend(["--group", &world.group]);
        let (_server, address) = server(&world.path, &world.store, &extra);
        let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
        let response = client.get_freshness(GetFreshnessRequest { views: vec![] }).await.unwrap().into_inner();
        let partition = response.views[0].partitions.iter().find(|p| p.topic == world.topic()).cloned();
        (partition.expect("the slot's pseudo-partition is reported"), response.replication_slots)
    };
    let (partition, slots) = freshness(vec!["--source-database-url".into(), w.source_url.clone()]).await;
    let lag = partition.confirmed_lag_bytes.expect("confirmed-flush lag of the view's slot");
    let retained = partition.retained_wal_bytes.expect("retained WAL of the view's slot");
    assert!(lag >= written, "the {written} bytes of WAL written since ingest died are unconfirmed: {partition:?}");
    assert!(retained >= lag, "the slot keeps at least what it has not confirmed: {partition:?}");
    let listed = slots.iter().find(|s| s.name == w.slot).expect("the slot is listed too");
    assert_eq!((listed.lag_bytes, listed.retained_bytes), (lag, retained), "one reading of pg_replication_slots: {listed:?}");
    // A server that does not know the source database cannot say.
    let (partition, _) = freshness(vec![]).await;
    assert_eq!((partition.retained_wal_bytes, partition.confirmed_lag_bytes), (None, None), "{partition:?}");
    w.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_outside_the_publication_is_refused_by_name() {
    let w = World::new(|text| text.replace("table = \"public.acts\"", "table = \"public.elsewhere\"")).await;
    sqlx::query("CREATE TABLE elsewhere (\"user\" int8, at int8)").execute(&w.source).await.unwrap();
    let output = w.command("run", &w.path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("does not publish public.elsewhere") && stderr.contains("ALTER PUBLICATION"), "{stderr}");
}

/// (user, n, total) as stored, for a view without `biggest`.
async fn stored_counts(url: &str, text: &str, users: &[i64]) -> Vec<(i64, i64, i64)> {
    use freshet_store::state::{Reading, Scalar};
    let catalog = freshet_store::view::Catalog::parse(text, "test").unwrap();
    let view = &catalog.views[0];
    let pool = PgPool::connect(url).await.unwrap();
    let keys: Vec<String> = users.iter().map(i64::to_string).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let states = freshet_store::entities::read(&pool, &["acts"], &refs).await.unwrap();
    pool.close().await;
    let now = chrono::Utc::now().timestamp_millis();
    let int = |r: Reading| match r {
        Reading::Value { value: Scalar::Int(i), .. } => i,
        Reading::Value { value: Scalar::Null, .. } => 0,
        other => panic!("expected an int, got {other:?}"),
    };
    let mut counts: Vec<(i64, i64, i64)> = states
        .into_iter()
        .map(|((_, entity), s)| {
            (entity.parse().unwrap(), int(s.read(view.feature("n").unwrap(), now)), int(s.read(view.feature("total").unwrap(), now)))
        })
        .filter(|(_, n, _)| *n != 0)
        .collect();
    counts.sort_unstable();
    counts
}

/// At the default level (RUST_LOG unset), an ingest streaming from a slot
/// says so: a log filter combined of two once silenced every line it wrote.
#[tokio::test]
async fn logs_at_the_default_level() {
    use std::io::BufRead;
    let world = World::new(|text| text).await;
    let mut command = world.command("run", &world.path);
    command.env_remove("RUST_LOG").stdout(Stdio::piped());
    let mut ingest = Process::start(&mut command);
    let stdout = ingest.child.stdout.take().unwrap();
    let streaming = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).any(|line| line.contains("postgres source streaming"))
    });
    let logged = tokio::time::timeout(Duration::from_secs(60), streaming).await.expect("a log line within 60 s").unwrap();
    assert!(logged, "ingest exited without logging that it streams");
    drop(ingest);
    world.drop_slot().await;
}
