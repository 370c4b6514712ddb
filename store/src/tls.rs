//! The crypto backend of every TLS connection of the process.
//!
//! rustls picks its backend from its crate features, and this build has two:
//! tonic asks for ring, pgwire-replication (the direct Postgres source) for
//! aws-lc-rs. With both, rustls refuses to guess and building a TLS config
//! panics, so each binary installs ring before anything uses TLS
//! (`tests/tests/security.rs` serves TLS with both backends compiled in).

/// Makes ring the process's rustls backend (a no-op if one is installed).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
