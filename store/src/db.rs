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
    match MIGRATOR.iter().find(|m| !applied.contains(&m.version)) {
        Some(m) => Err(DbError::NotMigrated { missing: m.version }),
        None => Ok(()),
    }
}
