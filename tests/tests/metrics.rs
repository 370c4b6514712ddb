//! Both binaries' `/metrics`: parsed as Prometheus text, moving as records
//! flow and requests arrive, bounded whatever callers send, and right about
//! calls their clients abandon.

use std::time::Duration;

use freshet_proto::v1::{
    EntityKey, GetFeaturesRequest, ListFeatureViewsRequest, entity_key::Key, feature_service_client::FeatureServiceClient,
};
use freshet_tests::{
    brokers, create_topic, eventually, free_port, fresh_database, ingest_with, lock_feature_state, reference_views, scrape, server,
    server_refusal, tempfile_dir, unique, views_file,
};
use rdkafka::{
    ClientConfig,
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};

#[tokio::test(flavor = "multi_thread")]
async fn ingest_and_server_metrics_move_with_records_and_calls() {
    let topic = unique("metrics");
    create_topic(&topic, 1).await;
    let views = format!(
        "[[view]]\nname = \"acts\"\nentity = \"user\"\nentity_type = \"int64\"\nmax_age = \"1d\"\nfreshness_budget = \"5s\"\n\
         [view.source]\ntopics = [\"{topic}\"]\nformat = \"json\"\nevent_time = \"at\"\n\
         [[view.feature]]\nname = \"n_1h\"\naggregation = \"count\"\nwindow = \"1h\"\n"
    );
    let (_dir, path) = views_file(&views);
    let url = fresh_database().await;
    let ingest_port = free_port();
    let listen = format!("127.0.0.1:{ingest_port}");
    let _ingest = ingest_with(&path, &url, &unique("g"), "one", &["--metrics-listen", &listen]);

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || {
            let producer: ThreadedProducer<DefaultProducerContext> =
                ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
            for i in 0..20 {
                let value = format!(r#"{{"user": {}, "at": {}}}"#, i % 4, now + i);
                producer.send(BaseRecord::<str, str>::to(&topic).key("k").payload(&value)).unwrap();
            }
            producer.send(BaseRecord::<str, str>::to(&topic).key("k").payload("not json")).unwrap();
            producer.flush(Duration::from_secs(10)).unwrap();
        }
    })
    .await
    .unwrap();
    let applied = format!("freshet_ingest_records_applied_total{{topic=\"{topic}\",partition=\"0\"}}");
    let dead = format!("freshet_ingest_records_dead_lettered_total{{topic=\"{topic}\",partition=\"0\"}}");
    let metrics = eventually(Duration::from_secs(60), || async {
        let m = scrape(ingest_port).await;
        (m.get(&applied) == Some(&20.0) && m.get(&dead) == Some(&1.0)).then_some(m)
    })
    .await
    .expect("applied and dead-lettered records are counted");
    assert!(metrics["freshet_ingest_commit_duration_seconds_count"] >= 1.0);
    let newest = format!("freshet_ingest_newest_event_timestamp_seconds{{topic=\"{topic}\",partition=\"0\"}}");
    assert_eq!(metrics[&newest], (now + 19) as f64 / 1000.0);
    assert!(metrics.contains_key(&format!("freshet_ingest_consumer_lag_records{{topic=\"{topic}\",partition=\"0\"}}")));

    let server_port = free_port();
    let listen = format!("127.0.0.1:{server_port}");
    let (_server, address) = server(&path, &url, &["--metrics-listen", &listen]);
    let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let request = |feature: &str| GetFeaturesRequest {
        features: vec![feature.into()],
        entities: vec![EntityKey { key: Some(Key::Int64Key(1)) }],
        max_age: None,
    };
    for _ in 0..3 {
        client.get_features(request("acts:n_1h")).await.unwrap();
    }
    client.get_features(request("acts:nope")).await.unwrap_err();
    let m = scrape(server_port).await;
    assert_eq!(m.get("freshet_server_calls_total{method=\"GetFeatures\",code=\"0\"}"), Some(&3.0), "{m:?}");
    assert_eq!(m.get("freshet_server_calls_total{method=\"GetFeatures\",code=\"3\"}"), Some(&1.0), "{m:?}");
    assert_eq!(m.get("freshet_server_call_duration_seconds_count{method=\"GetFeatures\"}"), Some(&4.0));
    // The first read goes to Postgres (no Redis here); later ones may be
    // answered from the hot tier in memory.
    let (bypassed, hot) =
        (m["freshet_server_cache_reads_total{outcome=\"bypassed\"}"], m["freshet_server_cache_reads_total{outcome=\"hot\"}"]);
    assert!(bypassed >= 1.0 && bypassed + hot == 3.0, "{m:?}");
    assert_eq!(m.get("freshet_server_in_flight_calls"), Some(&0.0));
}

#[tokio::test]
async fn a_busy_metrics_address_is_named() {
    let url = fresh_database().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let said = server_refusal(&reference_views(), &url, &["--metrics-listen", &address]);
    assert!(said.contains(&format!("cannot serve metrics on {address}")) && said.contains("in use"), "{said}");
}

#[tokio::test]
async fn calls_to_random_paths_do_not_grow_the_metrics() {
    let dir = tempfile_dir::Dir::new();
    let tokens = dir.path.join("tokens");
    std::fs::write(&tokens, "s3cret\n").unwrap();
    let url = fresh_database().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (_server, address) = server(&reference_views(), &url, &["--metrics-listen", &listen, "--tokens-file", tokens.to_str().unwrap()]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    // Unauthenticated calls to methods nobody serves.
    let call = |path: String| {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        async move {
            grpc.ready().await.unwrap();
            let path = tonic::codegen::http::uri::PathAndQuery::try_from(path).unwrap();
            let codec = tonic_prost::ProstCodec::<ListFeatureViewsRequest, freshet_proto::v1::ListFeatureViewsResponse>::default();
            grpc.unary(tonic::Request::new(ListFeatureViewsRequest {}), path, codec).await.unwrap_err().code()
        }
    };
    assert_eq!(call("/first.Service/Method".into()).await, tonic::Code::Unauthenticated);
    let series = |m: std::collections::BTreeMap<String, f64>| m.into_keys().collect::<std::collections::BTreeSet<_>>();
    // Once the server's own gauges are up, what is there is the baseline.
    let before = eventually(Duration::from_secs(10), || async {
        let m = scrape(port).await;
        m.contains_key("freshet_server_store_up").then(|| series(m))
    })
    .await
    .unwrap();
    for i in 0..1000 {
        let path = format!("/r{:08x}.S{i}/M{}", rand::random::<u32>(), rand::random::<u64>());
        assert_eq!(call(path).await, tonic::Code::Unauthenticated);
    }
    let after = scrape(port).await;
    assert_eq!(after.get("freshet_server_calls_total{method=\"unknown\",code=\"16\"}"), Some(&1001.0));
    assert_eq!(series(after), before, "no series added by 1,000 distinct paths");
}

/// Opens an HTTP/2 connection by hand and starts a GetFeatures call whose
/// message never arrives in full: what a client that dies mid-request
/// leaves behind. Dropping the stream closes the connection, with no
/// RST_STREAM.
async fn half_sent_call(address: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }
    // HPACK literals without indexing (no Huffman coding).
    fn header(block: &mut Vec<u8>, name: &str, value: &str) {
        block.push(0);
        block.push(name.len() as u8);
        block.extend(name.as_bytes());
        block.push(value.len() as u8);
        block.extend(value.as_bytes());
    }
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    let path = "/freshet.v1.FeatureService/GetFeatures";
    block.extend([0x04, path.len() as u8]); // :path, name from the static table
    block.extend(path.as_bytes());
    let authority = address.to_string();
    block.extend([0x01, authority.len() as u8]); // :authority
    block.extend(authority.as_bytes());
    header(&mut block, "content-type", "application/grpc");
    header(&mut block, "te", "trailers");
    // A gRPC message announced as 100 bytes, of which 10 are sent.
    let mut data = vec![0, 0, 0, 0, 100];
    data.extend([0u8; 10]);
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(4, 0, 0, &[])); // SETTINGS
    bytes.extend(frame(1, 0x4, 1, &block)); // HEADERS, END_HEADERS
    bytes.extend(frame(0, 0, 1, &data)); // DATA, stream still open
    stream.write_all(&bytes).await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread")]
async fn abandoned_calls_leave_flight_and_count_as_cancelled() {
    let url = fresh_database().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (_server, address) = server(&reference_views(), &url, &["--metrics-listen", &listen, "--default-deadline-ms", "60000"]);
    let in_flight = |n: f64| async move {
        eventually(Duration::from_secs(20), || async {
            (scrape(port).await.get("freshet_server_in_flight_calls") == Some(&n)).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("never {n} calls in flight"))
    };
    // Calls held in flight by a lock on the store, then cancelled by their
    // clients (the futures are dropped: RST_STREAM) ...
    let blocker = lock_feature_state(&url).await;
    let client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let request = GetFeaturesRequest {
                    features: vec!["orders:spend_1h".into()],
                    entities: vec![EntityKey { key: Some(Key::Int64Key(1)) }],
                    max_age: None,
                };
                client.get_features(request).await
            })
        })
        .collect();
    in_flight(5.0).await;
    calls.iter().for_each(|c| c.abort());
    in_flight(0.0).await;
    // ... and one whose client closed its connection mid-request.
    let half = half_sent_call(address).await;
    in_flight(1.0).await;
    drop(half);
    in_flight(0.0).await;
    drop(blocker);

    let m = scrape(port).await;
    assert_eq!(m.get("freshet_server_calls_total{method=\"GetFeatures\",code=\"1\"}"), Some(&6.0), "{m:?}");
    let unknown = m.iter().filter(|(k, _)| k.starts_with("freshet_server_calls_total") && k.contains("code=\"2\""));
    assert_eq!(unknown.map(|(_, n)| n).sum::<f64>(), 0.0, "nothing UNKNOWN: {m:?}");
}
