//! The `ingest_offsets` table: where ingest stands per partition, who owns
//! each partition, and the freshness status committed with each batch.
//!
//! Fencing protocol. An instance that is assigned a partition *claims* it:
//! the claim bumps `owner_epoch` and returns the stored `next_offset`, from
//! which the instance starts consuming. Each batch commit *advances* the
//! partition with a compare-and-set on both the epoch it claimed and the
//! `next_offset` its batch started from, inside the same transaction as the
//! feature state. A stale owner (its partition was claimed again after a
//! rebalance) or a zombie (it paused, someone else moved on) matches no row,
//! its transaction rolls back, and it re-reads the truth from here.

use sqlx::{PgConnection, PgPool};

/// What a claim returns for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub partition: i32,
    pub epoch: i64,
    /// `None` when nothing was ever committed for the partition.
    pub next_offset: Option<i64>,
    /// Newest event time applied so far: the lateness reference.
    pub newest_event_ms: Option<i64>,
}

impl Claim {
    fn from_row(partition: i32, epoch: i64, next_offset: i64, newest_event_ms: Option<i64>) -> Claim {
        Claim { partition, epoch, next_offset: (next_offset >= 0).then_some(next_offset), newest_event_ms }
    }
}

/// Takes ownership of `partitions` of `topic` for `owner`, in `tx` (whose
/// caller checks first that `group` owns the topic's views).
pub async fn claim(tx: &mut PgConnection, group: &str, topic: &str, partitions: &[i32], owner: &str) -> Result<Vec<Claim>, sqlx::Error> {
    let rows: Vec<(i32, i64, i64, Option<i64>)> = sqlx::query_as(
        "INSERT INTO ingest_offsets (consumer_group, topic, partition, owner_epoch, owner)
         SELECT $1, $2, p, 1, $4 FROM UNNEST($3::int4[]) AS p
         ON CONFLICT (consumer_group, topic, partition) DO UPDATE
         SET owner_epoch = ingest_offsets.owner_epoch + 1, owner = excluded.owner
         RETURNING partition, owner_epoch, next_offset, (extract(epoch FROM newest_event_at) * 1000)::int8",
    )
    .bind(group)
    .bind(topic)
    .bind(partitions)
    .bind(owner)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(|(partition, epoch, next, newest)| Claim::from_row(partition, epoch, next, newest)).collect())
}

/// Where a partition stands in the store, without claiming it: after a
/// failed compare-and-set, the owner learns whether it was fenced (another
/// epoch) or the store moved back under it (its own epoch, another offset).
pub async fn current(pool: &PgPool, group: &str, topic: &str, partition: i32) -> Result<Option<Claim>, sqlx::Error> {
    let row: Option<(i64, i64, Option<i64>)> = sqlx::query_as(
        "SELECT owner_epoch, next_offset, (extract(epoch FROM newest_event_at) * 1000)::int8
         FROM ingest_offsets WHERE consumer_group = $1 AND topic = $2 AND partition = $3",
    )
    .bind(group)
    .bind(topic)
    .bind(partition)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(epoch, next, newest)| Claim::from_row(partition, epoch, next, newest)))
}

/// Progress of one partition within a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advance {
    pub topic: String,
    pub partition: i32,
    pub epoch: i64,
    /// The `next_offset` the batch started from (-1 if none was stored).
    pub expected: i64,
    pub next_offset: i64,
    pub high_watermark: i64,
    pub newest_event_ms: Option<i64>,
    pub applied: i64,
    pub dead: i64,
    pub late: i64,
}

/// Advances every partition of a batch inside `tx`. Returns the
/// (topic, partition) pairs whose compare-and-set failed: if any did, the
/// caller must roll back.
pub async fn advance(tx: &mut PgConnection, group: &str, advances: &[Advance]) -> Result<Vec<(String, i32)>, sqlx::Error> {
    let col = |f: fn(&Advance) -> i64| advances.iter().map(f).collect::<Vec<i64>>();
    let topics: Vec<&str> = advances.iter().map(|a| a.topic.as_str()).collect();
    let partitions: Vec<i32> = advances.iter().map(|a| a.partition).collect();
    let newest: Vec<Option<i64>> = advances.iter().map(|a| a.newest_event_ms).collect();
    let updated: Vec<(String, i32)> = sqlx::query_as(
        "UPDATE ingest_offsets o SET
            next_offset = u.next,
            high_watermark = GREATEST(o.high_watermark, u.hw),
            newest_event_at = GREATEST(o.newest_event_at, to_timestamp(u.newest / 1000.0)),
            last_commit_at = now(),
            records_applied = o.records_applied + u.applied,
            records_dead = o.records_dead + u.dead,
            records_late = o.records_late + u.late
         FROM UNNEST($2::text[], $3::int4[], $4::int8[], $5::int8[], $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[])
              AS u(topic, partition, epoch, expected, next, hw, newest, applied, dead, late)
         WHERE o.consumer_group = $1 AND o.topic = u.topic AND o.partition = u.partition
           AND o.owner_epoch = u.epoch AND o.next_offset = u.expected
         RETURNING o.topic, o.partition",
    )
    .bind(group)
    .bind(&topics)
    .bind(&partitions)
    .bind(col(|a| a.epoch))
    .bind(col(|a| a.expected))
    .bind(col(|a| a.next_offset))
    .bind(col(|a| a.high_watermark))
    .bind(&newest)
    .bind(col(|a| a.applied))
    .bind(col(|a| a.dead))
    .bind(col(|a| a.late))
    .fetch_all(&mut *tx)
    .await?;
    Ok(advances
        .iter()
        .filter(|a| !updated.iter().any(|(t, p)| *t == a.topic && *p == a.partition))
        .map(|a| (a.topic.clone(), a.partition))
        .collect())
}

/// Freshness status of one partition, as committed by ingest.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
    pub high_watermark: i64,
    pub newest_event_ms: Option<i64>,
    pub last_commit_ms: Option<i64>,
    pub records_applied: i64,
    pub records_dead: i64,
    pub records_late: i64,
}

pub async fn status(pool: &PgPool, group: &str, topics: &[String]) -> Result<Vec<PartitionStatus>, sqlx::Error> {
    sqlx::query_as(
        "SELECT topic, partition, next_offset, high_watermark,
                (extract(epoch FROM newest_event_at) * 1000)::int8 AS newest_event_ms,
                (extract(epoch FROM last_commit_at) * 1000)::int8 AS last_commit_ms,
                records_applied, records_dead, records_late
         FROM ingest_offsets WHERE consumer_group = $1 AND topic = ANY($2)
         ORDER BY topic, partition",
    )
    .bind(group)
    .bind(topics)
    .fetch_all(pool)
    .await
}

/// One record sent to a dead-letter topic, recorded with the offsets that
/// skip it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub dlq_topic: String,
    pub error_class: String,
    pub error_message: String,
}

pub async fn record_dead_letters(tx: &mut PgConnection, group: &str, letters: &[DeadLetter]) -> Result<(), sqlx::Error> {
    if letters.is_empty() {
        return Ok(());
    }
    let text = |f: fn(&DeadLetter) -> &str| letters.iter().map(f).collect::<Vec<&str>>();
    sqlx::query(
        "INSERT INTO dead_letters (consumer_group, topic, partition, \"offset\", dlq_topic, error_class, error_message)
         SELECT $1, t, p, o, d, c, m FROM UNNEST($2::text[], $3::int4[], $4::int8[], $5::text[], $6::text[], $7::text[]) AS x(t, p, o, d, c, m)
         ON CONFLICT DO NOTHING",
    )
    .bind(group)
    .bind(text(|l| &l.topic))
    .bind(letters.iter().map(|l| l.partition).collect::<Vec<_>>())
    .bind(letters.iter().map(|l| l.offset).collect::<Vec<_>>())
    .bind(text(|l| &l.dlq_topic))
    .bind(text(|l| &l.error_class))
    .bind(text(|l| &l.error_message))
    .execute(&mut *tx)
    .await?;
    Ok(())
}
