//! Penny tenants: tenants with their plan and security policy, users, workspaces.
//!
//! A tenant is created with its key (KeyService) and its owner's `owner` binding
//! (AuthzService) by a saga that never leaves anything half-made ACTIVE; memberships and
//! roles live in authz, credentials in auth. The platform tenant, seeded by the first
//! migration, holds the platform's staff and cannot be deleted.

#![forbid(unsafe_code)]

pub mod config;
pub mod domain;
pub mod error;
mod grpc;
pub mod migration;
pub mod service;
pub mod store;

use std::future::Future;

use anyhow::Context as _;
use penny_platform::{ServeConfig, ServiceBundle};
use tokio::net::TcpListener;

pub use config::{Args, TenantsConfig};
pub use service::Tenants;

/// The gRPC name of the service.
pub const SERVICE_NAME: &str = "penny.tenants.v1.TenantService";

/// Connects the database (migrating it) and the services the sagas call. The serve
/// configuration must carry an authorizer: tenants calls authz through it.
pub async fn build(config: TenantsConfig, serve_config: &ServeConfig) -> anyhow::Result<Tenants> {
    let authorizer = serve_config.authorizer.clone().context(
        "tenants needs the authz service: set PENNY_AUTHZ_URL and PENNY_SERVICE_TOKEN_FILE",
    )?;
    let keys = tonic::transport::Endpoint::from_shared(config.keys_url.clone())
        .with_context(|| format!("PENNY_KEYS_URL: not a URL: {}", config.keys_url))?
        .connect_lazy();
    let files = config
        .files_url
        .as_ref()
        .map(|url| {
            tonic::transport::Endpoint::from_shared(url.clone())
                .with_context(|| format!("PENNY_FILES_URL: not a URL: {url}"))
                .map(|endpoint| {
                    endpoint
                        .connect_timeout(std::time::Duration::from_secs(5))
                        .connect_lazy()
                })
        })
        .transpose()?;
    let db = penny_platform::db::open::<migration::Migrator>(
        &config.database_url,
        config.migration_database_url.as_deref(),
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!("PENNY_TENANTS_DATABASE_URL: cannot open the tenants database: {e}")
    })?;
    Ok(Tenants::new(
        store::Store::new(db),
        keys,
        authorizer,
        serve_config.auth.clone(),
        files,
    ))
}

/// Who may call which RPC of this service (the table the standard stack enforces).
pub fn access_policy() -> penny_platform::AccessPolicy {
    grpc::policy()
}

/// The service on the standard stack.
pub fn bundle(tenants: Tenants, serve_config: &ServeConfig) -> ServiceBundle {
    grpc::bundle(tenants, serve_config)
}

/// Builds and serves the tenants service until `shutdown` resolves.
pub async fn serve(
    config: TenantsConfig,
    serve_config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tenants = build(config, &serve_config).await?;
    let bundle = bundle(tenants, &serve_config);
    penny_platform::serve(serve_config, bundle, listener, shutdown).await
}
