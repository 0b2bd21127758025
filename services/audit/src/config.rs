//! The audit service's settings: `--audit-*` flags with `PENNY_AUDIT_*` fallbacks.

use std::net::SocketAddr;

/// `penny serve audit` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(
        long = "audit-listen",
        env = "PENNY_AUDIT_LISTEN",
        default_value = "0.0.0.0:50054"
    )]
    pub listen: SocketAddr,
    /// Database URL (`sqlite://…?mode=rwc` or `postgres://…`). On PostgreSQL its role must
    /// own nothing and have neither SUPERUSER nor BYPASSRLS; it is granted INSERT and
    /// SELECT on the trail and nothing that changes a written event.
    #[arg(long = "audit-database-url", env = "PENNY_AUDIT_DATABASE_URL")]
    pub database_url: String,
    /// PostgreSQL: the owner's URL, used only to migrate and to grant the serving role.
    #[arg(
        long = "audit-migration-database-url",
        env = "PENNY_AUDIT_MIGRATION_DATABASE_URL"
    )]
    pub migration_database_url: Option<String>,
}

/// Everything the audit service needs.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Where the audit database is (the serving role).
    pub database_url: String,
    /// The owner's URL for migrations (PostgreSQL).
    pub migration_database_url: Option<String>,
}

impl Args {
    /// The configuration.
    pub fn into_config(self) -> AuditConfig {
        AuditConfig {
            database_url: self.database_url,
            migration_database_url: self.migration_database_url,
        }
    }
}
