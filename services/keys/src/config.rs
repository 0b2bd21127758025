//! The keys service's settings: `--keys-*` flags with `PENNY_KEYS_*` environment fallbacks,
//! plus Vault's standard variables. Secrets (`PENNY_MASTER_KEY`, `VAULT_TOKEN`) are read
//! from the environment or a file only, never from a flag that `ps` would show.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use zeroize::Zeroizing;

use crate::local::MasterKey;
use crate::vault::{VaultAuth, VaultSettings};

/// Which engine holds key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// The embedded engine (master key + keys database).
    Local,
    /// HashiCorp Vault transit.
    Vault,
}

/// How to authenticate to Vault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VaultAuthChoice {
    /// `VAULT_TOKEN`.
    Token,
    /// Kubernetes service-account login.
    Kubernetes,
}

/// `penny serve keys` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(
        long = "keys-listen",
        env = "PENNY_KEYS_LISTEN",
        default_value = "0.0.0.0:50052"
    )]
    pub listen: SocketAddr,
    /// Database URL (`sqlite://…?mode=rwc` or `postgres://…`). On PostgreSQL its role must
    /// own nothing and have neither SUPERUSER nor BYPASSRLS.
    #[arg(long = "keys-database-url", env = "PENNY_KEYS_DATABASE_URL")]
    pub database_url: String,
    /// PostgreSQL: the owner's URL, used only to migrate and to grant the serving role.
    #[arg(
        long = "keys-migration-database-url",
        env = "PENNY_KEYS_MIGRATION_DATABASE_URL"
    )]
    pub migration_database_url: Option<String>,
    /// Key engine.
    #[arg(long = "keys-backend", env = "PENNY_KEYS_BACKEND", value_enum, default_value_t = BackendChoice::Local)]
    pub backend: BackendChoice,
    /// File holding the master key (64 hex digits or base64 of 32 bytes); the
    /// `PENNY_MASTER_KEY` variable is the alternative. Local engine only.
    #[arg(long = "master-key-file", env = "PENNY_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Vault address (the standard `VAULT_ADDR`).
    #[arg(long = "vault-addr", env = "VAULT_ADDR")]
    pub vault_addr: Option<String>,
    /// Transit mount path.
    #[arg(
        long = "vault-transit-mount",
        env = "PENNY_VAULT_TRANSIT_MOUNT",
        default_value = "transit"
    )]
    pub vault_mount: String,
    /// Vault authentication (token reads `VAULT_TOKEN`).
    #[arg(long = "vault-auth", env = "PENNY_VAULT_AUTH", value_enum, default_value_t = VaultAuthChoice::Token)]
    pub vault_auth: VaultAuthChoice,
    /// Vault role for Kubernetes auth.
    #[arg(long = "vault-k8s-role", env = "PENNY_VAULT_K8S_ROLE")]
    pub vault_k8s_role: Option<String>,
    /// Mount of Vault's Kubernetes auth method.
    #[arg(
        long = "vault-k8s-mount",
        env = "PENNY_VAULT_K8S_MOUNT",
        default_value = "kubernetes"
    )]
    pub vault_k8s_mount: String,
    /// Service-account token path for Kubernetes auth.
    #[arg(
        long = "vault-k8s-jwt-path",
        env = "PENNY_VAULT_K8S_JWT_PATH",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub vault_k8s_jwt_path: PathBuf,
    /// Timeout of each Vault request, in milliseconds: unreachable must fail fast.
    #[arg(long = "vault-timeout-ms", env = "PENNY_VAULT_TIMEOUT_MS", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub vault_timeout_ms: u64,
}

/// The engine, configured.
#[derive(Debug)]
pub enum BackendConfig {
    /// The embedded engine with its master key.
    Local(MasterKey),
    /// Vault transit.
    Vault(VaultSettings),
}

/// Everything the keys service needs, validated.
#[derive(Debug)]
pub struct KeysConfig {
    /// Where the keys database is (the serving role).
    pub database_url: String,
    /// The owner's URL for migrations (PostgreSQL).
    pub migration_database_url: Option<String>,
    /// The engine.
    pub backend: BackendConfig,
}

impl Args {
    /// Validates the flags and reads the secrets they point to. Errors name the setting
    /// and never echo a secret.
    pub fn into_config(self) -> anyhow::Result<KeysConfig> {
        let backend = match self.backend {
            BackendChoice::Local => {
                let text = match (&self.master_key_file, std::env::var("PENNY_MASTER_KEY")) {
                    (Some(path), _) => {
                        Zeroizing::new(std::fs::read_to_string(path).with_context(|| {
                            format!("PENNY_MASTER_KEY_FILE: cannot read {}", path.display())
                        })?)
                    }
                    (None, Ok(value)) if !value.is_empty() => Zeroizing::new(value),
                    _ => bail!(
                        "PENNY_MASTER_KEY (or PENNY_MASTER_KEY_FILE) is required with the local key backend"
                    ),
                };
                let key = MasterKey::parse(&text)
                    .map_err(|why| anyhow::anyhow!("PENNY_MASTER_KEY: {why}"))?;
                BackendConfig::Local(key)
            }
            BackendChoice::Vault => {
                let address = self
                    .vault_addr
                    .filter(|a| !a.is_empty())
                    .context("VAULT_ADDR is required with the vault key backend")?;
                url::Url::parse(&address).context("VAULT_ADDR: not a URL")?;
                let auth = match self.vault_auth {
                    VaultAuthChoice::Token => VaultAuth::Token(Zeroizing::new(
                        std::env::var("VAULT_TOKEN")
                            .ok()
                            .filter(|t| !t.is_empty())
                            .context("VAULT_TOKEN is required with --vault-auth token")?,
                    )),
                    VaultAuthChoice::Kubernetes => VaultAuth::Kubernetes {
                        mount: self.vault_k8s_mount,
                        role: self.vault_k8s_role.context(
                            "PENNY_VAULT_K8S_ROLE is required with --vault-auth kubernetes",
                        )?,
                        jwt_path: self.vault_k8s_jwt_path,
                    },
                };
                BackendConfig::Vault(VaultSettings {
                    address,
                    mount: self.vault_mount,
                    auth,
                    timeout: Duration::from_millis(self.vault_timeout_ms),
                })
            }
        };
        Ok(KeysConfig {
            database_url: self.database_url,
            migration_database_url: self.migration_database_url,
            backend,
        })
    }
}
