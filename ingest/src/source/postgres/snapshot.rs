//! The initial snapshot: a table's rows as of a new slot's consistent point.
//!
//! The slot was created with `EXPORT_SNAPSHOT`; a normal connection adopts
//! that snapshot (`SET TRANSACTION SNAPSHOT`) and reads the table in it. The
//! snapshot sees exactly the transactions that committed before the slot's
//! consistent point and the slot streams exactly those after it, so snapshot
//! plus stream neither misses nor doubles a row. Each column is read as its
//! text output, the form the stream sends, so both take one conversion path
//! (`rows.rs`).

use sqlx::{PgPool, Row};

use super::pgoutput::{Column, Datum, Relation};

/// A table's columns and rows, read in `snapshot`.
pub async fn read(source: &PgPool, snapshot: &str, schema: &str, table: &str) -> anyhow::Result<(Relation, Vec<Vec<Datum>>)> {
    // Snapshot names are the server's own (hex digits and dashes): checked
    // anyway, since the command cannot take a parameter.
    if !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        anyhow::bail!("unexpected snapshot name {snapshot:?}");
    }
    let mut tx = source.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))).execute(&mut *tx).await?;
    let quoted = format!("\"{schema}\".\"{table}\"");
    let columns: Vec<(String, i64)> = sqlx::query_as(
        "SELECT attname::text, atttypid::int8 FROM pg_attribute
         WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .bind(&quoted)
    .fetch_all(&mut *tx)
    .await?;
    let oid: i64 = sqlx::query_scalar("SELECT $1::regclass::oid::int8").bind(&quoted).fetch_one(&mut *tx).await?;
    let select: Vec<String> = columns.iter().map(|(name, _)| format!("\"{}\"::text", name.replace('"', "\"\""))).collect();
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT ARRAY[{}]::text[] FROM {quoted}", select.join(", "))))
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|row| {
            let values: Vec<Option<String>> = row.try_get(0)?;
            Ok(values.into_iter().map(|v| v.map_or(Datum::Null, Datum::Text)).collect())
        })
        .collect::<Result<Vec<Vec<Datum>>, sqlx::Error>>()?;
    tx.commit().await?;
    let relation = Relation {
        oid: oid as u32,
        schema: schema.into(),
        name: table.into(),
        replica_identity: 0,
        columns: columns.into_iter().map(|(name, oid)| Column { name, type_oid: oid as u32 }).collect(),
    };
    Ok((relation, rows))
}
