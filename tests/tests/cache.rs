//! The Redis cache: used when up, bypassed when down (no client errors),
//! used again when back, and invalidated by commits; what it holds is
//! served for a while when Postgres is down.

use std::time::Duration;

use freshet_proto::v1::{
    EntityKey, FeatureStatus, GetFeaturesRequest, GetFeaturesResponse, GetFreshnessRequest, entity_key::Key,
    feature_service_client::FeatureServiceClient, value::Kind,
};
use freshet_store::{
    entities,
    state::{Direction, EntityState, Event, Scalar},
    view::Catalog,
};
use freshet_tests::{
    eventually, free_port, fresh_database, fresh_database_at, reference_views, scrape, server, service_env, services, tempfile_dir, unique,
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

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

type Client = FeatureServiceClient<tonic::transport::Channel>;

/// User `user`'s `last_event_type`.
async fn ask(client: &mut Client, user: i64) -> Result<GetFeaturesResponse, tonic::Status> {
    let request = GetFeaturesRequest {
        features: vec!["user_activity:last_event_type".into()],
        entities: vec![EntityKey { key: Some(Key::Int64Key(user)) }],
        max_age: None,
    };
    client.get_features(request).await.map(|r| r.into_inner())
}

fn value(response: &GetFeaturesResponse) -> String {
    match response.results[0].values[0].value.clone().and_then(|v| v.kind) {
        Some(Kind::StringValue(s)) => s,
        other => panic!("unexpected {other:?}"),
    }
}

async fn last_event_type(client: &mut Client) -> String {
    value(&ask(client, 1).await.expect("no client error, whatever Redis does"))
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

async fn health(address: std::net::SocketAddr) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    let mut client = HealthClient::new(channel);
    let request = HealthCheckRequest { service: "freshet.v1.FeatureService".into() };
    client.check(request).await.unwrap().into_inner().status()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_outage_serves_what_the_cache_holds_for_a_bounded_time_and_fails_fast_otherwise() {
    // A Postgres of this test's own, to stop without disturbing others.
    let dir = tempfile_dir::Dir::new();
    let dir_arg = dir.path.to_str().unwrap();
    services(&["start", "--only", "postgres,redis", dir_arg]);
    let url = fresh_database_at(&service_env(&dir.path, "FRESHET_DATABASE_URL")).await;
    let redis_url = service_env(&dir.path, "FRESHET_REDIS_URL");
    write(&url, "cached", false).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let prefix = unique("outage");
    // Entries are refreshed after 1 s, and kept 15 s longer for outages.
    let cached = ["--redis-url", &redis_url, "--cache-prefix", &prefix, "--cache-ttl-ms", "1000", "--cache-stale-ms", "15000"];
    let (_server, address) = server(&reference_views(), &url, &[&cached[..], &["--metrics-listen", &listen]].concat());
    let (_bare, bare_address) = server(&reference_views(), &url, &[]);
    let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let mut bare = FeatureServiceClient::connect(format!("http://{bare_address}")).await.unwrap();

    let answer = ask(&mut client, 1).await.unwrap();
    assert_eq!((value(&answer), answer.stale_cache_age), ("cached".to_string(), None), "not marked in normal operation");
    eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            ask(&mut client, 1).await.unwrap();
            (scrape(port).await.get("freshet_server_cache_reads_total{outcome=\"hit\"}") > Some(&0.0)).then_some(())
        }
    })
    .await
    .expect("user 1 is cached");

    services(&["pg-stop", dir_arg]);
    // What the cache holds is served past its TTL, marked as such.
    let stale = eventually(Duration::from_secs(20), || {
        let mut client = client.clone();
        async move { ask(&mut client, 1).await.ok().filter(|r| r.stale_cache_age.is_some()) }
    })
    .await
    .expect("the cached row is served, marked stale, while Postgres is down");
    assert_eq!(value(&stale), "cached");
    assert!(stale.stale_cache_age.unwrap().seconds >= 1, "older than the TTL: {:?}", stale.stale_cache_age);
    // A row it does not hold fails at once: UNAVAILABLE, not a deadline
    // waited out (once the outage is noticed, which takes a probe).
    eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        async move { ask(&mut client, 2).await.err().filter(|s| s.code() == Code::Unavailable) }
    })
    .await
    .expect("an uncached row is UNAVAILABLE");
    for _ in 0..5 {
        assert_eq!(ask(&mut client, 2).await.unwrap_err().code(), Code::Unavailable);
        assert_eq!(client.get_freshness(GetFreshnessRequest { views: vec![] }).await.unwrap_err().code(), Code::Unavailable);
    }
    assert_eq!(health(address).await, ServingStatus::Serving, "the cache can still answer");
    // A server without a cache can answer nothing.
    eventually(Duration::from_secs(10), || async { (health(bare_address).await == ServingStatus::NotServing).then_some(()) })
        .await
        .expect("without a cache, NOT_SERVING");
    assert_eq!(ask(&mut bare, 1).await.unwrap_err().code(), Code::Unavailable);

    // The stale window is bounded: then NOT_SERVING, and nothing is served.
    eventually(Duration::from_secs(40), || async { (health(address).await == ServingStatus::NotServing).then_some(()) })
        .await
        .expect("NOT_SERVING once the stale window has passed");
    eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        async move { ask(&mut client, 1).await.err().filter(|s| s.code() == Code::Unavailable) }
    })
    .await
    .expect("stale entries are not served past their window");

    services(&["pg-start", dir_arg]);
    eventually(Duration::from_secs(30), || async {
        (health(address).await == ServingStatus::Serving && health(bare_address).await == ServingStatus::Serving).then_some(())
    })
    .await
    .expect("SERVING again once Postgres is back");
    let back = eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        async move { ask(&mut client, 1).await.ok() }
    })
    .await
    .unwrap();
    assert_eq!((value(&back), back.stale_cache_age), ("cached".to_string(), None));
    assert_eq!(ask(&mut client, 2).await.unwrap().results[0].values[0].status(), FeatureStatus::NotFound);
    assert_eq!(value(&ask(&mut bare, 1).await.unwrap()), "cached");
    services(&["stop", dir_arg]);
}
