//! The caches: Redis, used when up, bypassed when down (no client errors),
//! used again when back, and invalidated by commits; the hot tier in the
//! server's memory, refreshed by commits, bounded by its TTL and its bytes;
//! what either holds is served for a while when Postgres is down.

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
    Process, event, eventually, free_port, fresh_database, fresh_database_at, reference_views, scrape, server, service_env, services,
    store_events, tempfile_dir, unique,
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

/// Whether `client` serves `expected` as user 1's value within `limit`.
async fn comes_to_serve(client: &Client, expected: &str, limit: Duration) -> bool {
    let seen = eventually(limit, || {
        let mut client = client.clone();
        async move { (last_event_type(&mut client).await == expected).then_some(()) }
    });
    seen.await.is_some()
}

/// A Redis of the test's own (to stop or slow down), and a database where
/// user 1's value is "first".
async fn own_redis() -> (tempfile_dir::Dir, String, String) {
    let dir = tempfile_dir::Dir::new();
    services(&["start", "--only", "redis", dir.path.to_str().unwrap()]);
    let redis_url = service_env(&dir.path, "FRESHET_REDIS_URL");
    let url = fresh_database().await;
    write(&url, "first", false).await;
    (dir, redis_url, url)
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_is_used_bypassed_when_redis_is_down_and_invalidated_by_commits() {
    let (dir, redis_url, url) = own_redis().await;
    let dir_arg = dir.path.to_str().unwrap();
    let prefix = unique("cache");
    // Redis alone: the hot tier (tested below) would answer before it.
    let redis_only = ["--redis-url", &redis_url, "--cache-prefix", &prefix, "--cache-ttl-ms", "600000", "--hot-cache-bytes", "0"];
    let (_server, address) = server(&reference_views(), &url, &redis_only);
    let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();

    assert_eq!(last_event_type(&mut client).await, "first");
    // The answer is now cached: a change nobody announced is not seen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    write(&url, "unannounced", false).await;
    assert_eq!(last_event_type(&mut client).await, "first", "served from the cache");

    // A committed, announced change is visible once invalidated.
    write(&url, "second", true).await;
    assert!(comes_to_serve(&client, "second", Duration::from_secs(10)).await, "a committed change becomes visible after invalidation");

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

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_redis_costs_the_calls_it_delays_not_the_cache() {
    let (dir, redis_url, url) = own_redis().await;
    let dir_arg = dir.path.to_str().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let prefix = unique("slow");
    let redis_only = ["--redis-url", &redis_url, "--cache-prefix", &prefix, "--hot-cache-bytes", "0", "--metrics-listen", &listen];
    let (_server, address) = server(&reference_views(), &url, &redis_only);
    let client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let hits = || metric(port, "freshet_server_cache_reads_total{outcome=\"hit\"}");
    let answered_by_redis = || {
        let mut client = client.clone();
        async move {
            let before = hits().await;
            assert_eq!(last_event_type(&mut client).await, "first");
            (hits().await > before).then_some(())
        }
    };
    eventually(Duration::from_secs(10), answered_by_redis).await.expect("user 1 is cached");

    // Redis busy for 3 s (a script that spins: other clients wait, nothing
    // fails), well past the 1 s deadline of calls: those it delays read
    // Postgres instead, and answer in time.
    let spin = "local s = tonumber(redis.call('TIME')[1]) while tonumber(redis.call('TIME')[1]) - s < 3 do end return 1";
    let mut busy: Option<std::process::Child> = None;
    eventually(Duration::from_secs(30), || {
        if busy.as_mut().is_none_or(|b| b.try_wait().unwrap().is_some()) {
            let redis_cli = std::process::Command::new("redis-cli")
                .args(["-u", &redis_url, "EVAL", spin, "0"])
                .stdout(std::process::Stdio::null())
                .spawn();
            busy = Some(redis_cli.expect("redis-cli comes with redis-server"));
        }
        let mut client = client.clone();
        async move {
            let before = metric(port, "freshet_server_cache_reads_total{outcome=\"bypassed\"}").await;
            assert_eq!(last_event_type(&mut client).await, "first", "answered, within its deadline");
            (metric(port, "freshet_server_cache_reads_total{outcome=\"bypassed\"}").await > before).then_some(())
        }
    })
    .await
    .expect("a call Redis delays past its budget is answered from Postgres");
    // Slowness is not failure: the cache was never switched off, and once
    // Redis is free, calls use it again.
    assert_eq!(metric(port, "freshet_server_cache_degraded").await, 0.0);
    busy.unwrap().wait().unwrap();
    eventually(Duration::from_secs(10), answered_by_redis).await.expect("Redis answers calls again");
    assert_eq!(metric(port, "freshet_server_cache_degraded").await, 0.0);
    services(&["stop", dir_arg]);
}

async fn health(address: std::net::SocketAddr) -> ServingStatus {
    health_of(address, "freshet.v1.FeatureService").await
}

/// The health status of `service` (`freshet.store`: whether Postgres answers).
async fn health_of(address: std::net::SocketAddr, service: &str) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    let mut client = HealthClient::new(channel);
    client.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status()
}

/// A metric of the server whose metrics are on `port` (0 if absent).
async fn metric(port: u16, series: &str) -> f64 {
    scrape(port).await.get(series).copied().unwrap_or(0.0)
}

/// GetFeatures calls answered from memory alone.
async fn hot_reads(port: u16) -> f64 {
    metric(port, "freshet_server_cache_reads_total{outcome=\"hot\"}").await
}

/// A server with the hot tier (and no Redis) once it follows commits and
/// holds user 1 in memory: a call for it was answered from memory.
async fn hot_server(url: &str, extra: &[&str]) -> (Process, Client, std::net::SocketAddr, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (process, address) = server(&reference_views(), url, &[&["--metrics-listen", &listen][..], extra].concat());
    let client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    eventually(Duration::from_secs(30), || async { (metric(port, "freshet_server_commit_listener_up").await == 1.0).then_some(()) })
        .await
        .expect("the server follows commit notifications");
    eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            let before = hot_reads(port).await;
            ask(&mut client, 1).await.unwrap();
            (hot_reads(port).await > before).then_some(())
        }
    })
    .await
    .expect("user 1 is held in memory");
    (process, client, address, port)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_is_served_from_memory_right_after_its_notification() {
    let url = fresh_database().await;
    write(&url, "first", false).await;
    let (_server, mut client, _, port) = hot_server(&url, &["--cache-ttl-ms", "600000"]).await;

    // An unannounced change is not seen: the answer comes from memory.
    write(&url, "unannounced", false).await;
    let before = hot_reads(port).await;
    assert_eq!(last_event_type(&mut client).await, "first");
    assert_eq!(hot_reads(port).await, before + 1.0, "answered from memory");

    // A commit's notification has the row read again into memory...
    write(&url, "second", true).await;
    eventually(Duration::from_secs(10), || async {
        (metric(port, "freshet_server_hot_cache_refreshed_rows_total").await >= 1.0).then_some(())
    })
    .await
    .expect("the notified row is refreshed in memory");
    // ...so the next call is answered from memory, with the new value.
    let before = hot_reads(port).await;
    assert_eq!(last_event_type(&mut client).await, "second");
    assert_eq!(hot_reads(port).await, before + 1.0, "the new value came from the hot tier");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_notification_is_bounded_by_the_ttl() {
    let url = fresh_database().await;
    write(&url, "first", false).await;
    let (_long, mut long, _, long_port) = hot_server(&url, &["--cache-ttl-ms", "600000"]).await;
    let (_short, short, _, _) = hot_server(&url, &["--cache-ttl-ms", "1000"]).await;

    // A change whose notification is lost: the short TTL brings it...
    write(&url, "unannounced", false).await;
    assert!(comes_to_serve(&short, "unannounced", Duration::from_secs(20)).await, "past its TTL, a row is read again");
    // ...and nothing else does: the 10-minute TTL still answers from memory.
    let before = hot_reads(long_port).await;
    assert_eq!(last_event_type(&mut long).await, "first");
    assert_eq!(hot_reads(long_port).await, before + 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hot_tier_stays_within_its_bytes_with_more_entities_than_fit() {
    let url = fresh_database().await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let users = 2000;
    let events = (0..users).map(|u| event(u, now - 1000, &[("event_type", Scalar::Str(format!("u{u}")))])).collect();
    store_events(&url, "user_activity", events).await;
    let bound = 200_000.0;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (_server, address) = server(&reference_views(), &url, &["--metrics-listen", &listen, "--hot-cache-bytes", "200000"]);
    let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    assert_eq!(metric(port, "freshet_server_hot_cache_capacity_bytes").await, bound);
    // Every user read twice, 100 per call: the answers stay right whatever
    // is evicted, and the tier never holds more than its bound.
    for round in 0..2 {
        for first in (0..users).step_by(100) {
            let request = GetFeaturesRequest {
                features: vec!["user_activity:last_event_type".into()],
                entities: (first..first + 100).map(|u| EntityKey { key: Some(Key::Int64Key(u)) }).collect(),
                max_age: None,
            };
            let answer = client.get_features(request).await.unwrap().into_inner();
            for (u, row) in (first..).zip(&answer.results) {
                assert_eq!(row.values[0].value.clone().and_then(|v| v.kind), Some(Kind::StringValue(format!("u{u}"))), "round {round}");
            }
            let held = metric(port, "freshet_server_hot_cache_bytes").await;
            assert!(held <= bound, "{held} bytes held, bound {bound}");
        }
    }
    let entries = eventually(Duration::from_secs(10), || async {
        let entries = metric(port, "freshet_server_hot_cache_entries").await;
        (entries > 0.0).then_some(entries)
    })
    .await
    .expect("the tier holds what fits");
    assert!(entries < users as f64, "{entries} of {users} users held: not all fit");
    assert!(metric(port, "freshet_server_hot_cache_bytes").await <= bound);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_outage_serves_what_the_caches_hold_for_a_bounded_time_and_fails_fast_otherwise() {
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
    let window = ["--cache-ttl-ms", "1000", "--cache-stale-ms", "15000"];
    // Three servers: Redis alone, the hot tier alone, and neither.
    let redis = ["--redis-url", &redis_url, "--cache-prefix", &prefix, "--hot-cache-bytes", "0", "--metrics-listen", &listen];
    let (_server, address) = server(&reference_views(), &url, &[&window[..], &redis].concat());
    let (_memory, mut memory, memory_address, memory_port) = hot_server(&url, &window).await;
    let (_bare, bare_address) = server(&reference_views(), &url, &["--hot-cache-bytes", "0"]);
    let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let mut bare = FeatureServiceClient::connect(format!("http://{bare_address}")).await.unwrap();

    let answer = ask(&mut client, 1).await.unwrap();
    assert_eq!((value(&answer), answer.stale_cache_age), ("cached".to_string(), None), "not marked in normal operation");
    eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            ask(&mut client, 1).await.unwrap();
            (metric(port, "freshet_server_cache_reads_total{outcome=\"hit\"}").await > 0.0).then_some(())
        }
    })
    .await
    .expect("user 1 is cached");
    assert_eq!(health_of(memory_address, "freshet.store").await, ServingStatus::Serving);

    services(&["pg-stop", dir_arg]);
    // What the caches hold is served past its TTL, marked as such: from
    // Redis, and from memory (that server has nothing else).
    for (client, what) in [(&client, "Redis"), (&memory, "memory")] {
        let stale = eventually(Duration::from_secs(20), || {
            let mut client = client.clone();
            async move { ask(&mut client, 1).await.ok().filter(|r| r.stale_cache_age.is_some()) }
        })
        .await
        .unwrap_or_else(|| panic!("the row held in {what} is served, marked stale, while Postgres is down"));
        assert_eq!(value(&stale), "cached");
        assert!(stale.stale_cache_age.unwrap().seconds >= 1, "older than the TTL: {:?}", stale.stale_cache_age);
    }
    assert!(metric(memory_port, "freshet_server_cache_reads_total{outcome=\"stale\"}").await >= 1.0);
    // A row they do not hold fails at once: UNAVAILABLE, not a deadline
    // waited out (once the outage is noticed, which takes a probe).
    for client in [&client, &memory] {
        eventually(Duration::from_secs(10), || {
            let mut client = client.clone();
            async move { ask(&mut client, 2).await.err().filter(|s| s.code() == Code::Unavailable) }
        })
        .await
        .expect("an uncached row is UNAVAILABLE");
    }
    for _ in 0..5 {
        assert_eq!(ask(&mut client, 2).await.unwrap_err().code(), Code::Unavailable);
        assert_eq!(ask(&mut memory, 2).await.unwrap_err().code(), Code::Unavailable);
        assert_eq!(client.get_freshness(GetFreshnessRequest { views: vec![] }).await.unwrap_err().code(), Code::Unavailable);
    }
    // Health: serving (the caches can still answer), and saying that the
    // store is not.
    for address in [address, memory_address] {
        assert_eq!(health(address).await, ServingStatus::Serving, "the caches can still answer");
        assert_eq!(health_of(address, "freshet.store").await, ServingStatus::NotServing, "Postgres is down");
    }
    assert_eq!(metric(memory_port, "freshet_server_store_up").await, 0.0);
    // A server without a cache can answer nothing.
    eventually(Duration::from_secs(10), || async { (health(bare_address).await == ServingStatus::NotServing).then_some(()) })
        .await
        .expect("without a cache, NOT_SERVING");
    assert_eq!(ask(&mut bare, 1).await.unwrap_err().code(), Code::Unavailable);

    // The stale window is bounded: then NOT_SERVING, and nothing is served.
    for (client, address) in [(&client, address), (&memory, memory_address)] {
        eventually(Duration::from_secs(40), || async { (health(address).await == ServingStatus::NotServing).then_some(()) })
            .await
            .expect("NOT_SERVING once the stale window has passed");
        eventually(Duration::from_secs(10), || {
            let mut client = client.clone();
            async move { ask(&mut client, 1).await.err().filter(|s| s.code() == Code::Unavailable) }
        })
        .await
        .expect("stale entries are not served past their window");
    }

    services(&["pg-start", dir_arg]);
    eventually(Duration::from_secs(30), || async {
        let all = [address, memory_address, bare_address];
        let mut serving = true;
        for address in all {
            serving &=
                health(address).await == ServingStatus::Serving && health_of(address, "freshet.store").await == ServingStatus::Serving;
        }
        serving.then_some(())
    })
    .await
    .expect("SERVING again once Postgres is back");
    for client in [&client, &memory] {
        let back = eventually(Duration::from_secs(10), || {
            let mut client = client.clone();
            async move { ask(&mut client, 1).await.ok() }
        })
        .await
        .unwrap();
        assert_eq!((value(&back), back.stale_cache_age), ("cached".to_string(), None));
        assert_eq!(ask(&mut client.clone(), 2).await.unwrap().results[0].values[0].status(), FeatureStatus::NotFound);
    }
    assert_eq!(value(&ask(&mut bare, 1).await.unwrap()), "cached");
    services(&["stop", dir_arg]);
}
