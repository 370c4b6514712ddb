//! The dead-letter topic: records that can never be applied, with where they
//! came from and why, in the headers Kafka Connect writes
//! (`__connect.errors.*`), so existing DLQ tooling reads them.
//!
//! A produce is retried with backoff until the broker acknowledges it (or
//! shutdown); only then may the batch that skips the record commit. After a
//! crash between the acknowledgement and the commit the record is
//! dead-lettered again on replay: DLQ consumers should deduplicate on the
//! origin headers (topic, partition, offset).
//!
//! A record too large for the DLQ topic can never be produced, and retrying
//! it would hold its partition forever. It is cut down instead: its value
//! truncated to 64 KiB, then dropped, with `freshet.dlq.value.bytes` giving
//! the original size; if even the headers do not fit it is not written. The
//! `dead_letters` table records the full reason in every case.

use std::time::Duration;

use crate::{
    backoff::Backoff,
    shutdown::{Abandoned, Shutdown},
    source::Record,
};
use rdkafka::{
    ClientConfig,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};

/// What is kept of a value that does not fit, before giving up on it.
const TRUNCATED_VALUE_BYTES: usize = 64 << 10;

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

/// What reached the dead-letter topic.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    Written,
    /// The value was cut (or dropped) to fit.
    Truncated {
        original_bytes: usize,
    },
    /// Nothing fit; the broker's last refusal.
    NotWritten {
        error: String,
    },
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

    /// Produces `record` to `topic`, retrying transient failures until
    /// acknowledged or `shutdown`, cutting it down if it is too large.
    pub async fn send(&self, topic: &str, record: &Record, reason: &Reason<'_>, shutdown: &Shutdown) -> Result<Delivery, Abandoned> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let value = record.payload.as_deref();
        let full = value.map_or(0, <[u8]>::len);
        let mut keep = full;
        loop {
            let mut out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(self.headers(record, reason, full, keep));
            if let Some(key) = &record.key {
                out = out.key(key.as_slice());
            }
            if let Some(value) = value {
                out = out.payload(&value[..keep]);
            }
            match self.producer.send(out, Duration::from_secs(5)).await {
                Ok(_) if keep == full => return Ok(Delivery::Written),
                Ok(_) => return Ok(Delivery::Truncated { original_bytes: full }),
                Err((e, _)) if too_large(&e) => {
                    tracing::warn!(error = %e, dlq = topic, value_bytes = keep, "dead letter too large for its topic; cutting it down");
                    keep = match keep {
                        0 => return Ok(Delivery::NotWritten { error: e.to_string() }),
                        k if k > TRUNCATED_VALUE_BYTES => TRUNCATED_VALUE_BYTES,
                        _ => 0,
                    };
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, dlq = topic, attempt = backoff.attempts(), "dead-letter produce failed; retrying");
                    backoff.wait(shutdown).await?;
                }
            }
        }
    }

    /// The record's own headers, then Kafka Connect's error context, then
    /// the original value size if the value is cut.
    fn headers(&self, record: &Record, reason: &Reason<'_>, full: usize, keep: usize) -> OwnedHeaders {
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
        if keep < full {
            headers = headers.insert(Header { key: "freshet.dlq.value.bytes", value: Some(&full.to_string()) });
        }
        headers
    }
}

/// Whether the broker (or the client, before sending) refused the record
/// for its size: no retry can make that succeed.
fn too_large(e: &KafkaError) -> bool {
    matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge))
}
