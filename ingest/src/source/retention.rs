//! What the broker still retains: the earliest offset of every partition of
//! some topics, where a rebuild starts consuming again.

use std::time::Duration;

use freshet_store::rebuild::Restart;
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
    error::KafkaResult,
};

/// Blocking (broker round trips): call it from a blocking thread.
pub fn earliest_offsets(brokers: &str, topics: &[String]) -> KafkaResult<Vec<Restart>> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).set("isolation.level", "read_committed").create()?;
    let mut restarts = Vec::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (low, _) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
                restarts.push(Restart { topic: topic.clone(), partition: p.id(), offset: low });
            }
        }
    }
    Ok(restarts)
}
