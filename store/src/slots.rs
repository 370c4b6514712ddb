//! The `postgres_slots` table: which replication slots Freshet created on
//! source databases, so that it drops those (when their views are removed)
//! and never one it did not create.

use sqlx::PgPool;

use crate::view::PostgresSource;

/// Records that `group` is about to create `slot` on `database`. Written
/// before the slot is created: a crash in between leaves a record of a slot
/// that may not exist, which dropping tolerates, never a slot of Freshet's
/// that Freshet does not know.
pub async fn record_created(pool: &PgPool, slot: &str, database: &str, group: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO postgres_slots (slot, source_database, consumer_group) VALUES ($1, $2, $3)
         ON CONFLICT (slot) DO UPDATE SET source_database = excluded.source_database, consumer_group = excluded.consumer_group, created_at = now()",
    )
    .bind(slot)
    .bind(database)
    .bind(group)
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether Freshet created `slot` on `database`.
pub async fn created_by_freshet(pool: &PgPool, slot: &str, database: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM postgres_slots WHERE slot = $1 AND source_database = $2)")
        .bind(slot)
        .bind(database)
        .fetch_one(pool)
        .await
}

/// Forgets `slot` once it was dropped: its record and its checkpoint, so a
/// view added on it later starts with a new snapshot.
pub async fn forget(pool: &PgPool, slot: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM postgres_slots WHERE slot = $1").bind(slot).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM ingest_offsets WHERE topic = $1 AND partition = 0")
        .bind(PostgresSource::topic(slot))
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}
