//! Both binaries' `/metrics`: parsed as Prometheus text, and moving as
//! records flow and requests arrive.

use std::time::Duration;

use freshet_proto::v1::{EntityKey, GetFeaturesRequest, entity_key::Key, feature_service_client::FeatureServiceClient};
use freshet_tests::{brokers, create_topic, eventually, free_port, fresh_database, ingest_with, scrape, server, unique, views_file};
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
    assert_eq!(m.get("freshet_server_cache_reads_total{outcome=\"bypassed\"}"), Some(&3.0));
    assert_eq!(m.get("freshet_server_in_flight_calls"), Some(&0.0));
}
