//! Penny authentication: passwords, sign-in with lockout, and the tokens every service
//! verifies.
//!
//! Built: the password policy and argon2id hashing, lockout counters kept exactly under
//! concurrency, set-password tokens (invites and resets), sign-in with TOTP MFA and IP
//! blocks, sessions with a revocation stream every service follows, API keys, and EdDSA
//! tokens signed with keys sealed by the keys service and rotated. Users and the tenant's
//! security policy come from the tenants service; the roles claim from authz's bindings.
//! Service clients trade their credentials for service tokens (`IssueServiceToken`).

#![forbid(unsafe_code)]

pub mod api_keys;
pub mod config;
pub mod domain;
pub mod error;
mod grpc;
pub mod http;
pub mod ip_blocks;
pub mod keyring;
pub mod mfa;
pub mod migration;
mod sealed;
pub mod service;
pub mod service_tokens;
pub mod sessions;
pub mod store;

use std::future::Future;

use anyhow::Context as _;
use penny_platform::{ServeConfig, ServiceBundle};
use tokio::net::TcpListener;

pub use config::{Args, AuthConfig};
pub use service::Auth;

/// How long auth waits for tenants or keys to answer one call.
const DEPENDENCY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The gRPC name of the service.
pub const SERVICE_NAME: &str = "penny.auth.v1.AuthService";

/// Connects the database (migrating it), loads (or makes) the signing key and prepares the
/// hashers.
/// The serve configuration must carry an authorizer: auth calls authz and tenants with the
/// service token it holds.
pub async fn build(config: AuthConfig, serve_config: &ServeConfig) -> anyhow::Result<Auth> {
    anyhow::ensure!(
        config.service_token_lifetime <= service_tokens::MAX_SERVICE_TOKEN_LIFETIME,
        "PENNY_AUTH_SERVICE_TOKEN_LIFETIME_SECS: at most 86400"
    );
    let authorizer = serve_config.authorizer.clone().context(
        "auth needs the authz service: set PENNY_AUTHZ_URL and PENNY_SERVICE_TOKEN_FILE",
    )?;
    // Every call to another service has a deadline: one that never answers must not hold
    // a sign-in (or the start) forever.
    let tenants = tonic::transport::Endpoint::from_shared(config.tenants_url.clone())
        .with_context(|| format!("PENNY_TENANTS_URL: not a URL: {}", config.tenants_url))?
        .timeout(DEPENDENCY_TIMEOUT)
        .connect_lazy();
    let keys = tonic::transport::Endpoint::from_shared(config.keys_url.clone())
        .with_context(|| format!("PENNY_KEYS_URL: not a URL: {}", config.keys_url))?
        .timeout(DEPENDENCY_TIMEOUT)
        .connect_lazy();
    let db = penny_platform::db::open::<migration::Migrator>(
        &config.database_url,
        config.migration_database_url.as_deref(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("PENNY_AUTH_DATABASE_URL: cannot open the auth database: {e}"))?;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let hasher = domain::password::PasswordHasherPool::new(cores)
        .map_err(|e| anyhow::anyhow!("password hasher: {e}"))?;
    let auth = Auth::new(
        store::Store::new(db),
        hasher,
        tenants,
        keys,
        authorizer,
        config.signing_key_rotation,
    )
    .with_service_token_lifetime(config.service_token_lifetime)
    .with_audit(serve_config.audit.clone());
    if let Some(clients) = &config.service_clients {
        let revoked = auth.provision_service_clients(clients).await.map_err(|e| {
            anyhow::anyhow!("PENNY_AUTH_SERVICE_CLIENTS_FILE: cannot provision: {e}")
        })?;
        tracing::info!(
            clients = clients.len(),
            revoked,
            "service clients provisioned"
        );
    }
    // The signing key is sealed by the keys service: load it now if keys answers (it
    // does in `penny dev` and the tests, which start keys first), else keep trying in the
    // background while the service reports not ready.
    let first_load = async {
        while auth.maintain_signing_keys().await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    };
    if tokio::time::timeout(std::time::Duration::from_secs(10), first_load)
        .await
        .is_err()
    {
        tracing::warn!(
            "no signing key yet; sign-in is unavailable (and health NOT_SERVING) until the keys service answers"
        );
    }
    auth.spawn_background();
    Ok(auth)
}

/// Who may call which RPC of this service (the table the standard stack enforces).
pub fn access_policy() -> penny_platform::AccessPolicy {
    grpc::policy()
}

/// The service on the standard stack.
pub fn bundle(auth: Auth, serve_config: &ServeConfig) -> ServiceBundle {
    grpc::bundle(auth, serve_config)
}

/// Builds and serves the auth service until `shutdown` resolves: gRPC on `listener`, and
/// the JWKS over HTTP on `http_listener` when there is one.
pub async fn serve(
    config: AuthConfig,
    serve_config: ServeConfig,
    listener: TcpListener,
    http_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let auth = build(config, &serve_config).await?;
    let router = http::router(auth.clone());
    let bundle = bundle(auth, &serve_config);
    penny_platform::http::serve_with_http(
        serve_config,
        bundle,
        listener,
        http_listener.map(|l| (router, l)),
        shutdown,
    )
    .await
}
