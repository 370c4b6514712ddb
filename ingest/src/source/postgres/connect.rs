//! From a source database URL to the two connections a slot needs: the
//! replication session (pgwire-replication) and ordinary SQL (sqlx), for the
//! snapshot and the slot's lag.
//!
//! The URL is libpq's (`postgres://user:password@host:port/db?sslmode=…`)
//! and comes from the environment variable the view names, never from the
//! views file. `sslmode` `require`, `verify-ca` and `verify-full` turn TLS
//! on for both connections; without it, or with `disable`, both are plain.

use std::str::FromStr;

use percent_encoding::percent_decode_str;
use pgwire_replication::config::{ReplicationConfig, TlsConfig};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// A source database, as its URL says.
#[derive(Debug, Clone)]
pub struct SourceDb {
    pub url: String,
    host: String,
    port: u16,
    user: String,
    password: String,
    pub database: String,
    tls: TlsConfig,
}

impl SourceDb {
    /// Reads the URL from `env` (the view's `source.url_env`).
    pub fn from_env(env: &str) -> anyhow::Result<SourceDb> {
        let url = std::env::var(env).map_err(|_| anyhow::anyhow!("{env} is not set: it must hold the source database's URL"))?;
        SourceDb::parse(&url).map_err(|e| anyhow::anyhow!("{env}: {e}"))
    }

    pub fn parse(text: &str) -> anyhow::Result<SourceDb> {
        let url = url::Url::parse(text).map_err(|e| anyhow::anyhow!("not a postgres:// URL: {e}"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            anyhow::bail!("not a postgres:// URL (scheme {:?})", url.scheme());
        }
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        let database = decode(url.path().trim_start_matches('/'));
        if database.is_empty() {
            anyhow::bail!("the URL names no database");
        }
        let sslmode = url.query_pairs().find(|(k, _)| k == "sslmode").map(|(_, v)| v.into_owned());
        let tls = match sslmode.as_deref() {
            None | Some("disable" | "allow" | "prefer") => TlsConfig::disabled(),
            Some("require") => TlsConfig::require(),
            Some("verify-ca") => TlsConfig::verify_ca(None),
            Some("verify-full") => TlsConfig::verify_full(None),
            Some(other) => anyhow::bail!("unknown sslmode {other:?}"),
        };
        Ok(SourceDb {
            url: text.to_string(),
            host: url.host_str().unwrap_or("localhost").to_string(),
            port: url.port().unwrap_or(5432),
            user: if url.username().is_empty() { "postgres".into() } else { decode(url.username()) },
            password: url.password().map(decode).unwrap_or_default(),
            database,
            tls,
        })
    }

    /// A replication session on `slot`, streaming `publication`.
    pub fn replication(&self, slot: &str, publication: &str) -> ReplicationConfig {
        ReplicationConfig::new(&self.host, &self.user, &self.password, &self.database, slot, publication)
            .with_port(self.port)
            .with_tls(self.tls.clone())
            // Confirmations reach the slot within a second of Freshet's
            // commit (10 s by default): less WAL kept, less replayed.
            .with_status_interval(std::time::Duration::from_secs(1))
            // Bounded: the session stops reading the socket while ingest
            // commits, instead of buffering the WAL in memory.
            .with_buffer_size(4096)
    }

    /// A small pool for the snapshot read and the slot's lag.
    pub async fn pool(&self) -> anyhow::Result<PgPool> {
        let options = PgConnectOptions::from_str(&self.url)?.application_name("freshet-ingest");
        Ok(PgPoolOptions::new().max_connections(2).connect_with(options).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libpq_urls() {
        let db = SourceDb::parse("postgres://app%40x:p%2Fw@db.example:6543/shop?sslmode=require").unwrap();
        assert_eq!((db.host.as_str(), db.port, db.user.as_str(), db.password.as_str()), ("db.example", 6543, "app@x", "p/w"));
        assert_eq!(db.database, "shop");
        assert!(db.tls.mode.requires_tls());
        let plain = SourceDb::parse("postgresql://127.0.0.1/app").unwrap();
        assert_eq!((plain.port, plain.user.as_str()), (5432, "postgres"));
        assert!(!plain.tls.mode.requires_tls());
        for bad in ["mysql://h/db", "postgres://h", "postgres://h/db?sslmode=maybe", "not a url"] {
            assert!(SourceDb::parse(bad).is_err(), "{bad}");
        }
    }
}
