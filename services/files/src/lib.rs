//! Penny files: streaming upload with limits, content sniffing, ClamAV scanning and
//! encryption at rest.
//!
//! Every byte of an upload goes through one pass — size limit, type detection, SHA-256,
//! clamd `INSTREAM`, AES-256-GCM sealing under a data key of the file's own — into an
//! incoming object; only a clean, complete file is recorded and moved to its final key.
//! Its metadata row holds the wrapped data key, never the key; the object holds no
//! plaintext. Downloads open the object segment by segment and stop at the first one that
//! fails its integrity check.

#![forbid(unsafe_code)]

pub mod config;
pub mod content;
pub mod domain;
mod grpc;
pub mod http;
pub mod migration;
pub mod rewrap;
pub mod scan;
pub mod seal;
pub mod service;
pub mod signed;
pub mod storage;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use penny_platform::{ServeConfig, ServiceBundle};
use tokio::net::TcpListener;

pub use config::{Args, FilesConfig, ScannerConfig, SignedUrlConfig, StorageConfig};
pub use service::Files;

/// The gRPC name of the service.
pub const SERVICE_NAME: &str = "penny.files.v1.FileService";

/// Connects the database (migrating it), the storage, the scanner and the keys service,
/// and sweeps what interrupted uploads left. The serve configuration must carry an
/// authorizer: files checks permissions through it and calls keys with its credential.
pub async fn build(config: FilesConfig, serve_config: &ServeConfig) -> anyhow::Result<Files> {
    let authorizer = serve_config.authorizer.clone().context(
        "files needs the authz service: set PENNY_AUTHZ_URL and PENNY_SERVICE_TOKEN_FILE",
    )?;
    let keys = tonic::transport::Endpoint::from_shared(config.keys_url.clone())
        .with_context(|| format!("PENNY_KEYS_URL: not a URL: {}", config.keys_url))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_lazy();
    let db = penny_platform::db::open::<migration::Migrator>(
        &config.database_url,
        config.migration_database_url.as_deref(),
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!("PENNY_FILES_DATABASE_URL: cannot open the files database: {e}")
    })?;
    let storage: Arc<dyn storage::ObjectStorage> = match &config.storage {
        StorageConfig::Filesystem(dir) => {
            Arc::new(storage::FsStorage::open(dir).with_context(|| {
                format!("PENNY_FILES_STORAGE_DIR: cannot use {}", dir.display())
            })?)
        }
        StorageConfig::S3(settings) => Arc::new(
            storage::S3Storage::connect(settings)
                .map_err(|e| anyhow::anyhow!("PENNY_FILES_S3_BUCKET: {e}"))?,
        ),
    };
    let scanner = match &config.scanner {
        ScannerConfig::Clamd(addr, timeout) => scan::Scanner::clamd(addr.clone(), *timeout),
        ScannerConfig::None => {
            tracing::warn!(
                "files: NO MALWARE SCANNING (scanner = none); every upload is taken as clean. Only for penny dev and benchmarks"
            );
            scan::Scanner::none()
        }
    };
    let signer = signed::UrlSigner::new(&config.signed_urls.key, &config.signed_urls.public_url)
        .map_err(|why| {
            anyhow::anyhow!("PENNY_FILES_PUBLIC_URL / PENNY_FILES_URL_SIGNING_KEY_FILE: {why}")
        })?;
    let files = Files::new(service::Parts {
        store: store::Store::new(db),
        storage,
        scanner,
        keys,
        authorizer,
        audit: serve_config.audit.clone(),
        quarantine_unscannable: config.quarantine_unscannable,
        signer,
    });
    files
        .sweep(config.stale_after)
        .await
        .context("files: cannot sweep interrupted uploads")?
        .log();
    // Zero (in tests) would sweep without pause, uploads in progress included.
    if !config.stale_after.is_zero() {
        files.sweep_periodically(config.stale_after);
    }
    if !config.rewrap_every.is_zero() {
        files.rewrap_periodically(config.rewrap_every);
    }
    Ok(files)
}

/// Who may call which RPC of this service (the table the standard stack enforces).
pub fn access_policy() -> penny_platform::AccessPolicy {
    grpc::policy()
}

/// The service on the standard stack.
pub fn bundle(files: Files, serve_config: &ServeConfig) -> ServiceBundle {
    grpc::bundle(files, serve_config)
}

/// Builds and serves the files service until `shutdown` resolves: gRPC on `listener`,
/// signed downloads over HTTP on `http_listener`.
pub async fn serve(
    config: FilesConfig,
    serve_config: ServeConfig,
    listener: TcpListener,
    http_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let files = build(config, &serve_config).await?;
    serve_built(files, serve_config, listener, http_listener, shutdown).await
}

/// Serves a built files service until `shutdown` resolves, then waits (at most
/// `COMMIT_DRAIN`) for the uploads still committing, those whose client went away included.
pub async fn serve_built(
    files: Files,
    serve_config: ServeConfig,
    listener: TcpListener,
    http_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let router = http::router(files.clone());
    let bundle = bundle(files.clone(), &serve_config);
    let served = penny_platform::http::serve_with_http(
        serve_config,
        bundle,
        listener,
        Some((router, http_listener)),
        shutdown,
    )
    .await;
    // A commit whose client went away runs on in a task of its own, which the servers'
    // drain does not see: give it time to finish. What it cannot finish the sweep removes.
    if !files.wait_for_uploads(COMMIT_DRAIN).await {
        tracing::warn!(
            "files: uploads still committing {COMMIT_DRAIN:?} after the servers stopped; a later sweep removes what they leave"
        );
    }
    served
}

/// How long shutdown waits for uploads still committing after the servers have stopped.
const COMMIT_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);
