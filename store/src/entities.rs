//! Feature state in Postgres: per (view, entity), a *base* row in
//! `feature_state` and the *deltas* later commits appended to
//! `feature_deltas` (see `state.rs` for what a delta is and why merging them
//! commutes).
//!
//! - Ingest commits [`append`] one delta per touched entity: no read, no
//!   lock, so a commit costs what its batch changed, and two instances
//!   committing one entity at once never conflict.
//! - Readers [`read`] a request's bases and deltas in one statement (one
//!   snapshot) and merge them in id order.
//! - [`compact`] folds deltas into their bases and deletes them, in its own
//!   transaction, so state and read cost stay bounded. Compactors take whole
//!   entities, skip deltas another compactor holds, and lock bases (creating
//!   missing ones first, since `FOR UPDATE` cannot lock a row that is not
//!   there), so two of them never fold one delta twice or lose a fold.
//!
//! Lists go to Postgres as arrays (`UNNEST`, `= ANY`), never as SQL text.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool};

use crate::{codec, state::EntityState};

/// Identifies a row: (view name, canonical entity key).
pub type RowKey = (String, String);

/// Appends, in `tx`, what a commit changed: one delta per (view, entity).
pub async fn append(tx: &mut PgConnection, deltas: &[(RowKey, EntityState)]) -> Result<(), sqlx::Error> {
    let mut views = Vec::with_capacity(deltas.len());
    let mut entities = Vec::with_capacity(deltas.len());
    let mut blobs = Vec::with_capacity(deltas.len());
    for ((view, entity), delta) in deltas {
        views.push(view.as_str());
        entities.push(entity.as_str());
        blobs.push(codec::encode(delta));
    }
    sqlx::query("INSERT INTO feature_deltas (view, entity, delta) SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[])")
        .bind(&views)
        .bind(&entities)
        .bind(&blobs)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Reads the state of every (view, entity) pair of `views` × `entities`,
/// bases merged with their deltas, in one statement; a pair never seen is
/// absent from the map.
pub async fn read(pool: &PgPool, views: &[&str], entities: &[&str]) -> Result<HashMap<RowKey, EntityState>, sqlx::Error> {
    let rows: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT view, entity, state FROM (
             SELECT view, entity, 0::int8 AS id, state FROM feature_state WHERE view = ANY($1) AND entity = ANY($2)
             UNION ALL
             SELECT view, entity, id, delta FROM feature_deltas WHERE view = ANY($1) AND entity = ANY($2)
         ) AS parts ORDER BY view, entity, id",
    )
    .bind(views)
    .bind(entities)
    .fetch_all(pool)
    .await?;
    let mut states: HashMap<RowKey, EntityState> = HashMap::new();
    for (view, entity, blob) in rows {
        let part = decode(&blob)?;
        match states.entry((view, entity)) {
            std::collections::hash_map::Entry::Occupied(mut state) => state.get_mut().merge(&part),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(part);
            }
        }
    }
    Ok(states)
}

/// The id of the newest delta, if any: a compaction pass folds the entities
/// with deltas up to it.
pub async fn newest_delta(pool: &PgPool) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT max(id) FROM feature_deltas").fetch_one(pool).await
}

/// Folds every delta of up to `entities` entities (those with the oldest
/// deltas, among deltas up to `cutoff`) into their bases, `prune`s each base
/// (drop what no window can reach), and deletes the folded deltas, in one
/// transaction. Returns how many deltas it folded: 0 once no delta up to
/// `cutoff` is left (or free: another compactor holds it).
pub async fn compact(pool: &PgPool, entities: i64, cutoff: i64, prune: impl Fn(&str, &mut EntityState)) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // As for commits: a crash loses the fold and its deletes together.
    sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *tx).await?;
    let deltas: Vec<(i64, String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT d.id, d.view, d.entity, d.delta FROM feature_deltas d
         JOIN (SELECT DISTINCT view, entity FROM (
                   SELECT view, entity FROM feature_deltas WHERE id <= $2 ORDER BY id LIMIT $1
               ) AS oldest) AS e
           ON d.view = e.view AND d.entity = e.entity
         ORDER BY d.id FOR UPDATE OF d SKIP LOCKED",
    )
    .bind(entities)
    .bind(cutoff)
    .fetch_all(&mut *tx)
    .await?;
    if deltas.is_empty() {
        return Ok(0);
    }
    let mut keys: Vec<RowKey> = deltas.iter().map(|(_, v, e, _)| (v.clone(), e.clone())).collect();
    keys.sort();
    keys.dedup();
    let mut bases = lock_bases(&mut tx, &keys).await?;
    for (_, view, entity, blob) in &deltas {
        let base = bases.get_mut(&(view.clone(), entity.clone())).expect("every key has a base row");
        base.merge(&decode(blob)?);
    }
    let rows: Vec<(RowKey, EntityState)> = bases
        .into_iter()
        .map(|(key, mut state)| {
            prune(&key.0, &mut state);
            (key, state)
        })
        .collect();
    store(&mut tx, &rows).await?;
    let ids: Vec<i64> = deltas.iter().map(|(id, ..)| *id).collect();
    sqlx::query("DELETE FROM feature_deltas WHERE id = ANY($1)").bind(&ids).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(deltas.len())
}

/// Locks and reads the base rows of `keys` in `tx`, inserting missing ones
/// (empty) first: `FOR UPDATE` locks only rows that exist, and two
/// transactions that both found none would both start from an empty state,
/// the second write replacing the first (a lost update). Inserts and locks
/// go in key order, so concurrent callers cannot deadlock.
async fn lock_bases(tx: &mut PgConnection, keys: &[RowKey]) -> Result<HashMap<RowKey, EntityState>, sqlx::Error> {
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

/// Writes base rows, inserting the new ones, in one statement (compaction,
/// and tests that set up state directly).
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

fn decode(bytes: &[u8]) -> Result<EntityState, sqlx::Error> {
    codec::decode(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// The NOTIFY channel on which each commit names the rows it changed.
pub const CHANGES_CHANNEL: &str = "freshet_state_changed";

/// Postgres refuses NOTIFY payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7999;

/// Announces, inside `tx`, the rows it changes. Notifications are delivered
/// when (and only if) `tx` commits.
pub async fn notify_changes<'a>(tx: &mut PgConnection, keys: impl IntoIterator<Item = &'a RowKey>) -> Result<(), sqlx::Error> {
    let payloads = change_payloads(keys);
    sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::text[]) AS p").bind(CHANGES_CHANNEL).bind(&payloads).execute(&mut *tx).await?;
    Ok(())
}

/// `keys` as JSON arrays of `[view, entity]` pairs, each payload under
/// Postgres's limit, measured as written (escapes included: a control
/// character takes six bytes). A key is at most 1 KiB and a view name 128
/// bytes (both checked on the way in), so every key fits in a payload alone.
fn change_payloads<'a>(keys: impl IntoIterator<Item = &'a RowKey>) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut payload = String::from("[");
    for key in keys {
        let entry = serde_json::to_string(key).expect("strings serialize");
        // Room for the comma before it and the closing bracket after it.
        if payload.len() + 1 + entry.len() + 1 > MAX_PAYLOAD && payload.len() > 1 {
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
        assert!(change_payloads(&[] as &[RowKey]).is_empty());
    }

    #[test]
    fn change_payloads_stay_under_the_limit_at_every_boundary() {
        // Keys of one length fill a payload to every possible end: at entity
        // length 10 ("v" view) a full payload once came to 8000 bytes, which
        // Postgres refuses, and the commit failed on every retry.
        for len in 1..=60 {
            let keys: Vec<RowKey> = (0..2000).map(|i| ("v".to_string(), format!("{i:0len$}"))).collect();
            let payloads = change_payloads(&keys);
            assert!(payloads.iter().all(|p| p.len() <= MAX_PAYLOAD), "entity length {len}: {:?}", payloads.iter().map(String::len).max());
            assert_eq!(payloads.iter().flat_map(|p| parse_changes(p)).collect::<Vec<_>>(), keys);
        }
    }

    #[test]
    fn change_payloads_round_trip() {
        let keys = vec![("orders".to_string(), "42".to_string()), ("user_activity".to_string(), "a\"b\t\n".to_string())];
        let payload = serde_json::to_string(&keys.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(parse_changes(&payload), keys);
        assert!(parse_changes("not json").is_empty());
    }
}
