//! Connecting to Freshet's Postgres store, applying its migrations, and
//! refusing to run against a database they have not been applied to.

use sqlx::{PgPool, postgres::PgPoolOptions};

/// The schema this build expects, embedded from `store/migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to Postgres: {0}")]
    Connect(#[source] sqlx::Error),
    #[error(
        "the database is not migrated (it lacks migration {missing}); run `freshet-server migrate` (or `freshet-ingest migrate`) first"
    )]
    NotMigrated { missing: i64 },
    #[error("the database's schema does not match its migrations (table {table}: {detail}); restore it or migrate a fresh database")]
    SchemaMismatch { table: &'static str, detail: String },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(DbError::Connect)
}

pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// The `migrate` subcommand of both binaries.
pub async fn migrate_command(url: &str) -> Result<(), DbError> {
    let pool = connect(url, 1).await?;
    migrate(&pool).await?;
    println!("migrations applied");
    Ok(())
}

/// Fails with a clear message unless every embedded migration is applied.
pub async fn ensure_migrated(pool: &PgPool) -> Result<(), DbError> {
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text").fetch_one(pool).await?;
    let applied: Vec<i64> = match table {
        Some(_) => sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success").fetch_all(pool).await?,
        None => Vec::new(),
    };
    if let Some(m) = MIGRATOR.iter().find(|m| !applied.contains(&m.version)) {
        return Err(DbError::NotMigrated { missing: m.version });
    }
    verify_schema(pool).await
}

/// The tables and columns both binaries use. The migrations table can claim
/// what is not there (a restored or hand-edited database): a run against
/// it would retry "relation does not exist" forever, so check the schema
/// itself too.
const SCHEMA: &[(&str, &str)] = &[
    ("feature_state", "view, entity, state, newest_event_at, updated_at"),
    (
        "ingest_offsets",
        "consumer_group, topic, partition, next_offset, owner_epoch, owner, high_watermark, newest_event_at, last_commit_at, \
         records_applied, records_dead, records_late",
    ),
    ("dead_letters", "consumer_group, topic, partition, \"offset\", dlq_topic, error_class, error_message, recorded_at"),
    ("view_owners", "view, consumer_group, since"),
    ("feature_deltas", "id, view, entity, delta"),
];

async fn verify_schema(pool: &PgPool) -> Result<(), DbError> {
    for (table, columns) in SCHEMA {
        let probe = format!("SELECT {columns} FROM {table} LIMIT 0");
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(probe)).execute(pool).await {
            return Err(match &e {
                sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42P01" | "42703")) => {
                    DbError::SchemaMismatch { table, detail: db.message().to_string() }
                }
                _ => DbError::Sql(e),
            });
        }
    }
    Ok(())
}
