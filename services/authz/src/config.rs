//! The authz service's settings: `--authz-*` flags with `PENNY_AUTHZ_*` fallbacks.

use std::net::SocketAddr;

/// `penny serve authz` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(
        long = "authz-listen",
        env = "PENNY_AUTHZ_LISTEN",
        default_value = "0.0.0.0:50053"
    )]
    pub listen: SocketAddr,
    /// Database URL (`sqlite://…?mode=rwc` or `postgres://…`).
    #[arg(long = "authz-database-url", env = "PENNY_AUTHZ_DATABASE_URL")]
    pub database_url: String,
}

/// Everything the authz service needs.
#[derive(Debug, Clone)]
pub struct AuthzConfig {
    /// Where the authz database is.
    pub database_url: String,
}

impl Args {
    /// The validated configuration.
    pub fn into_config(self) -> AuthzConfig {
        AuthzConfig {
            database_url: self.database_url,
        }
    }
}
