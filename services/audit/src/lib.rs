//! Penny audit: a tamper-evident trail per tenant that survives GDPR erasure.
//!
//! Producers (the fleet's services) `Append` batches of events, idempotent on event id.
//! Each tenant's events form a hash chain; the personal part of an event enters the chain
//! only through a salted digest, so `Redact` removes it and every hash still verifies.
//! `VerifyChain` walks a chain and its signed checkpoints and names the first bad event;
//! `Export` writes it as JSON lines for `penny audit verify`. The serving database role
//! can add events and read them but not change or delete one, nor a checkpoint or a
//! redaction record; it can delete payloads (that is redaction) and move a chain's head
//! forward only (PostgreSQL grants and triggers; SQLite triggers, which whoever owns the
//! file can drop: signed checkpoints are what such a writer cannot forge).

#![forbid(unsafe_code)]

pub mod chain;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod export;
mod grpc;
pub mod migration;
pub mod monitor;
pub mod offline;
pub mod service;
pub mod store;

use std::future::Future;

use penny_platform::{ServeConfig, ServiceBundle};
use tokio::net::TcpListener;

pub use config::{Args, AuditConfig};
pub use service::Audit;

/// The gRPC name of the service.
pub const SERVICE_NAME: &str = "penny.audit.v1.AuditService";

/// Connects the database (migrating it, and on PostgreSQL taking from the serving role
/// every right to change a written event), and starts the monitor, which acts through the
/// auth service and the credential of `serve_config` and the tenants service of `config`.
pub async fn build(config: AuditConfig, serve_config: &ServeConfig) -> anyhow::Result<Audit> {
    let db = penny_platform::db::open_limited::<migration::Migrator>(
        &config.database_url,
        config.migration_database_url.as_deref(),
        migration::SERVING_ROLE_LIMITS,
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!("PENNY_AUDIT_DATABASE_URL: cannot open the audit database: {e}")
    })?;
    let signer = checkpoint::Signer::new(config.checkpoint_key.clone());
    let trusted = checkpoint::TrustedKeys::default()
        .with(signer.key_id(), signer.public_key())
        .with_jwks(&config.previous_checkpoint_keys);
    let store = store::Store::new(db.clone(), signer, config.checkpoint_every);
    let rules = config
        .monitor_rules
        .unwrap_or(monitor::rules::RuleSet { rules: Vec::new() });
    let monitor = {
        {
            let tenants = config
                .tenants_url
                .as_ref()
                .map(|url| {
                    tonic::transport::Endpoint::from_shared(url.clone())
                        .map_err(|_| anyhow::anyhow!("PENNY_AUDIT_TENANTS_URL: not a URL: {url}"))
                        .map(|endpoint| endpoint.connect_lazy())
                })
                .transpose()?;
            let enforcers = monitor::Enforcers {
                auth: serve_config.auth.clone(),
                tenants,
                credential: serve_config.authorizer.clone(),
            };
            monitor::Monitor::new(db, store.clone(), rules, enforcers)?
        }
    };
    let audit = Audit::new(store, trusted, monitor);
    audit.spawn_checkpoints(config.checkpoint_interval);
    Ok(audit)
}

/// Who may call which RPC of this service (the table the standard stack enforces).
pub fn access_policy() -> penny_platform::AccessPolicy {
    grpc::policy()
}

/// The service on the standard stack.
pub fn bundle(audit: Audit, serve_config: &ServeConfig) -> ServiceBundle {
    grpc::bundle(audit, serve_config)
}

/// Builds and serves the audit service until `shutdown` resolves.
pub async fn serve(
    config: AuditConfig,
    serve_config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let audit = build(config, &serve_config).await?;
    let bundle = bundle(audit, &serve_config);
    penny_platform::serve(serve_config, bundle, listener, shutdown).await
}
