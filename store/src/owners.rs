//! The `view_owners` table: which consumer group computes each view.
//!
//! Offsets live per (group, topic, partition), so nothing else stops a
//! second group, started by mistake with another `--group`, from reading
//! the same topics from the start into the same `feature_state` rows and
//! counting every event twice. A group *adopts* its views when ingest starts
//! and refuses those another group owns; every claim checks ownership in its
//! own transaction, holding the owner rows, so an instance of a group that
//! lost its views cannot take partitions back, even racing a take-over.
//! [`take_over`] moves views to another group in one transaction: the new
//! group continues from the old group's offsets (nothing skipped, nothing
//! twice) and the old group's partitions are fenced.

use sqlx::{PgConnection, PgPool};

#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error(
        "view {view:?} is computed by consumer group {owner:?}; another group would count its events twice. \
         Stop that group's instances and run `freshet-ingest take-over --group {group}` to move the views, with their offsets, to this group"
    )]
    OwnedByOther { view: String, owner: String, group: String },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// Makes `group` the owner of every view of `views` nobody owns, and fails
/// if another group owns one of them.
pub async fn adopt(pool: &PgPool, group: &str, views: &[&str]) -> Result<(), OwnershipError> {
    sqlx::query(
        "INSERT INTO view_owners (view, consumer_group) SELECT v, $2 FROM UNNEST($1::text[]) AS v ORDER BY v
         ON CONFLICT (view) DO NOTHING",
    )
    .bind(views)
    .bind(group)
    .execute(pool)
    .await?;
    check(&mut *pool.acquire().await?, group, views).await
}

/// Fails if a group other than `group` owns one of `views`. Inside a
/// transaction, it holds the owner rows (`FOR SHARE`) until the end of it,
/// so a take-over waits for the transaction or the transaction sees it.
pub async fn check(conn: &mut PgConnection, group: &str, views: &[&str]) -> Result<(), OwnershipError> {
    let owners: Vec<(String, String)> =
        sqlx::query_as("SELECT view, consumer_group FROM view_owners WHERE view = ANY($1) ORDER BY view FOR SHARE")
            .bind(views)
            .fetch_all(&mut *conn)
            .await?;
    match owners.into_iter().find(|(_, owner)| owner != group) {
        Some((view, owner)) => Err(OwnershipError::OwnedByOther { view, owner, group: group.to_string() }),
        None => Ok(()),
    }
}

/// What a take-over moved: (view, previous owning group).
pub type Moved = Vec<(String, Option<String>)>;

/// Moves `views`, computed from `topics`, to `group`: the new group's
/// offsets for those topics become the previous owner's, and the previous
/// owner's partitions are fenced (epoch bumped), all in one transaction.
pub async fn take_over(pool: &PgPool, group: &str, views: &[&str], topics: &[String]) -> Result<Moved, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let owned: Vec<(String, String)> =
        sqlx::query_as("SELECT view, consumer_group FROM view_owners WHERE view = ANY($1) ORDER BY view FOR UPDATE")
            .bind(views)
            .fetch_all(&mut *tx)
            .await?;
    let previous: Moved =
        views.iter().map(|v| (v.to_string(), owned.iter().find(|(view, _)| view == v).map(|(_, group)| group.clone()))).collect();
    let mut old_groups: Vec<&str> = previous.iter().filter_map(|(_, g)| g.as_deref()).filter(|g| *g != group).collect();
    old_groups.sort_unstable();
    old_groups.dedup();
    if old_groups.len() > 1 {
        // Two previous owners of one topic's views cannot both be continued.
        return Err(sqlx::Error::Protocol(format!(
            "the views are owned by several groups ({old_groups:?}); take them over one group at a time"
        )));
    }
    if let Some(old) = old_groups.first() {
        sqlx::query(
            "INSERT INTO ingest_offsets (consumer_group, topic, partition, next_offset, owner_epoch, newest_event_at, high_watermark)
             SELECT $1, topic, partition, next_offset, 0, newest_event_at, high_watermark
             FROM ingest_offsets WHERE consumer_group = $2 AND topic = ANY($3)
             ON CONFLICT (consumer_group, topic, partition) DO UPDATE
             SET next_offset = excluded.next_offset, newest_event_at = excluded.newest_event_at,
                 owner_epoch = ingest_offsets.owner_epoch + 1",
        )
        .bind(group)
        .bind(old)
        .bind(topics)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE ingest_offsets SET owner_epoch = owner_epoch + 1, owner = 'taken over by ' || $1
             WHERE consumer_group = $2 AND topic = ANY($3)",
        )
        .bind(group)
        .bind(old)
        .bind(topics)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO view_owners (view, consumer_group) SELECT v, $2 FROM UNNEST($1::text[]) AS v
         ON CONFLICT (view) DO UPDATE SET consumer_group = excluded.consumer_group, since = now()",
    )
    .bind(views)
    .bind(group)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(previous)
}
