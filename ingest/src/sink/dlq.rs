//! The dead-letter topic: records that can never be applied, with where they
//! came from and why, in the headers Kafka Connect writes
//! (`__connect.errors.*`), so existing DLQ tooling reads them.
//!
//! A produce is retried with backoff until the broker acknowledges it; only
//! then may the batch that skips the record commit. After a crash between
//! the acknowledgement and the commit the record is dead-lettered again on
//! replay: DLQ consumers should deduplicate on the origin headers
//! (topic, partition, offset).

use std::time::Duration;

use rdkafka::{
    ClientConfig,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};

use crate::{backoff::Backoff, source::Record};

pub struct DeadLetterQueue {
    producer: FutureProducer,
    /// Consumer group and instance, reported as connector and task.
    group: String,
    owner: String,
}

/// Why a record is dead-lettered.
pub struct Reason<'a> {
    /// Kafka Connect's stage names: VALUE_CONVERTER (decode), SINK (store).
    pub stage: &'a str,
    pub class: &'a str,
    pub message: &'a str,
}

impl DeadLetterQueue {
    pub fn new(brokers: &str, group: &str, owner: &str) -> anyhow::Result<Self> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(Self { producer, group: group.into(), owner: owner.into() })
    }

    /// Produces `record` to `topic`, retrying until acknowledged.
    pub async fn send(&self, topic: &str, record: &Record, reason: &Reason<'_>) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            let mut headers = OwnedHeaders::new();
            for (name, value) in &record.headers {
                headers = headers.insert(Header { key: name, value: Some(value.as_slice()) });
            }
            let partition = record.partition.to_string();
            let offset = record.offset.to_string();
            let timestamp = record.timestamp_ms.map(|t| t.to_string()).unwrap_or_default();
            for (key, value) in [
                ("__connect.errors.topic", record.topic.as_str()),
                ("__connect.errors.partition", &partition),
                ("__connect.errors.offset", &offset),
                ("__connect.errors.timestamp", &timestamp),
                ("__connect.errors.stage", reason.stage),
                ("__connect.errors.class.name", "freshet-ingest"),
                ("__connect.errors.exception.class.name", reason.class),
                ("__connect.errors.exception.message", reason.message),
                ("__connect.errors.connector.name", &self.group),
                ("__connect.errors.task.id", &self.owner),
            ] {
                headers = headers.insert(Header { key, value: Some(value) });
            }
            let mut out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
            if let Some(key) = &record.key {
                out = out.key(key.as_slice());
            }
            if let Some(payload) = &record.payload {
                out = out.payload(payload.as_slice());
            }
            match self.producer.send(out, Duration::from_secs(5)).await {
                Ok(_) => return,
                Err((e, _)) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, dlq = topic, attempt = backoff.attempts(), ?wait, "dead-letter produce failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}
