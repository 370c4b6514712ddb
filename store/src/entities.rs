//! The `feature_state` table: one row of tiles and last values per (view,
//! entity). Ingest reads rows `FOR UPDATE` and writes them back in one
//! statement per batch; the server reads a request's entities in one query.
//! Lists go to Postgres as arrays (`UNNEST`, `= ANY`), never as SQL text.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool};

use crate::{codec, state::EntityState};

/// Identifies a row: (view name, canonical entity key).
pub type RowKey = (String, String);

/// Locks and reads the rows of `keys` for a read-modify-write in `tx`.
///
/// `FOR UPDATE` locks only rows that exist: two transactions that both find
/// no row for a new entity would both start from an empty state, and the
/// second write would replace the first's events (a lost update). So every
/// missing row is inserted first, empty, with `ON CONFLICT DO NOTHING`: a
/// transaction that meets another's uncommitted insert of the same key waits
/// for it to end, and then reads and locks the committed row. Inserts and
/// locks both go in key order, so concurrent batches cannot deadlock. Empty
/// rows never outlive the transaction unwritten: `store` writes every key.
pub async fn load_for_update(tx: &mut PgConnection, keys: &[RowKey]) -> Result<HashMap<RowKey, EntityState>, sqlx::Error> {
    let (views, entities): (Vec<&str>, Vec<&str>) = keys.iter().map(|(v, e)| (v.as_str(), e.as_str())).unzip();
    sqlx::query(
        "INSERT INTO feature_state (view, entity, state, newest_event_at)
         SELECT k.view, k.entity, $3, to_timestamp(0)
         FROM UNNEST($1::text[], $2::text[]) AS k(view, entity)
         ORDER BY k.view, k.entity
         ON CONFLICT (view, entity) DO NOTHING",
    )
    .bind(&views)
    .bind(&entities)
    .bind(codec::encode(&EntityState::default()))
    .execute(&mut *tx)
    .await?;
    let rows: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT s.view, s.entity, s.state FROM feature_state s
         JOIN UNNEST($1::text[], $2::text[]) AS k(view, entity) ON s.view = k.view AND s.entity = k.entity
         ORDER BY s.view, s.entity FOR UPDATE OF s",
    )
    .bind(&views)
    .bind(&entities)
    .fetch_all(&mut *tx)
    .await?;
    rows.into_iter().map(|(view, entity, state)| Ok(((view, entity), decode(&state)?))).collect()
}

/// Writes `rows` back, inserting the new ones, in one statement.
pub async fn store(tx: &mut PgConnection, rows: &[(RowKey, EntityState)]) -> Result<(), sqlx::Error> {
    let mut views = Vec::with_capacity(rows.len());
    let mut entities = Vec::with_capacity(rows.len());
    let mut states = Vec::with_capacity(rows.len());
    let mut newest = Vec::with_capacity(rows.len());
    for ((view, entity), state) in rows {
        views.push(view.as_str());
        entities.push(entity.as_str());
        states.push(codec::encode(state));
        newest.push(state.newest_ms);
    }
    sqlx::query(
        "INSERT INTO feature_state (view, entity, state, newest_event_at, updated_at)
         SELECT v, e, s, to_timestamp(n / 1000.0), now()
         FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::int8[]) AS r(v, e, s, n)
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
pub async fn read(pool: &PgPool, views: &[&str], entities: &[&str]) -> Result<HashMap<RowKey, EntityState>, sqlx::Error> {
    let rows: Vec<(String, String, Vec<u8>)> =
        sqlx::query_as("SELECT view, entity, state FROM feature_state WHERE view = ANY($1) AND entity = ANY($2)")
            .bind(views)
            .bind(entities)
            .fetch_all(pool)
            .await?;
    rows.into_iter().map(|(view, entity, state)| Ok(((view, entity), decode(&state)?))).collect()
}

fn decode(bytes: &[u8]) -> Result<EntityState, sqlx::Error> {
    codec::decode(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// The NOTIFY channel on which each commit names the rows it changed.
pub const CHANGES_CHANNEL: &str = "freshet_state_changed";

/// Postgres refuses NOTIFY payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7999;

/// Announces, inside `tx`, the rows it changes. Notifications are delivered
/// when (and only if) `tx` commits.
pub async fn notify_changes(tx: &mut PgConnection, keys: &[RowKey]) -> Result<(), sqlx::Error> {
    let payloads = change_payloads(keys);
    sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::text[]) AS p").bind(CHANGES_CHANNEL).bind(&payloads).execute(&mut *tx).await?;
    Ok(())
}

/// `keys` as JSON arrays of `[view, entity]` pairs, each payload under
/// Postgres's limit, measured as written (escapes included: a control
/// character takes six bytes). A key is at most 1 KiB and a view name 128
/// bytes (both checked on the way in), so every key fits in a payload alone.
fn change_payloads(keys: &[RowKey]) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut payload = String::from("[");
    for key in keys {
        let entry = serde_json::to_string(key).expect("strings serialize");
        if payload.len() + entry.len() + 1 > MAX_PAYLOAD && payload.len() > 1 {
            payload.push(']');
            payloads.push(std::mem::replace(&mut payload, String::from("[")));
        }
        if payload.len() > 1 {
            payload.push(',');
        }
        payload.push_str(&entry);
    }
    if payload.len() > 1 {
        payload.push(']');
        payloads.push(payload);
    }
    payloads
}

/// The rows named by one notification payload.
pub fn parse_changes(payload: &str) -> Vec<RowKey> {
    serde_json::from_str(payload).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_payloads_stay_under_the_limit_whatever_the_escaping() {
        // 1000 control characters take 6000 bytes once escaped.
        let nasty: String = (0..1000).map(|i| char::from(1 + (i % 30) as u8)).collect();
        let keys: Vec<RowKey> = (0..40).map(|i| ("user_activity".to_string(), format!("{nasty}{i}"))).collect();
        let payloads = change_payloads(&keys);
        assert!(payloads.iter().all(|p| p.len() <= MAX_PAYLOAD), "{:?}", payloads.iter().map(String::len).collect::<Vec<_>>());
        let back: Vec<RowKey> = payloads.iter().flat_map(|p| parse_changes(p)).collect();
        assert_eq!(back, keys);
        assert!(change_payloads(&[]).is_empty());
    }

    #[test]
    fn change_payloads_round_trip() {
        let keys = vec![("orders".to_string(), "42".to_string()), ("user_activity".to_string(), "a\"b\t\n".to_string())];
        let payload = serde_json::to_string(&keys.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(parse_changes(&payload), keys);
        assert!(parse_changes("not json").is_empty());
    }
}
