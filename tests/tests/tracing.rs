//! Traces across Kafka and gRPC, received by a real OTLP/gRPC endpoint: a
//! test-local `TraceService` from the official opentelemetry-proto
//! definitions, which is what an OpenTelemetry Collector exposes.

use std::time::Duration;

use freshet_proto::v1::{EntityKey, GetFeaturesRequest, entity_key::Key, feature_service_client::FeatureServiceClient};
use freshet_tests::{brokers, create_topic, eventually, fresh_database, start_collector, unique, views_file};
use opentelemetry_proto::tonic::trace::v1::Span;
use rdkafka::{
    ClientConfig,
    message::{Header, OwnedHeaders},
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";
const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

#[tokio::test(flavor = "multi_thread")]
async fn a_record_and_a_call_carry_their_traces_through_freshet() {
    let (collector, endpoint) = start_collector().await;
    let topic = unique("traced");
    create_topic(&topic, 1).await;
    let views = format!(
        "[[view]]\nname = \"acts\"\nentity = \"user\"\nentity_type = \"int64\"\nmax_age = \"1d\"\nfreshness_budget = \"5s\"\n\
         [view.source]\ntopics = [\"{topic}\"]\nformat = \"json\"\nevent_time = \"at\"\n\
         [[view.feature]]\nname = \"n_1h\"\naggregation = \"count\"\nwindow = \"1h\"\n"
    );
    let (_dir, path) = views_file(&views);
    let url = fresh_database().await;
    let otel = |command: &mut std::process::Command| {
        command.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint).env("OTEL_BSP_SCHEDULE_DELAY", "100");
    };
    let group = unique("g");
    let mut ingest = std::process::Command::new(freshet_tests::binary("freshet-ingest"));
    ingest
        .arg("run")
        .env("FRESHET_VIEWS", &path)
        .env("FRESHET_DATABASE_URL", &url)
        .env("FRESHET_KAFKA_BROKERS", brokers())
        .env("FRESHET_GROUP", &group)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null());
    otel(&mut ingest);
    let _ingest = freshet_tests::Process::start(&mut ingest);

    // A producer that traces: its record carries a traceparent header.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || {
            let producer: ThreadedProducer<DefaultProducerContext> =
                ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
            let traceparent = format!("00-{TRACE}-{PRODUCER_SPAN}-01");
            let headers = OwnedHeaders::new().insert(Header { key: "traceparent", value: Some(traceparent.as_str()) });
            let value = format!(r#"{{"user": 1, "at": {now}}}"#);
            producer.send(BaseRecord::<str, str>::to(&topic).key("k").payload(&value).headers(headers)).unwrap();
            producer.flush(Duration::from_secs(10)).unwrap();
        }
    })
    .await
    .unwrap();

    // The commit that applied it links to the producer's span.
    let commit = eventually(Duration::from_secs(60), || async {
        collector.spans.lock().unwrap().iter().find(|s| s.name == "commit" && s.links.iter().any(|l| hex(&l.trace_id) == TRACE)).cloned()
    })
    .await
    .expect("a commit span linked to the producer's trace");
    let link = commit.links.iter().find(|l| hex(&l.trace_id) == TRACE).unwrap();
    assert_eq!(hex(&link.span_id), PRODUCER_SPAN);

    // A call with a traceparent becomes a server span in the caller's trace,
    // with the Redis and Postgres reads as its descendants.
    let mut server = std::process::Command::new(freshet_tests::binary("freshet-server"));
    server
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--redis-url", &freshet_tests::env("FRESHET_REDIS_URL"), "--cache-prefix", &unique("traced")])
        .env_remove("FRESHET_KAFKA_BROKERS")
        .env("FRESHET_LOG_FORMAT", "json")
        .env("FRESHET_VIEWS", &path)
        .env("FRESHET_DATABASE_URL", &url)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped());
    otel(&mut server);
    let mut server = freshet_tests::Process::start(&mut server);
    let address = {
        use std::io::BufRead;
        let stdout = server.child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let address = loop {
            let line = lines.next().unwrap().unwrap();
            if let Some(a) = line.strip_prefix("freshet-server listening on ") {
                break a.to_string();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        address
    };
    let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
    let mut request = tonic::Request::new(GetFeaturesRequest {
        features: vec!["acts:n_1h".into()],
        entities: vec![EntityKey { key: Some(Key::Int64Key(1)) }],
        max_age: None,
    });
    request.metadata_mut().insert("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01").parse().unwrap());
    client.get_features(request).await.unwrap();

    let (call, read, cache) = eventually(Duration::from_secs(30), || async {
        let spans = collector.spans.lock().unwrap();
        let call = spans.iter().find(|s| hex(&s.trace_id) == CALLER_TRACE && hex(&s.parent_span_id) == CALLER_SPAN)?.clone();
        let read = spans.iter().find(|s| s.name == "postgres.read" && s.trace_id == call.trace_id)?.clone();
        let cache = spans.iter().find(|s| s.name == "redis.get" && s.trace_id == call.trace_id)?.clone();
        Some((call, read, cache))
    })
    .await
    .expect("a server span in the caller's trace, with Redis and Postgres children");
    assert_eq!(call.name, "freshet.v1.FeatureService/GetFeatures");
    assert_eq!(call.kind, opentelemetry_proto::tonic::trace::v1::span::SpanKind::Server as i32);
    let attribute = |span: &Span, key: &str| {
        span.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.clone()).map(|v| format!("{:?}", v.value))
    };
    assert!(attribute(&call, "rpc.method").unwrap().contains("GetFeatures"));
    assert!(attribute(&call, "rpc.grpc.status_code").unwrap().contains("IntValue(0)"), "{:?}", call.attributes);
    // The reads descend from the call (through the handler's span).
    let spans = collector.spans.lock().unwrap().clone();
    for child in [&read, &cache] {
        let mut parent = child.parent_span_id.clone();
        let mut hops = 0;
        while parent != call.span_id && hops < 5 {
            parent = spans.iter().find(|s| s.span_id == parent).map(|s| s.parent_span_id.clone()).unwrap_or_default();
            hops += 1;
        }
        assert_eq!(parent, call.span_id, "{} should descend from the server span", child.name);
    }
}
