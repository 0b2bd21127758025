//! Penny authorization: roles, role bindings and decisions with a hard tenant boundary.
//!
//! Owns the permission matrix (the four built-in roles of the security guide plus each
//! tenant's custom roles), role bindings at tenant or workspace scope, and the decisions:
//! `Check`, `BatchCheck`, `ListPermissions`, `Explain`. The tenant boundary is checked
//! before any role, decisions deny by default, and nobody can grant what they do not hold.
//! Every change is published on a feed (`WatchChanges`) that caches subscribe to.

#![forbid(unsafe_code)]

pub mod config;
pub mod domain;
pub mod error;
mod grpc;
pub mod migration;
pub mod service;
pub mod store;

use std::future::Future;

use penny_platform::principal::PLATFORM_TENANT_ID;
use penny_platform::{ServeConfig, ServiceBundle};
use tokio::net::TcpListener;

pub use config::{Args, AuthzConfig};
pub use service::Authz;

/// The gRPC name of the service.
pub const SERVICE_NAME: &str = "penny.authz.v1.AuthzService";

/// Connects the database (migrating it) and starts following the change feed.
pub async fn build(config: AuthzConfig) -> anyhow::Result<Authz> {
    let db = penny_platform::db::open::<migration::Migrator>(
        &config.database_url,
        config.migration_database_url.as_deref(),
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!("PENNY_AUTHZ_DATABASE_URL: cannot open the authz database: {e}")
    })?;
    Ok(Authz::new(store::Store::new(db), PLATFORM_TENANT_ID, config.feed_poll).await?)
}

/// Who may call which RPC of this service (the table the standard stack enforces).
pub fn access_policy() -> penny_platform::AccessPolicy {
    grpc::policy()
}

/// The service on the standard stack.
pub fn bundle(authz: Authz, serve_config: &ServeConfig) -> ServiceBundle {
    grpc::bundle(authz, serve_config)
}

/// Builds and serves the authz service until `shutdown` resolves.
pub async fn serve(
    config: AuthzConfig,
    serve_config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let authz = build(config).await?;
    let bundle = bundle(authz, &serve_config);
    penny_platform::serve(serve_config, bundle, listener, shutdown).await
}
