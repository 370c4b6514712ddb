//! The reference pipeline end to end: rows written to Postgres flow through
//! Debezium on Kafka Connect and Kafka into Freshet and come out of gRPC as
//! the right features, through a Connect restart, an ingest SIGKILL, a column
//! added upstream, and updates and deletes handled per the view's policy.

use std::{collections::BTreeMap, time::Duration};

use freshet_proto::v1::{
    EntityKey, FeatureStatus, GetFeaturesRequest, GetFreshnessRequest, entity_key::Key, feature_service_client::FeatureServiceClient,
    value::Kind,
};
use freshet_tests::{env, eventually, fresh_database, ingest, reference_views, server, services, unique};
use rand::{Rng, SeedableRng};
use sqlx::PgPool;

const USERS: i64 = 20;

/// What the test inserted: per event id, (user, event time in ms, type as inserted).
type Inserted = BTreeMap<i64, (i64, i64, String)>;

async fn insert_events(app: &PgPool, rng: &mut impl Rng, n: usize, inserted: &mut Inserted, with_note: bool) {
    for _ in 0..n {
        let user = rng.random_range(1..=USERS);
        // Event time is about now, as an application writes it (the view
        // allows one minute of lateness), and distinct per row.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        let at = now.max(inserted.values().map(|(_, at, _)| at + 1).max().unwrap_or(0));
        let kind = ["view", "click", "add_to_cart", "purchase"][rng.random_range(0..4)].to_string();
        let id: i64 = if with_note {
            sqlx::query_scalar("INSERT INTO user_events (user_id, event_type, occurred_at, note) VALUES ($1, $2, to_timestamp($3 / 1000.0), 'added later') RETURNING event_id")
        } else {
            sqlx::query_scalar("INSERT INTO user_events (user_id, event_type, occurred_at) VALUES ($1, $2, to_timestamp($3 / 1000.0)) RETURNING event_id")
        }
        .bind(user)
        .bind(&kind)
        .bind(at as f64)
        .fetch_one(app)
        .await
        .unwrap();
        inserted.insert(id, (user, at, kind));
    }
}

/// Per user: (events in the last hour, type of the newest event), computed
/// from the source and the view's policies: deletes retract from windows,
/// but a `last` value keeps the newest event ever seen; updates are ignored,
/// so the type is the one inserted.
async fn reference(app: &PgPool, inserted: &Inserted) -> BTreeMap<i64, (i64, String)> {
    let remaining: Vec<i64> = sqlx::query_scalar("SELECT event_id FROM user_events").fetch_all(app).await.unwrap();
    let mut counts: BTreeMap<i64, i64> = BTreeMap::new();
    for id in remaining {
        *counts.entry(inserted[&id].0).or_default() += 1;
    }
    let mut newest: BTreeMap<i64, (i64, String)> = BTreeMap::new();
    for (user, at, kind) in inserted.values() {
        let entry = newest.entry(*user).or_insert((i64::MIN, String::new()));
        if *at > entry.0 {
            *entry = (*at, kind.clone());
        }
    }
    counts.into_iter().map(|(user, n)| (user, (n, newest[&user].1.clone()))).collect()
}

async fn served(client: &mut FeatureServiceClient<tonic::transport::Channel>) -> BTreeMap<i64, (i64, String)> {
    let response = client
        .get_features(GetFeaturesRequest {
            features: vec!["user_activity:events_1h".into(), "user_activity:last_event_type".into()],
            entities: (1..=USERS).map(|u| EntityKey { key: Some(Key::Int64Key(u)) }).collect(),
            max_age: None,
        })
        .await
        .unwrap()
        .into_inner();
    (1..=USERS)
        .zip(response.results)
        .filter(|(_, row)| row.values[0].status() == FeatureStatus::Present)
        .map(|(user, row)| {
            let count = match row.values[0].value.clone().and_then(|v| v.kind) {
                Some(Kind::Int64Value(n)) => n,
                other => panic!("{other:?}"),
            };
            let kind = match row.values[1].value.clone().and_then(|v| v.kind) {
                Some(Kind::StringValue(s)) => s,
                _ => String::new(),
            };
            (user, (count, kind))
        })
        .filter(|(_, (count, _))| *count > 0)
        .collect()
}

async fn converges(client: &FeatureServiceClient<tonic::transport::Channel>, app: &PgPool, inserted: &Inserted, what: &str) {
    let expected = reference(app, inserted).await;
    let ok = eventually(Duration::from_secs(90), || {
        let mut client = client.clone();
        let expected = expected.clone();
        async move { (served(&mut client).await == expected).then_some(()) }
    })
    .await;
    let last = served(&mut client.clone()).await;
    assert!(ok.is_some(), "{what}: served {last:?}\nexpected {expected:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_written_to_postgres_are_served_exactly_through_debezium() {
    let dir = env("FRESHET_SERVICES_DIR");
    services(&["connector", &dir]);
    let app_url = format!("{}/app", env("FRESHET_DATABASE_URL").rsplit_once('/').unwrap().0);
    let app = PgPool::connect(&app_url).await.unwrap();
    // The source is shared by this test alone; start from empty tables.
    sqlx::query("DELETE FROM user_events").execute(&app).await.unwrap();

    let url = fresh_database().await;
    let group = unique("g");
    let views = reference_views();
    let mut ingest_process = ingest(&views, &url, &group, "pipeline");
    let metrics_port = freshet_tests::free_port();
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let (_server, address) = server(&views, &url, &["--source-database-url", &app_url, "--metrics-listen", &metrics_listen]);
    let client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut inserted = Inserted::new();

    insert_events(&app, &mut rng, 150, &mut inserted, false).await;
    // Kafka Connect restarts mid-stream; rows written meanwhile still flow.
    services(&["connect-stop", &dir]);
    insert_events(&app, &mut rng, 100, &mut inserted, false).await;
    services(&["connect-start", &dir]);
    insert_events(&app, &mut rng, 100, &mut inserted, false).await;
    // Ingest dies without warning and comes back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ingest_process.kill();
    insert_events(&app, &mut rng, 100, &mut inserted, false).await;
    ingest_process = ingest(&views, &url, &group, "pipeline");
    converges(&client, &app, &inserted, "after a Connect restart and an ingest SIGKILL").await;

    // A nullable column added upstream flows through without a restart.
    sqlx::query("ALTER TABLE user_events ADD COLUMN IF NOT EXISTS note text NULL").execute(&app).await.unwrap();
    insert_events(&app, &mut rng, 100, &mut inserted, true).await;
    converges(&client, &app, &inserted, "after ADD COLUMN").await;

    // Deletes retract; updates are ignored (the view's policies).
    let victims: Vec<i64> = inserted.keys().copied().step_by(7).collect();
    sqlx::query("DELETE FROM user_events WHERE event_id = ANY($1)").bind(&victims).execute(&app).await.unwrap();
    sqlx::query("UPDATE user_events SET event_type = 'edited' WHERE event_id % 5 = 0").execute(&app).await.unwrap();
    converges(&client, &app, &inserted, "after deletes and updates").await;

    // The CDC slot is reported with how far behind it is.
    let freshness = client.clone().get_freshness(GetFreshnessRequest { views: vec![] }).await.unwrap().into_inner();
    let slot = freshness.replication_slots.iter().find(|s| s.name == "freshet_slot").expect("Debezium's slot is reported");
    assert!(slot.active, "{slot:?}");
    assert!(slot.lag_bytes >= 0 && slot.lag_bytes < 64 << 20, "{slot:?}");
    assert!(slot.retained_bytes >= slot.lag_bytes, "{slot:?}");
    // And as metrics, refreshed every 5 s.
    let metrics = eventually(Duration::from_secs(15), || async {
        let m = freshet_tests::scrape(metrics_port).await;
        (m.get("freshet_source_replication_slot_active{slot=\"freshet_slot\"}") == Some(&1.0)).then_some(m)
    })
    .await
    .expect("the slot is reported active in the metrics");
    assert!(metrics.contains_key("freshet_source_replication_slot_lag_bytes{slot=\"freshet_slot\"}"));
    assert!(ingest_process.terminate().success());
}
