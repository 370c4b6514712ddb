//! Reading a dead-letter topic back, as an operator would: each record's
//! payload with its `__connect.errors.*` headers.

use std::{collections::BTreeMap, time::Duration};

use rdkafka::{
    ClientConfig, Message,
    consumer::{BaseConsumer, Consumer},
    message::Headers,
};

use crate::{brokers, unique};

/// A dead-lettered record: its payload (lossy UTF-8) and headers by name.
pub type DeadLetter = (String, BTreeMap<String, String>);

/// The first `n` records of `topic`, read from its beginning; fewer if they
/// have not all arrived within 30 s.
pub async fn dead_letters(topic: &str, n: usize) -> Vec<DeadLetter> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("dlq-reader"))
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        consumer.subscribe(&[&topic]).unwrap();
        let mut letters = Vec::new();
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while letters.len() < n && std::time::Instant::now() < end {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else { continue };
            let text = |bytes: Option<&[u8]>| String::from_utf8_lossy(bytes.unwrap_or_default()).into_owned();
            let headers = m.headers().map(|h| h.iter().map(|h| (h.key.to_string(), text(h.value))).collect()).unwrap_or_default();
            letters.push((text(m.payload()), headers));
        }
        letters
    })
    .await
    .unwrap()
}
