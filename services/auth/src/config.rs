//! The auth service's settings: `--auth-*` flags with `PENNY_AUTH_*` fallbacks.

use std::net::SocketAddr;

/// `penny serve auth` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(
        long = "auth-listen",
        env = "PENNY_AUTH_LISTEN",
        default_value = "0.0.0.0:50051"
    )]
    pub listen: SocketAddr,
    /// Address of the plain-HTTP listener that serves the JWKS at
    /// `/.well-known/jwks.json`, for verifiers that do not speak gRPC.
    #[arg(
        long = "auth-http-listen",
        env = "PENNY_AUTH_HTTP_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub http_listen: SocketAddr,
    /// Database URL (`sqlite://…?mode=rwc` or `postgres://…`). On PostgreSQL its role must
    /// own nothing and have neither SUPERUSER nor BYPASSRLS.
    #[arg(long = "auth-database-url", env = "PENNY_AUTH_DATABASE_URL")]
    pub database_url: String,
    /// PostgreSQL: the owner's URL, used only to migrate and to grant the serving role.
    #[arg(
        long = "auth-migration-database-url",
        env = "PENNY_AUTH_MIGRATION_DATABASE_URL"
    )]
    pub migration_database_url: Option<String>,
    /// The tenants service (`http://host:port`): users, their status and the tenant's
    /// security policy.
    #[arg(long = "auth-tenants-url", env = "PENNY_TENANTS_URL")]
    pub tenants_url: String,
    /// The keys service (`http://host:port`), which seals TOTP secrets and token-signing
    /// keys. Auth is not ready until it has loaded (or made) its signing key through it.
    #[arg(long = "auth-keys-url", env = "PENNY_KEYS_URL")]
    pub keys_url: String,
    /// JSON file listing the service clients that may trade a client id and secret for a
    /// service token (`IssueServiceToken`): `[{"client_id", "name", "secret_sha256",
    /// "scopes"}]`. Only hashes: the file holds no secret. At every start the stored clients
    /// are made exactly these; a client no longer listed is revoked and its tokens refused.
    #[arg(
        long = "auth-service-clients-file",
        env = "PENNY_AUTH_SERVICE_CLIENTS_FILE"
    )]
    pub service_clients_file: Option<std::path::PathBuf>,
    /// How often the token-signing key is replaced, in seconds (default 30 days; at
    /// least 60). Keys are stored sealed by the keys service; every service trusts them
    /// through auth's JWKS (PENNY_AUTH_URL).
    #[arg(long = "auth-signing-key-rotation-secs", env = "PENNY_AUTH_SIGNING_KEY_ROTATION_SECS",
          default_value_t = 30 * 24 * 3600, value_parser = clap::value_parser!(u64).range(60..))]
    pub signing_key_rotation_secs: u64,
    /// How long a token from `IssueServiceToken` lives, in seconds (default 1 hour; 60 to
    /// 86400). Servers holding a service client renew theirs after three quarters of it.
    #[arg(long = "auth-service-token-lifetime-secs", env = "PENNY_AUTH_SERVICE_TOKEN_LIFETIME_SECS",
          default_value_t = 3600, value_parser = clap::value_parser!(u64).range(60..=86_400))]
    pub service_token_lifetime_secs: u64,
}

/// Everything the auth service needs besides the standard server settings (which must
/// name the authz service: roles for the token come from its bindings).
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Where the auth database is (the serving role).
    pub database_url: String,
    /// The owner's URL for migrations (PostgreSQL).
    pub migration_database_url: Option<String>,
    /// The tenants service.
    pub tenants_url: String,
    /// The keys service.
    pub keys_url: String,
    /// How often the signing key is replaced.
    pub signing_key_rotation: std::time::Duration,
    /// The service clients to provision; `None` leaves the stored ones as they are.
    pub service_clients: Option<Vec<crate::service_tokens::ClientSpec>>,
    /// How long an issued service token lives.
    pub service_token_lifetime: std::time::Duration,
}

impl Args {
    /// The configuration; fails naming the setting when the clients file is unreadable.
    pub fn into_config(self) -> anyhow::Result<AuthConfig> {
        let service_clients = self
            .service_clients_file
            .as_deref()
            .map(crate::service_tokens::read_clients_file)
            .transpose()?;
        Ok(AuthConfig {
            service_clients,
            database_url: self.database_url,
            migration_database_url: self.migration_database_url,
            tenants_url: self.tenants_url,
            keys_url: self.keys_url,
            signing_key_rotation: std::time::Duration::from_secs(self.signing_key_rotation_secs),
            service_token_lifetime: std::time::Duration::from_secs(
                self.service_token_lifetime_secs,
            ),
        })
    }
}
