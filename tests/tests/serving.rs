//! Serving through gRPC what the store holds: every status and value type,
//! request order, windows that decay, validation, limits, shedding,
//! deadlines, health, graceful shutdown, reflection and grpcurl.

use std::{process::Command, time::Duration};

use freshet_proto::v1::{
    EntityKey, FeatureStatus, GetFeaturesRequest, GetFreshnessRequest, ListFeatureViewsRequest, entity_key::Key,
    feature_service_client::FeatureServiceClient, value::Kind,
};
use freshet_store::state::Scalar;
use freshet_tests::{
    event, eventually, free_port, fresh_database, lock_feature_state, reference_views, scrape, server, store_events, views_file,
};
use tonic::Code;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn ids(keys: &[i64]) -> Vec<EntityKey> {
    keys.iter().map(|k| EntityKey { key: Some(Key::Int64Key(*k)) }).collect()
}

#[tokio::test]
async fn serves_every_status_and_type_in_request_order() {
    let url = fresh_database().await;
    let now = now_ms();
    store_events(
        &url,
        "orders",
        vec![
            event(1, now - 2000, &[("amount", Scalar::Double(10.5)), ("items", Scalar::Int(2)), ("express", Scalar::Bool(true))]),
            event(1, now - 1000, &[("amount", Scalar::Double(4.5)), ("items", Scalar::Int(1)), ("express", Scalar::Bool(false))]),
            // User 2 has orders but never said whether express.
            event(2, now - 1000, &[("amount", Scalar::Double(1.0))]),
            // User 3 ordered two days ago: beyond the view's 1 day max age.
            event(3, now - 2 * 86_400_000, &[("amount", Scalar::Double(7.0)), ("express", Scalar::Bool(true))]),
        ],
    )
    .await;
    store_events(
        &url,
        "user_activity",
        vec![event(1, now - 3000, &[("event_type", Scalar::Str("click".into())), ("occurred_at", Scalar::Time(now - 3000))])],
    )
    .await;

    let (_server, address) = server(&reference_views(), &url, &[]);
    let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let features = [
        "orders:spend_1h",
        "orders:orders_1h",
        "orders:max_order_1h",
        "orders:avg_order_1h",
        "orders:items_1h",
        "orders:last_express",
        "user_activity:last_event_type",
        "user_activity:last_event_at",
    ];
    let response = client
        .get_features(GetFeaturesRequest {
            features: features.iter().map(|f| f.to_string()).collect(),
            entities: ids(&[2, 1, 404, 3]),
            max_age: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.feature_names, features);
    let rows = &response.results;
    assert_eq!(
        rows.iter().map(|r| r.entity.clone().unwrap().key).collect::<Vec<_>>(),
        ids(&[2, 1, 404, 3]).into_iter().map(|k| k.key).collect::<Vec<_>>()
    );
    let kind = |row: usize, col: usize| rows[row].values[col].value.clone().and_then(|v| v.kind);
    let status = |row: usize, col: usize| rows[row].values[col].status();

    // User 1: every type, present.
    assert_eq!(kind(1, 0), Some(Kind::DoubleValue(15.0)));
    assert_eq!(kind(1, 1), Some(Kind::Int64Value(2)));
    assert_eq!(kind(1, 2), Some(Kind::DoubleValue(10.5)));
    assert_eq!(kind(1, 3), Some(Kind::DoubleValue(7.5)));
    assert_eq!(kind(1, 4), Some(Kind::Int64Value(3)));
    assert_eq!(kind(1, 5), Some(Kind::BoolValue(false)), "the newest order's flag");
    assert_eq!(kind(1, 6), Some(Kind::StringValue("click".into())));
    let at = prost_types::Timestamp { seconds: (now - 3000).div_euclid(1000), nanos: ((now - 3000).rem_euclid(1000) * 1_000_000) as i32 };
    assert_eq!(kind(1, 7), Some(Kind::TimestampValue(at)));
    assert_eq!(rows[1].values[6].event_time, Some(at));
    assert!((0..8).all(|c| status(1, c) == FeatureStatus::Present));

    // User 2: known to orders, express never set; unknown to user_activity.
    assert_eq!(status(2 - 2, 5), FeatureStatus::NullValue);
    assert_eq!(status(0, 0), FeatureStatus::Present);
    assert_eq!(status(0, 6), FeatureStatus::NotFound);
    // Unknown entity.
    assert!((0..8).all(|c| status(2, c) == FeatureStatus::NotFound));
    assert!(rows[2].values.iter().all(|v| v.value.is_none() && v.event_time.is_none()));
    // User 3: too old for the view's max age; the stale value is withheld.
    assert_eq!(status(3, 5), FeatureStatus::OutsideMaxAge);
    assert_eq!(rows[3].values[5].value, None);

    // A request's own max age is stricter than the view's.
    let strict = client
        .get_features(GetFeaturesRequest {
            features: vec!["orders:last_express".into()],
            entities: ids(&[1]),
            max_age: Some(prost_types::Duration { seconds: 0, nanos: 500_000_000 }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(strict.results[0].values[0].status(), FeatureStatus::OutsideMaxAge);
}

#[tokio::test]
async fn windows_decay_without_new_events() {
    let url = fresh_database().await;
    let now = now_ms();
    store_events(&url, "user_activity", vec![event(7, now - 6000, &[]), event(7, now - 100, &[])]).await;
    let (_server, address) = server(&reference_views(), &url, &[]);
    let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let ask = || GetFeaturesRequest {
        features: vec!["user_activity:events_10s".into(), "user_activity:events_1h".into()],
        entities: ids(&[7]),
        max_age: None,
    };
    let counts = |r: freshet_proto::v1::GetFeaturesResponse| -> Vec<Option<Kind>> {
        r.results[0].values.iter().map(|v| v.value.clone().and_then(|v| v.kind)).collect()
    };
    let before = counts(client.get_features(ask()).await.unwrap().into_inner());
    assert_eq!(before, [Some(Kind::Int64Value(2)), Some(Kind::Int64Value(2))]);
    // Wait until the older event has left the 10 s window (no new events).
    let decayed = freshet_tests::eventually(Duration::from_secs(20), || {
        let mut client = client.clone();
        async move {
            let c = counts(client.get_features(ask()).await.unwrap().into_inner());
            (c[0] == Some(Kind::Int64Value(1))).then_some(c)
        }
    })
    .await
    .expect("the 10 s window should decay");
    assert_eq!(decayed[1], Some(Kind::Int64Value(2)), "the hour still holds both");
}

#[tokio::test]
async fn bad_requests_name_the_field() {
    let url = fresh_database().await;
    let (_server, address) = server(&reference_views(), &url, &["--max-entities", "5"]);
    let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let cases: Vec<(GetFeaturesRequest, &str)> = vec![
        (GetFeaturesRequest { features: vec![], entities: ids(&[1]), max_age: None }, "features:"),
        (GetFeaturesRequest { features: vec!["orders:spend_1h".into()], entities: vec![], max_age: None }, "entities:"),
        (
            GetFeaturesRequest { features: vec!["orders:spend_1h".into()], entities: ids(&[1, 2, 3, 4, 5, 6]), max_age: None },
            "entities: 6 entities exceed",
        ),
        (GetFeaturesRequest { features: vec!["orders".into()], entities: ids(&[1]), max_age: None }, "features[0]:"),
        (
            GetFeaturesRequest { features: vec!["orders:spend_1h".into(), "nope:x".into()], entities: ids(&[1]), max_age: None },
            "features[1]: unknown feature view",
        ),
        (
            GetFeaturesRequest { features: vec!["orders:nope".into()], entities: ids(&[1]), max_age: None },
            "features[0]: view \"orders\" has no feature",
        ),
        (
            GetFeaturesRequest {
                features: vec!["orders:spend_1h".into()],
                entities: vec![EntityKey { key: Some(Key::StringKey("u1".into())) }],
                max_age: None,
            },
            "entities[0]:",
        ),
    ];
    for (request, expected) in cases {
        let status = client.get_features(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(expected), "{:?} should start with {expected:?}", status.message());
    }
    let status = client.get_freshness(GetFreshnessRequest { views: vec!["nope".into()] }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("views[0]:"));
    // Still serving after all that.
    assert_eq!(client.list_feature_views(ListFeatureViewsRequest {}).await.unwrap().into_inner().views.len(), 2);
}

#[tokio::test]
async fn excess_calls_are_shed_at_once_and_deadlines_are_honoured() {
    let url = fresh_database().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (_server, address) =
        server(&reference_views(), &url, &["--max-in-flight", "2", "--default-deadline-ms", "20000", "--metrics-listen", &listen]);
    let client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    // Hold a lock that makes every read wait, so admitted calls stay in flight.
    let blocker = lock_feature_state(&url).await;

    let request = || GetFeaturesRequest { features: vec!["orders:spend_1h".into()], entities: ids(&[1]), max_age: None };
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut c = client.clone();
        slow.push(tokio::spawn(async move { c.get_features(request()).await.map(|_| ()) }));
    }
    // Give the two calls time to be admitted (they then wait on the lock).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut refused = 0;
    for _ in 0..20 {
        let mut c = client.clone();
        match c.get_features(request()).await {
            Err(s) if s.code() == Code::ResourceExhausted => refused += 1,
            other => panic!("expected RESOURCE_EXHAUSTED while at the limit, got {other:?}"),
        }
    }
    assert_eq!(refused, 20);
    // Health is not limited: probes still hear SERVING.
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = tonic_health::pb::HealthCheckRequest { service: "freshet.v1.FeatureService".into() };
    assert_eq!(health.check(check).await.unwrap().into_inner().status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
    // Shed calls are counted as such, and under their code.
    let m = scrape(port).await;
    assert_eq!(m.get("freshet_server_shed_calls_total"), Some(&20.0), "{m:?}");
    assert_eq!(m.get("freshet_server_calls_total{method=\"GetFeatures\",code=\"8\"}"), Some(&20.0), "{m:?}");
    drop(blocker);
    for call in slow {
        call.await.unwrap().expect("admitted calls complete once the lock is gone");
    }
    // Deadlines: a server whose default deadline is short answers
    // DEADLINE_EXCEEDED for a call stuck on the lock (no client-side timer is
    // set, so the answer is the server's own).
    let (_short, short_address) = server(&reference_views(), &url, &["--default-deadline-ms", "300"]);
    let mut short_client = FeatureServiceClient::connect(format!("http://{short_address}")).await.unwrap();
    let blocker = lock_feature_state(&url).await;
    let status = short_client.get_features(request()).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    drop(blocker);
    // After the burst the server serves normally.
    let mut c = client.clone();
    assert!(c.get_features(request()).await.is_ok());
}

/// A client pushing calls faster than they are answered holds the excess
/// on its own side: one connection has at most
/// `--max-streams-per-connection` calls open at the server, so the server's
/// memory does not grow with the client's backlog (tonic alone sets no
/// bound).
#[tokio::test]
async fn one_connection_has_only_so_many_calls_open() {
    let url = fresh_database().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args =
        ["--max-streams-per-connection", "3", "--max-in-flight", "100", "--default-deadline-ms", "60000", "--metrics-listen", &listen];
    let (_server, address) = server(&reference_views(), &url, &args);
    // One channel: one HTTP/2 connection.
    let client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let blocker = lock_feature_state(&url).await;
    let request = || GetFeaturesRequest { features: vec!["orders:spend_1h".into()], entities: ids(&[1]), max_age: None };
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.get_features(request()).await.map(|_| ()) })
        })
        .collect();
    let in_flight = || async { scrape(port).await.get("freshet_server_in_flight_calls").copied() };
    let three = eventually(Duration::from_secs(10), || async { in_flight().await.filter(|n| *n == 3.0) }).await;
    assert_eq!(three, Some(3.0), "three calls reach the server");
    // The other three wait in the client, neither sent nor refused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = scrape(port).await;
    assert_eq!(m.get("freshet_server_in_flight_calls"), Some(&3.0), "{m:?}");
    assert_eq!(m.get("freshet_server_shed_calls_total"), Some(&0.0), "{m:?}");
    drop(blocker);
    for call in calls {
        call.await.unwrap().expect("every call is answered once the lock is gone");
    }
}

#[tokio::test]
async fn grpcurl_lists_describes_and_calls() {
    let url = fresh_database().await;
    let now = now_ms();
    store_events(&url, "user_activity", vec![event(42, now - 500, &[("event_type", Scalar::Str("purchase".into()))])]).await;
    let (_server, address) = server(&reference_views(), &url, &[]);
    let grpcurl = |args: &[&str]| -> String {
        let out = Command::new("grpcurl")
            .arg("-plaintext")
            .args(args)
            .output()
            .expect("grpcurl is installed by deploy/local/services.sh install");
        assert!(out.status.success(), "grpcurl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let address = address.to_string();
    let services = grpcurl(&[&address, "list"]);
    assert!(services.contains("freshet.v1.FeatureService") && services.contains("grpc.health.v1.Health"), "{services}");
    let described = grpcurl(&[&address, "describe", "freshet.v1.FeatureService"]);
    assert!(described.contains("rpc GetFeatures") && described.contains("rpc GetFreshness"), "{described}");
    let health = grpcurl(&["-d", r#"{"service": "freshet.v1.FeatureService"}"#, &address, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "{health}");
    let views = grpcurl(&[&address, "freshet.v1.FeatureService/ListFeatureViews"]);
    assert!(views.contains("\"user_activity\"") && views.contains("events_10s"), "{views}");
    let body = r#"{"features": ["user_activity:last_event_type", "user_activity:events_1m"], "entities": [{"int64Key": "42"}]}"#;
    let features = grpcurl(&["-d", body, &address, "freshet.v1.FeatureService/GetFeatures"]);
    let json: serde_json::Value = serde_json::from_str(&features).unwrap();
    assert_eq!(json["results"][0]["values"][0]["value"]["stringValue"], "purchase", "{features}");
    assert_eq!(json["results"][0]["values"][1]["value"]["int64Value"], "1", "{features}");
    assert_eq!(json["results"][0]["values"][0]["status"], "PRESENT");
    let freshness = grpcurl(&["-d", "{}", &address, "freshet.v1.FeatureService/GetFreshness"]);
    assert!(freshness.contains("\"user_activity\"") && freshness.contains("UNKNOWN"), "{freshness}");
}

#[tokio::test]
async fn requests_over_the_limits_are_refused_before_any_work() {
    let url = fresh_database().await;
    // A call that reached the store would wait for the lock until its
    // minute-long deadline: a refusal is proof that none did.
    let (_server, address) = server(&reference_views(), &url, &["--default-deadline-ms", "60000"]);
    let _blocker = lock_feature_state(&url).await;
    let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let features = |n: usize| (0..n).map(|i| format!("orders:f{i}")).collect::<Vec<_>>();
    let many: Vec<i64> = (0..1000).collect();
    let cases = [
        // The issue's request: 10,000 features of 1,000 entities.
        (features(10_000), ids(&many), "features: 10000 feature references exceed the limit of 1000"),
        (features(101), ids(&many), "entities: 1000 entities × 101 features = 101000 values exceed the limit of 100000"),
        (
            vec!["orders:spend_1h".into(), "orders:orders_1h".into(), "orders:spend_1h".into()],
            ids(&[1]),
            "features[2]: repeats features[0]",
        ),
    ];
    for (features, entities, expected) in cases {
        let status = client.get_features(GetFeaturesRequest { features, entities, max_age: None }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(expected), "{:?} should start with {expected:?}", status.message());
    }
    let status = client.get_freshness(GetFreshnessRequest { views: vec!["orders".into(); 3] }).await.unwrap_err();
    assert!(status.message().starts_with("views[1]: repeats views[0]"), "{status:?}");
}

#[tokio::test]
async fn a_big_request_within_the_limits_keeps_its_deadline() {
    // One view of 100 features over one day, 1,000 entities with 50 events
    // across it: the largest answer the default limits allow (100,000
    // values), where evaluating (each feature sums its day of tiles) costs
    // more than reading. Each feature's window is a millisecond shorter than
    // the last, so that none shares another's combination (features of one
    // window are combined once) while all read the same two series of tiles.
    let mut text = String::from(
        "[[view]]\nname = \"wide\"\nentity = \"user\"\nentity_type = \"int64\"\nmax_age = \"1d\"\nfreshness_budget = \"5s\"\n\
         [view.source]\ntopics = [\"wide\"]\nformat = \"json\"\nevent_time = \"at\"\n",
    );
    for i in 0..100 {
        let window_ms = 86_399_999 - i;
        text += &format!("[[view.feature]]\nname = \"n{i}\"\naggregation = \"count\"\nwindow = \"{window_ms}ms\"\n");
    }
    let (_dir, path) = views_file(&text);
    let url = fresh_database().await;
    let catalog = freshet_store::view::Catalog::load(&path).unwrap();
    let view = catalog.view("wide").unwrap();
    let now = now_ms();
    let rows: Vec<_> = (0..1000)
        .map(|user: i64| {
            let mut state = freshet_store::state::EntityState::default();
            for k in 0..50 {
                let e = event(user, now - k * 28 * 60_000, &[]);
                state.apply(view, &e, freshet_store::state::Direction::Add, true);
            }
            (("wide".to_string(), user.to_string()), state)
        })
        .collect();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    freshet_store::entities::store(&mut tx, &rows).await.unwrap();
    tx.commit().await.unwrap();

    let request = || GetFeaturesRequest {
        features: (0..100).map(|i| format!("wide:n{i}")).collect(),
        entities: ids(&(0..1000).collect::<Vec<_>>()),
        max_age: None,
    };
    let connect = |address: std::net::SocketAddr| async move {
        FeatureServiceClient::connect(format!("http://{address}")).await.unwrap().max_decoding_message_size(64 << 20)
    };
    // How long the server takes to read those rows, and to answer all of
    // them, here and now (its own measure: the client's decoding is not in it).
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // Both servers read the store (no hot tier), so that what sets the two
    // apart is the evaluation.
    let (_roomy, address) = server(&path, &url, &["--default-deadline-ms", "60000", "--metrics-listen", &listen, "--hot-cache-bytes", "0"]);
    let mut client = connect(address).await;
    let answer = client.get_features(request()).await.unwrap().into_inner();
    assert_eq!(answer.results.len(), 1000);
    assert_eq!(answer.results[999].values[2].value.clone().and_then(|v| v.kind), Some(Kind::Int64Value(50)), "the day holds all 50");
    let served = || async { scrape(port).await["freshet_server_call_duration_seconds_sum{method=\"GetFeatures\"}"] };
    let timed = |request: GetFeaturesRequest| {
        let mut client = client.clone();
        async move {
            let before = served().await;
            client.get_features(request).await.unwrap();
            Duration::from_secs_f64(served().await - before)
        }
    };
    let read = timed(GetFeaturesRequest { features: vec!["wide:n0".into()], ..request() }).await;
    let whole = timed(request()).await;
    assert!(whole > read);
    // A deadline that passes halfway through the evaluation: the call must
    // end DEADLINE_EXCEEDED, not answer late.
    let deadline = (read + (whole - read) / 2).as_millis().max(1).to_string();
    let (_tight, address) = server(&path, &url, &["--default-deadline-ms", &deadline, "--hot-cache-bytes", "0"]);
    let mut client = connect(address).await;
    let status = client.get_features(request()).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?} (reading took {read:?}, answering {whole:?}, deadline {deadline} ms)");
}

#[tokio::test]
async fn shutdown_turns_health_not_serving_before_draining_calls() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let url = fresh_database().await;
    let metrics_port = free_port();
    let listen = format!("127.0.0.1:{metrics_port}");
    // The drain lasts at most the default deadline + 1 s: keep it inside
    // the 30 s `terminate` waits.
    let (mut process, address) = server(&reference_views(), &url, &["--default-deadline-ms", "10000", "--metrics-listen", &listen]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest { service: "freshet.v1.FeatureService".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.message().await.unwrap().unwrap().status(), ServingStatus::Serving);

    // A call in flight, held by a lock on the store.
    let blocker = lock_feature_state(&url).await;
    let mut client = FeatureServiceClient::new(channel);
    let call = tokio::spawn(async move {
        client.get_features(GetFeaturesRequest { features: vec!["orders:spend_1h".into()], entities: ids(&[1]), max_age: None }).await
    });
    eventually(Duration::from_secs(10), || async {
        (scrape(metrics_port).await.get("freshet_server_in_flight_calls") == Some(&1.0)).then_some(())
    })
    .await
    .expect("the call is in flight");

    Command::new("kill").args(["-TERM", &process.child.id().to_string()]).status().unwrap();
    let seen = loop {
        let seen = health.message().await.unwrap().expect("a status before the stream ends").status();
        if seen != ServingStatus::Serving {
            break seen;
        }
    };
    assert_eq!(seen, ServingStatus::NotServing);
    assert!(!call.is_finished(), "NOT_SERVING is announced while the call is still draining");
    // The drain: the call in flight completes, then the server exits.
    drop(blocker);
    let answer = call.await.unwrap().expect("the call in flight is answered");
    assert_eq!(answer.into_inner().results.len(), 1);
    assert!(health.message().await.unwrap().is_none(), "the Watch stream ends, so it does not hold the drain open");
    // The last handle on the connection: closing it lets the drain end now
    // rather than at its bound.
    drop(health);
    assert!(process.terminate().success());
}
