//! Penny key management: per-tenant keyrings and envelope encryption.
//!
//! Owns each tenant's key (`penny-tenant-<uuid>`) and every operation on it: data keys for
//! envelope encryption, batch encrypt/decrypt/rewrap bound to a mandatory context,
//! rotation, minimum decryption version, and deletion (crypto-shredding). Two engines
//! behind one trait: Vault transit in production, an embedded engine (HKDF-derived KEKs
//! over a master key) for development and single-node installs. No plaintext key material
//! leaves this service except a data key handed to the caller that asked for it.

#![forbid(unsafe_code)]

pub mod config;
pub mod domain;
pub mod error;
mod grpc;
pub mod local;
pub mod migration;
pub mod store;
pub mod vault;

use std::future::Future;
use std::sync::Arc;

use penny_platform::{ServeConfig, ServiceBundle};
use tokio::net::TcpListener;

pub use config::{Args, BackendConfig, KeysConfig};
pub use domain::Keys;

/// The gRPC name of the service.
pub const SERVICE_NAME: &str = "penny.keys.v1.KeyService";

/// Connects the database (migrating it) and the engine.
pub async fn build(config: KeysConfig) -> anyhow::Result<Keys> {
    let db = penny_platform::db::open::<migration::Migrator>(
        &config.database_url,
        config.migration_database_url.as_deref(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("PENNY_KEYS_DATABASE_URL: cannot open the keys database: {e}"))?;
    let store = store::Store::new(db).await?;
    let backend: Arc<dyn domain::KeyBackend> = match config.backend {
        BackendConfig::Local(master) => Arc::new(local::LocalBackend::new(store, master)),
        BackendConfig::Vault(settings) => Arc::new(
            vault::VaultBackend::connect(settings, store)
                .await
                .map_err(|e| anyhow::anyhow!("vault: {e}"))?,
        ),
    };
    Ok(Keys::new(backend))
}

/// Who may call which RPC of this service (the table the standard stack enforces).
pub fn access_policy() -> penny_platform::AccessPolicy {
    grpc::policy()
}

/// The service on the standard stack.
pub fn bundle(keys: Keys, serve_config: &ServeConfig) -> ServiceBundle {
    grpc::bundle(keys, serve_config)
}

/// Builds and serves the keys service until `shutdown` resolves.
pub async fn serve(
    config: KeysConfig,
    serve_config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let keys = build(config).await?;
    let bundle = bundle(keys, &serve_config);
    penny_platform::serve(serve_config, bundle, listener, shutdown).await
}
