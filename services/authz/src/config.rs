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
    /// Database URL (`sqlite://…?mode=rwc` or `postgres://…`). On PostgreSQL its role must
    /// own nothing and have neither SUPERUSER nor BYPASSRLS.
    #[arg(long = "authz-database-url", env = "PENNY_AUTHZ_DATABASE_URL")]
    pub database_url: String,
    /// PostgreSQL: the owner's URL, used only to migrate and to grant the serving role.
    #[arg(
        long = "authz-migration-database-url",
        env = "PENNY_AUTHZ_MIGRATION_DATABASE_URL"
    )]
    pub migration_database_url: Option<String>,
}

/// Everything the authz service needs.
#[derive(Debug, Clone)]
pub struct AuthzConfig {
    /// Where the authz database is (the serving role).
    pub database_url: String,
    /// The owner's URL for migrations (PostgreSQL).
    pub migration_database_url: Option<String>,
    /// How often the feed follower looks for changes made through other replicas.
    pub feed_poll: std::time::Duration,
}

impl Args {
    /// The validated configuration.
    pub fn into_config(self) -> AuthzConfig {
        AuthzConfig {
            database_url: self.database_url,
            migration_database_url: self.migration_database_url,
            feed_poll: crate::service::FEED_POLL,
        }
    }
}
