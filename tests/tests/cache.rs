//! The Redis cache: used when up, bypassed when down (no client errors),
//! used again when back, and invalidated by commits.

use std::time::Duration;

use freshet_proto::v1::{EntityKey, GetFeaturesRequest, entity_key::Key, feature_service_client::FeatureServiceClient, value::Kind};
use freshet_store::{
    entities,
    state::{Direction, EntityState, Event, Scalar},
    view::Catalog,
};
use freshet_tests::{eventually, fresh_database, reference_views, server, service_env, services, tempfile_dir, unique};

/// Sets user 1's `last_event_type`, announcing the change like ingest does
/// (`announce`) or silently (to tell a cached answer from a fresh one).
async fn write(url: &str, event_type: &str, announce: bool) {
    let catalog = Catalog::load(&reference_views()).unwrap();
    let view = catalog.view("user_activity").unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let mut state = EntityState::default();
    let fields = [("event_type".to_string(), Scalar::Str(event_type.into()))].into_iter().collect();
    state.apply(view, &Event { entity: "1".into(), at_ms: now, fields }, Direction::Add, true);
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let key = ("user_activity".to_string(), "1".to_string());
    entities::store(&mut tx, &[(key.clone(), state)]).await.unwrap();
    if announce {
        entities::notify_changes(&mut tx, &[key]).await.unwrap();
    }
    tx.commit().await.unwrap();
}

async fn last_event_type(client: &mut FeatureServiceClient<tonic::transport::Channel>) -> String {
    let request = GetFeaturesRequest {
        features: vec!["user_activity:last_event_type".into()],
        entities: vec![EntityKey { key: Some(Key::Int64Key(1)) }],
        max_age: None,
    };
    let response = client.get_features(request).await.expect("no client error, whatever Redis does").into_inner();
    match response.results[0].values[0].value.clone().and_then(|v| v.kind) {
        Some(Kind::StringValue(s)) => s,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_is_used_bypassed_when_redis_is_down_and_invalidated_by_commits() {
    let dir = tempfile_dir::Dir::new();
    let dir_arg = dir.path.to_str().unwrap();
    services(&["start", "--only", "redis", dir_arg]);
    let redis_url = service_env(&dir.path, "FRESHET_REDIS_URL");
    let url = fresh_database().await;
    write(&url, "first", false).await;
    let prefix = unique("cache");
    let (_server, address) =
        server(&reference_views(), &url, &["--redis-url", &redis_url, "--cache-prefix", &prefix, "--cache-ttl-ms", "600000"]);
    let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();

    assert_eq!(last_event_type(&mut client).await, "first");
    // The answer is now cached: a change nobody announced is not seen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    write(&url, "unannounced", false).await;
    assert_eq!(last_event_type(&mut client).await, "first", "served from the cache");

    // A committed, announced change is visible once invalidated.
    write(&url, "second", true).await;
    eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        async move { (last_event_type(&mut client).await == "second").then_some(()) }
    })
    .await
    .expect("a committed change becomes visible after invalidation");

    // Redis down: answers keep coming, straight from Postgres.
    services(&["redis-stop", dir_arg]);
    write(&url, "while-down", false).await;
    for _ in 0..5 {
        assert_eq!(last_event_type(&mut client).await, "while-down");
    }

    // Redis back: the cache is used again (an unannounced change is hidden
    // once the entry is cached).
    services(&["redis-start", dir_arg]);
    eventually(Duration::from_secs(20), || {
        let mut client = client.clone();
        let url = url.clone();
        async move {
            let seen = last_event_type(&mut client).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            write(&url, &format!("probe-{seen}"), false).await;
            (last_event_type(&mut client).await == seen).then_some(())
        }
    })
    .await
    .expect("the cache is used again once Redis is back");
    services(&["stop", dir_arg]);
}
