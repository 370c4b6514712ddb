//! The `feature_state` table: one row of tiles and last values per (view,
//! entity). Ingest reads rows `FOR UPDATE` and writes them back in one
//! statement per batch; the server reads a request's entities in one query.
//! Lists go to Postgres as arrays (`UNNEST`, `= ANY`), never as SQL text.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool};

use crate::state::EntityState;

/// Identifies a row: (view name, canonical entity key).
pub type RowKey = (String, String);

/// Locks and reads the rows of `keys` for a read-modify-write in `tx`. Rows
/// are locked in key order, so concurrent batches cannot deadlock.
pub async fn load_for_update(
    tx: &mut PgConnection,
    keys: &[RowKey],
) -> Result<HashMap<RowKey, EntityState>, sqlx::Error> {
    let (views, entities): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(v, e)| (v.as_str(), e.as_str())).unzip();
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT s.view, s.entity, s.state::text FROM feature_state s
         JOIN UNNEST($1::text[], $2::text[]) AS k(view, entity) ON s.view = k.view AND s.entity = k.entity
         ORDER BY s.view, s.entity FOR UPDATE OF s",
    )
    .bind(&views)
    .bind(&entities)
    .fetch_all(&mut *tx)
    .await?;
    rows.into_iter()
        .map(|(view, entity, state)| Ok(((view, entity), decode(&state)?)))
        .collect()
}

/// Writes `rows` back, inserting the new ones, in one statement.
pub async fn store(
    tx: &mut PgConnection,
    rows: &[(RowKey, EntityState)],
) -> Result<(), sqlx::Error> {
    let mut views = Vec::with_capacity(rows.len());
    let mut entities = Vec::with_capacity(rows.len());
    let mut states = Vec::with_capacity(rows.len());
    let mut newest = Vec::with_capacity(rows.len());
    for ((view, entity), state) in rows {
        views.push(view.as_str());
        entities.push(entity.as_str());
        states.push(serde_json::to_string(state).map_err(|e| sqlx::Error::Encode(Box::new(e)))?);
        newest.push(state.newest_ms);
    }
    sqlx::query(
        "INSERT INTO feature_state (view, entity, state, newest_event_at, updated_at)
         SELECT v, e, s::jsonb, to_timestamp(n / 1000.0), now()
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[]) AS r(v, e, s, n)
         ON CONFLICT (view, entity) DO UPDATE
         SET state = excluded.state, newest_event_at = excluded.newest_event_at, updated_at = now()",
    )
    .bind(&views)
    .bind(&entities)
    .bind(&states)
    .bind(&newest)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Reads the state of every (view, entity) pair of `views` × `entities` in one
/// query; a pair never seen is absent from the map.
pub async fn read(
    pool: &PgPool,
    views: &[&str],
    entities: &[&str],
) -> Result<HashMap<RowKey, EntityState>, sqlx::Error> {
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT view, entity, state::text FROM feature_state WHERE view = ANY($1) AND entity = ANY($2)")
            .bind(views)
            .bind(entities)
            .fetch_all(pool)
            .await?;
    rows.into_iter()
        .map(|(view, entity, state)| Ok(((view, entity), decode(&state)?)))
        .collect()
}

fn decode(text: &str) -> Result<EntityState, sqlx::Error> {
    serde_json::from_str(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}
