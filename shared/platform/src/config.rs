//! Settings every server shares, from flags with `PENNY_*` environment fallbacks.
//!
//! Invalid settings fail at start with a message naming the setting, never at the first
//! request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use crate::authorizer::Authorizer;
use crate::credential::ServiceCredential;
use crate::principal::{Jwks, TokenVerifier};
use crate::server::{ServeConfig, TlsMaterial};
use crate::telemetry::LogFormat;

/// Largest gRPC message accepted by default (uploads stream in smaller chunks).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The standard server settings, flattened into each service's `Args`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// PEM certificate chain for TLS. Without it the server speaks plaintext h2c.
    #[arg(long, env = "PENNY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "PENNY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS).
    #[arg(long, env = "PENNY_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Per-request timeout in seconds (a shorter `grpc-timeout` from the caller wins).
    #[arg(long, env = "PENNY_REQUEST_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub request_timeout_secs: u64,
    /// Calls in flight before new ones are shed with UNAVAILABLE.
    #[arg(long, env = "PENNY_CONCURRENCY_LIMIT", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub concurrency_limit: u64,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "PENNY_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(1024..=64 * 1024 * 1024))]
    pub max_message_bytes: u64,
    /// Serve gRPC server reflection (for grpcurl). Switch off in production if preferred.
    #[arg(long, env = "PENNY_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,
    /// JWKS file holding the public keys that sign access tokens.
    #[arg(long, env = "PENNY_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "PENNY_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// The authz service (`http://host:port`) that decides permission requirements. Without
    /// it every permission requirement is refused. Needs this server's own credential: a
    /// service token file, or a service client.
    #[arg(long, env = "PENNY_AUTHZ_URL")]
    pub authz_url: Option<String>,
    /// File holding this service's bearer token, used as it is to call other services. The
    /// auth service needs one (signed by a key in the JWKS file); the others can use a
    /// service client instead.
    #[arg(long, env = "PENNY_SERVICE_TOKEN_FILE", conflicts_with = "client_id")]
    pub service_token_file: Option<PathBuf>,
    /// This service's client id at auth: its tokens come from `IssueServiceToken` and are
    /// renewed before they expire. Needs PENNY_CLIENT_SECRET_FILE and PENNY_AUTH_URL.
    #[arg(long, env = "PENNY_CLIENT_ID", requires_all = ["client_secret_file", "auth_url"])]
    pub client_id: Option<uuid::Uuid>,
    /// File holding the service client's secret.
    #[arg(long, env = "PENNY_CLIENT_SECRET_FILE", requires = "client_id")]
    pub client_secret_file: Option<PathBuf>,
    /// The auth service (`http://host:port`). With it, revoked sessions, users and API
    /// keys are refused as soon as auth announces them, and user credentials are refused
    /// while that cannot be confirmed. Needs PENNY_AUTHZ_URL and the service token.
    #[arg(long, env = "PENNY_AUTH_URL", requires = "authz_url")]
    pub auth_url: Option<String>,
    /// The audit service (`http://host:port`): every mutating or refused call is recorded
    /// there, batched, and spooled to PENNY_AUDIT_SPOOL_DIR while audit is unreachable.
    /// Needs this server's own credential.
    #[arg(long, env = "PENNY_AUDIT_URL", requires = "audit_spool_dir")]
    pub audit_url: Option<String>,
    /// Directory for audit events audit could not take yet (one per process; replayed in
    /// order once audit answers).
    #[arg(long, env = "PENNY_AUDIT_SPOOL_DIR", requires = "audit_url")]
    pub audit_spool_dir: Option<PathBuf>,
}

impl ServerArgs {
    /// Reads every file the settings name and builds the server configuration.
    pub fn serve_config(&self) -> anyhow::Result<ServeConfig> {
        let jwks_file = self.jwks_file.as_deref().context(
            "PENNY_JWKS_FILE (--jwks-file) is required: the JWKS that signs access tokens",
        )?;
        let verifier = load_verifier(jwks_file)?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsMaterial {
                cert_pem: read_setting("PENNY_TLS_CERT", cert)?,
                key_pem: read_setting("PENNY_TLS_KEY", key)?,
                client_ca_pem: self
                    .tls_client_ca
                    .as_deref()
                    .map(|ca| read_setting("PENNY_TLS_CLIENT_CA", ca))
                    .transpose()?,
            }),
            _ => None,
        };
        let auth = self
            .auth_url
            .as_ref()
            .map(|url| {
                tonic::transport::Endpoint::from_shared(url.clone())
                    .with_context(|| format!("PENNY_AUTH_URL: not a URL: {url}"))
                    .map(|endpoint| endpoint.connect_lazy())
            })
            .transpose()?;
        let credential = self.credential(auth.as_ref())?;
        let audit = match (&self.audit_url, &self.audit_spool_dir, &credential) {
            (Some(url), Some(dir), Some(credential)) => {
                let channel = tonic::transport::Endpoint::from_shared(url.clone())
                    .with_context(|| format!("PENNY_AUDIT_URL: not a URL: {url}"))?
                    .connect_lazy();
                Some(
                    crate::audit::AuditClient::new(channel, credential.clone(), dir.clone())
                        .with_context(|| {
                            format!("PENNY_AUDIT_SPOOL_DIR: cannot use {}", dir.display())
                        })?,
                )
            }
            (Some(_), _, None) => anyhow::bail!(
                "PENNY_AUDIT_URL needs this server's own credential: PENNY_SERVICE_TOKEN_FILE, or PENNY_CLIENT_ID with PENNY_CLIENT_SECRET_FILE"
            ),
            _ => None,
        };
        let authorizer = match (&self.authz_url, credential) {
            (Some(url), Some(credential)) => {
                let channel = tonic::transport::Endpoint::from_shared(url.clone())
                    .with_context(|| format!("PENNY_AUTHZ_URL: not a URL: {url}"))?
                    .connect_lazy();
                Some(Authorizer::new(channel, credential))
            }
            (Some(_), None) => anyhow::bail!(
                "PENNY_AUTHZ_URL needs this server's own credential: PENNY_SERVICE_TOKEN_FILE, or PENNY_CLIENT_ID with PENNY_CLIENT_SECRET_FILE"
            ),
            (None, _) => None,
        };
        Ok(ServeConfig {
            audit,
            auth,
            authorizer,
            tls,
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            concurrency_limit: usize::try_from(self.concurrency_limit).unwrap_or(usize::MAX),
            max_message_bytes: usize::try_from(self.max_message_bytes)
                .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
            reflection: self.reflection,
            verifier,
            readiness_interval: Duration::from_secs(5),
        })
    }
}

impl ServerArgs {
    /// This server's own credential, when one is configured.
    fn credential(
        &self,
        auth: Option<&tonic::transport::Channel>,
    ) -> anyhow::Result<Option<ServiceCredential>> {
        if let Some(token_file) = &self.service_token_file {
            let token = String::from_utf8(read_setting("PENNY_SERVICE_TOKEN_FILE", token_file)?)
                .context("PENNY_SERVICE_TOKEN_FILE: not UTF-8")?;
            let token = token.trim();
            anyhow::ensure!(
                !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()),
                "PENNY_SERVICE_TOKEN_FILE: not a token"
            );
            return Ok(Some(ServiceCredential::fixed(token)));
        }
        match (self.client_id, &self.client_secret_file, auth) {
            (Some(client_id), Some(secret_file), Some(auth)) => {
                let secret = zeroize::Zeroizing::new(
                    String::from_utf8(read_setting("PENNY_CLIENT_SECRET_FILE", secret_file)?)
                        .context("PENNY_CLIENT_SECRET_FILE: not UTF-8")?,
                );
                let secret = zeroize::Zeroizing::new(secret.trim().to_owned());
                anyhow::ensure!(!secret.is_empty(), "PENNY_CLIENT_SECRET_FILE: empty");
                Ok(Some(ServiceCredential::issued(
                    auth.clone(),
                    client_id,
                    secret,
                )))
            }
            _ => Ok(None),
        }
    }
}

/// A verifier for the JWKS in `path`.
pub fn load_verifier(path: &Path) -> anyhow::Result<TokenVerifier> {
    let bytes = read_setting("PENNY_JWKS_FILE", path)?;
    let jwks: Jwks = serde_json::from_slice(&bytes)
        .with_context(|| format!("PENNY_JWKS_FILE {}: not a JWKS", path.display()))?;
    TokenVerifier::new(&jwks)
        .with_context(|| format!("PENNY_JWKS_FILE {}: unusable key", path.display()))
}

fn read_setting(setting: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{setting}: cannot read {}", path.display()))
}
