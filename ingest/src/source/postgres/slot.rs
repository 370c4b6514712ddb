//! The replication slot on the source database: finding it, creating it
//! with an exported snapshot, dropping it, and how much WAL it holds back.
//!
//! Slot names are checked when the views file loads (a-z, 0-9, '_'), so
//! they go into replication commands as they are.

use pgwire_replication::{Lsn, client::ReplicationClient};
use sqlx::PgPool;

/// Where a new slot starts, and the snapshot the table is read in.
pub struct Created {
    /// The slot's consistent point: the snapshot holds every transaction
    /// that committed before it, the slot streams every one after.
    pub consistent_point: Lsn,
    /// Valid until the session runs its next command (START_REPLICATION).
    pub snapshot: String,
}

/// Whether `slot` exists, and is a `pgoutput` slot of the session's database.
pub async fn exists(session: &mut ReplicationClient, slot: &str, database: &str) -> anyhow::Result<bool> {
    let rows = session.simple_query(&format!("SELECT plugin, database FROM pg_replication_slots WHERE slot_name = '{slot}'")).await?;
    let Some(row) = rows.first() else { return Ok(false) };
    let text = |i: usize| row.get(i).and_then(|c| c.as_ref()).map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
    if text(0) != "pgoutput" || text(1) != database {
        anyhow::bail!(
            "slot {slot} exists but is not a pgoutput slot of database {database} (plugin {:?}, database {:?})",
            text(0),
            text(1)
        );
    }
    Ok(true)
}

/// Creates `slot`, exporting the snapshot it starts from.
pub async fn create(session: &mut ReplicationClient, slot: &str) -> anyhow::Result<Created> {
    let rows = session.simple_query(&format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput EXPORT_SNAPSHOT")).await?;
    // Columns: slot_name, consistent_point, snapshot_name, output_plugin.
    let text = |i: usize| {
        rows.first()
            .and_then(|r| r.get(i))
            .and_then(|c| c.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(|| anyhow::anyhow!("CREATE_REPLICATION_SLOT returned no column {i}"))
    };
    let consistent_point = Lsn::parse(&text(1)?).map_err(|e| anyhow::anyhow!("consistent point: {e}"))?;
    Ok(Created { consistent_point, snapshot: text(2)? })
}

/// Drops `slot` from a session that has not started streaming.
pub async fn drop(session: &mut ReplicationClient, slot: &str) -> anyhow::Result<()> {
    session.simple_query(&format!("DROP_REPLICATION_SLOT {slot}")).await?;
    Ok(())
}

/// WAL the slot holds back (from its restart point) and WAL not yet
/// confirmed by Freshet, in bytes; `None` if the slot is gone.
pub async fn lag(source: &PgPool, slot: &str) -> Result<Option<(i64, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT (pg_current_wal_lsn() - restart_lsn)::int8, (pg_current_wal_lsn() - confirmed_flush_lsn)::int8
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(source)
    .await
}
