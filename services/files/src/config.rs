//! The files service's settings: `--files-*` flags with `PENNY_FILES_*` fallbacks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use crate::scan::ClamdAddr;

/// `penny serve files` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(
        long = "files-listen",
        env = "PENNY_FILES_LISTEN",
        default_value = "0.0.0.0:50055"
    )]
    pub listen: SocketAddr,
    /// Address of the HTTP listener that serves signed download URLs.
    #[arg(
        long = "files-http-listen",
        env = "PENNY_FILES_HTTP_LISTEN",
        default_value = "0.0.0.0:50065"
    )]
    pub http_listen: SocketAddr,
    /// How clients reach that listener, `http(s)://host[:port]` (no path): the base of
    /// every signed URL.
    #[arg(long = "files-public-url", env = "PENNY_FILES_PUBLIC_URL")]
    pub public_url: String,
    /// A file holding the key that signs download URLs (at least 32 random bytes, e.g.
    /// `head -c 32 /dev/urandom`). Changing it ends every URL made before.
    #[arg(
        long = "files-url-signing-key-file",
        env = "PENNY_FILES_URL_SIGNING_KEY_FILE"
    )]
    pub url_signing_key_file: PathBuf,
    /// Database URL (`sqlite://…?mode=rwc` or `postgres://…`). On PostgreSQL its role must
    /// own nothing and have neither SUPERUSER nor BYPASSRLS.
    #[arg(long = "files-database-url", env = "PENNY_FILES_DATABASE_URL")]
    pub database_url: String,
    /// PostgreSQL: the owner's URL, used only to migrate and to grant the serving role.
    #[arg(
        long = "files-migration-database-url",
        env = "PENNY_FILES_MIGRATION_DATABASE_URL"
    )]
    pub migration_database_url: Option<String>,
    /// The keys service (`http://host:port`), which makes each file's data key.
    #[arg(long = "files-keys-url", env = "PENNY_KEYS_URL")]
    pub keys_url: String,
    /// The directory holding the sealed objects.
    #[arg(long = "files-storage-dir", env = "PENNY_FILES_STORAGE_DIR")]
    pub storage_dir: Option<PathBuf>,
    /// Store the objects in this S3 bucket instead of a directory (it must exist);
    /// credentials come from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    #[arg(
        long = "files-s3-bucket",
        env = "PENNY_FILES_S3_BUCKET",
        conflicts_with = "storage_dir"
    )]
    pub s3_bucket: Option<String>,
    /// The endpoint of an S3-compatible service (`https://minio.internal:9000`); AWS when
    /// absent.
    #[arg(long = "files-s3-endpoint", env = "PENNY_FILES_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// The bucket's region.
    #[arg(
        long = "files-s3-region",
        env = "PENNY_FILES_S3_REGION",
        default_value = "us-east-1"
    )]
    pub s3_region: String,
    /// clamd: `tcp://host:port` or `unix:///path/to/clamd.sock`. Required: only
    /// `penny dev` may run without a scanner.
    #[arg(long = "files-clamd", env = "PENNY_FILES_CLAMD")]
    pub clamd: String,
    /// Seconds each clamd step (connect, a write, the verdict) may take; below the
    /// request deadline (30 s by default), so a stuck clamd makes files unscannable
    /// rather than the call time out.
    #[arg(long = "files-scan-timeout-secs", env = "PENNY_FILES_SCAN_TIMEOUT_SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub scan_timeout_secs: u64,
    /// Keep files that could not be scanned, in quarantine (never downloadable), instead
    /// of refusing them.
    #[arg(
        long = "files-quarantine-unscannable",
        env = "PENNY_FILES_QUARANTINE_UNSCANNABLE"
    )]
    pub quarantine_unscannable: bool,
    /// Seconds between two looks for tenants whose files use an older key version than
    /// their key's latest, whose rewrap this replica then starts (0: never; RewrapTenant
    /// still works).
    #[arg(long = "files-rewrap-every-secs", env = "PENNY_FILES_REWRAP_EVERY_SECS", default_value_t = crate::rewrap::DEFAULT_REWRAP_EVERY.as_secs(),
          value_parser = clap::value_parser!(u64).range(0..=604_800))]
    pub rewrap_every_secs: u64,
}

/// How files are scanned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScannerConfig {
    /// clamd, each step bounded by the timeout.
    Clamd(ClamdAddr, Duration),
    /// No scanning (every file taken as clean): `penny dev` and benchmarks only.
    None,
}

/// Object storage.
#[derive(Debug, Clone)]
pub enum StorageConfig {
    /// Files under a directory.
    Filesystem(PathBuf),
    /// Objects in an S3-compatible bucket.
    S3(crate::storage::S3Settings),
}

/// Signed download URLs: the key that signs them and the base they start with.
#[derive(Clone)]
pub struct SignedUrlConfig {
    /// The HMAC key (at least 32 bytes).
    pub key: zeroize::Zeroizing<Vec<u8>>,
    /// `http(s)://host[:port]` of the HTTP listener, as clients reach it.
    pub public_url: String,
}

impl std::fmt::Debug for SignedUrlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedUrlConfig")
            .field("public_url", &self.public_url)
            .finish_non_exhaustive()
    }
}

/// Everything the files service needs besides the standard server settings (which must
/// name the authz service: files checks permissions there and calls keys with its
/// credential).
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// Where the files database is (the serving role).
    pub database_url: String,
    /// The owner's URL for migrations (PostgreSQL).
    pub migration_database_url: Option<String>,
    /// The keys service.
    pub keys_url: String,
    /// Where objects go.
    pub storage: StorageConfig,
    /// The scanner.
    pub scanner: ScannerConfig,
    /// Keep unscannable files in quarantine instead of refusing them.
    pub quarantine_unscannable: bool,
    /// Incoming objects, unfinished commits and half-done deletions older than this are
    /// removed, at start and then this often.
    pub stale_after: Duration,
    /// How often to rewrap, in the background, the tenants whose files are behind their
    /// key's latest version (zero: never).
    pub rewrap_every: Duration,
    /// Signed download URLs.
    pub signed_urls: SignedUrlConfig,
}

impl Args {
    /// The configuration; fails naming the setting that is wrong.
    pub fn into_config(self) -> anyhow::Result<FilesConfig> {
        let clamd = ClamdAddr::parse(&self.clamd).with_context(|| {
            format!(
                "PENNY_FILES_CLAMD: {:?} is not tcp://host:port or unix:///path (only penny dev runs without a scanner)",
                self.clamd
            )
        })?;
        let key = std::fs::read(&self.url_signing_key_file).with_context(|| {
            format!(
                "PENNY_FILES_URL_SIGNING_KEY_FILE: cannot read {}",
                self.url_signing_key_file.display()
            )
        })?;
        let signed_urls = SignedUrlConfig {
            key: zeroize::Zeroizing::new(key),
            public_url: self.public_url,
        };
        crate::signed::UrlSigner::new(&signed_urls.key, &signed_urls.public_url).map_err(
            |why| {
                anyhow::anyhow!("PENNY_FILES_URL_SIGNING_KEY_FILE / PENNY_FILES_PUBLIC_URL: {why}")
            },
        )?;
        let storage = match (self.storage_dir, self.s3_bucket) {
            (Some(dir), None) => StorageConfig::Filesystem(dir),
            (None, Some(bucket)) => {
                let credential = |name: &str| {
                    std::env::var(name)
                        .ok()
                        .filter(|v| !v.is_empty())
                        .with_context(|| format!("PENNY_FILES_S3_BUCKET needs {name}"))
                };
                StorageConfig::S3(crate::storage::S3Settings {
                    bucket,
                    endpoint: self.s3_endpoint,
                    region: self.s3_region,
                    access_key_id: credential("AWS_ACCESS_KEY_ID")?,
                    secret_access_key: zeroize::Zeroizing::new(credential(
                        "AWS_SECRET_ACCESS_KEY",
                    )?),
                })
            }
            _ => anyhow::bail!(
                "set exactly one of PENNY_FILES_STORAGE_DIR (a directory) and PENNY_FILES_S3_BUCKET"
            ),
        };
        Ok(FilesConfig {
            database_url: self.database_url,
            migration_database_url: self.migration_database_url,
            keys_url: self.keys_url,
            storage,
            scanner: ScannerConfig::Clamd(clamd, Duration::from_secs(self.scan_timeout_secs)),
            quarantine_unscannable: self.quarantine_unscannable,
            stale_after: crate::service::DEFAULT_STALE_AFTER,
            rewrap_every: Duration::from_secs(self.rewrap_every_secs),
            signed_urls,
        })
    }
}
