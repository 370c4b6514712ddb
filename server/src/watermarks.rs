//! The broker's view of each source partition, for GetFreshness.
//!
//! Ingest records the high watermark it saw with each commit, but a stalled
//! or dead ingest records nothing: lag computed from that alone would look
//! fine exactly when it is not. So the server asks the broker itself, once a
//! second, on a blocking thread, and GetFreshness reads the cached answer.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};

pub type TopicPartition = (String, i32);

#[derive(Clone, Default)]
pub struct Watermarks {
    latest: Arc<RwLock<HashMap<TopicPartition, i64>>>,
}

impl Watermarks {
    pub fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        self.latest.read().unwrap_or_else(|e| e.into_inner()).get(&(topic.to_string(), partition)).copied()
    }

    /// Polls the broker for every partition of `topics` until the process ends.
    pub fn follow(&self, brokers: &str, topics: Vec<String>) -> anyhow::Result<()> {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", brokers).set("isolation.level", "read_committed").create()?;
        let latest = self.latest.clone();
        std::thread::Builder::new().name("watermarks".into()).spawn(move || {
            loop {
                let mut fresh = HashMap::new();
                for topic in &topics {
                    let Ok(metadata) = consumer.fetch_metadata(Some(topic), Duration::from_secs(2)) else { continue };
                    for t in metadata.topics() {
                        for p in t.partitions() {
                            if let Ok((_, high)) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(2)) {
                                fresh.insert((topic.clone(), p.id()), high);
                            }
                        }
                    }
                }
                *latest.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                std::thread::sleep(Duration::from_secs(1));
            }
        })?;
        Ok(())
    }
}
