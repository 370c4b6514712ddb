//! Recomputing views from Kafka, for a view file that changed (a feature or
//! a window added): the views' state is deleted and the offsets of every
//! topic they read go back to the earliest the broker retains, in one
//! transaction, so the next ingest recomputes them from the log. Offsets are
//! kept per topic, not per view, so every view reading one of those topics
//! is rebuilt with them (the caller works out that closure). The owner
//! epochs are bumped: an instance still running the old file is fenced.

use sqlx::PgPool;

use crate::owners::{self, OwnershipError};

/// Where one partition starts again.
pub struct Restart {
    pub topic: String,
    pub partition: i32,
    /// The earliest offset the broker retains.
    pub offset: i64,
}

pub async fn rebuild(pool: &PgPool, group: &str, views: &[&str], restarts: &[Restart]) -> Result<(), OwnershipError> {
    let mut tx = pool.begin().await?;
    owners::check(&mut tx, group, views).await?;
    sqlx::query("DELETE FROM feature_state WHERE view = ANY($1)").bind(views).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM feature_deltas WHERE view = ANY($1)").bind(views).execute(&mut *tx).await?;
    let topics: Vec<&str> = restarts.iter().map(|r| r.topic.as_str()).collect();
    let partitions: Vec<i32> = restarts.iter().map(|r| r.partition).collect();
    let offsets: Vec<i64> = restarts.iter().map(|r| r.offset).collect();
    sqlx::query(
        "INSERT INTO ingest_offsets (consumer_group, topic, partition, next_offset, owner_epoch, owner)
         SELECT $1, t, p, o, 1, 'rebuild' FROM UNNEST($2::text[], $3::int4[], $4::int8[]) AS r(t, p, o)
         ON CONFLICT (consumer_group, topic, partition) DO UPDATE
         SET next_offset = excluded.next_offset, owner_epoch = ingest_offsets.owner_epoch + 1, owner = 'rebuild',
             high_watermark = -1, newest_event_at = NULL, last_commit_at = NULL,
             records_applied = 0, records_dead = 0, records_late = 0",
    )
    .bind(group)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
