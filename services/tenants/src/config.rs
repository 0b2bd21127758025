//! The tenants service's settings: `--tenants-*` flags with `PENNY_TENANTS_*` fallbacks.

use std::net::SocketAddr;

/// `penny serve tenants` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(
        long = "tenants-listen",
        env = "PENNY_TENANTS_LISTEN",
        default_value = "0.0.0.0:50056"
    )]
    pub listen: SocketAddr,
    /// Database URL (`sqlite://…?mode=rwc` or `postgres://…`). On PostgreSQL its role must
    /// own nothing and have neither SUPERUSER nor BYPASSRLS.
    #[arg(long = "tenants-database-url", env = "PENNY_TENANTS_DATABASE_URL")]
    pub database_url: String,
    /// PostgreSQL: the owner's URL, used only to migrate and to grant the serving role.
    #[arg(
        long = "tenants-migration-database-url",
        env = "PENNY_TENANTS_MIGRATION_DATABASE_URL"
    )]
    pub migration_database_url: Option<String>,
    /// The keys service (`http://host:port`), where each tenant's key is created.
    #[arg(long = "tenants-keys-url", env = "PENNY_KEYS_URL")]
    pub keys_url: String,
    /// The files service (`http://host:port`), which deletes a deleted tenant's files.
    /// Without it a deleted tenant's files are left in storage (unreadable: their key is
    /// gone), and DeleteTenant says so in the log.
    #[arg(long = "tenants-files-url", env = "PENNY_FILES_URL")]
    pub files_url: Option<String>,
}

/// Everything the tenants service needs besides the standard server settings (which must
/// name the authz service: tenants binds owners there).
#[derive(Debug, Clone)]
pub struct TenantsConfig {
    /// Where the tenants database is (the serving role).
    pub database_url: String,
    /// The owner's URL for migrations (PostgreSQL).
    pub migration_database_url: Option<String>,
    /// The keys service.
    pub keys_url: String,
    /// The files service, when the fleet runs one.
    pub files_url: Option<String>,
}

impl Args {
    /// The configuration.
    pub fn into_config(self) -> TenantsConfig {
        TenantsConfig {
            database_url: self.database_url,
            migration_database_url: self.migration_database_url,
            keys_url: self.keys_url,
            files_url: self.files_url.filter(|url| !url.is_empty()),
        }
    }
}
