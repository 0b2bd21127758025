//! The audit service's settings: `--audit-*` flags with `PENNY_AUDIT_*` fallbacks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use penny_platform::principal::Jwks;
use penny_platform::signing::SigningKey;

use crate::monitor::rules::RuleSet;

/// `penny serve audit` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(
        long = "audit-listen",
        env = "PENNY_AUDIT_LISTEN",
        default_value = "0.0.0.0:50054"
    )]
    pub listen: SocketAddr,
    /// Database URL (`sqlite://…?mode=rwc` or `postgres://…`). On PostgreSQL its role must
    /// own nothing and have neither SUPERUSER nor BYPASSRLS; it may add and read events,
    /// checkpoints and redaction records but never change or delete them, delete payloads
    /// (redaction), and move chain heads forward.
    #[arg(long = "audit-database-url", env = "PENNY_AUDIT_DATABASE_URL")]
    pub database_url: String,
    /// PostgreSQL: the owner's URL, used only to migrate and to grant the serving role.
    #[arg(
        long = "audit-migration-database-url",
        env = "PENNY_AUDIT_MIGRATION_DATABASE_URL"
    )]
    pub migration_database_url: Option<String>,
    /// The Ed25519 key (PKCS#8 DER, as `penny audit new-checkpoint-key` writes it) that
    /// signs checkpoints. Give verifiers its public half from a trusted source.
    #[arg(
        long = "audit-checkpoint-key-file",
        env = "PENNY_AUDIT_CHECKPOINT_KEY_FILE"
    )]
    pub checkpoint_key_file: PathBuf,
    /// A JWKS of earlier checkpoint keys still trusted (after the key was changed), so
    /// VerifyChain keeps accepting the checkpoints they signed.
    #[arg(
        long = "audit-checkpoint-previous-jwks-file",
        env = "PENNY_AUDIT_CHECKPOINT_PREVIOUS_JWKS_FILE"
    )]
    pub checkpoint_previous_jwks_file: Option<PathBuf>,
    /// Sign a checkpoint once a chain is this many events past its last one.
    #[arg(long = "audit-checkpoint-every", env = "PENNY_AUDIT_CHECKPOINT_EVERY",
          default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub checkpoint_every: u64,
    /// And at least this often (seconds) for every chain that grew.
    #[arg(long = "audit-checkpoint-interval-secs", env = "PENNY_AUDIT_CHECKPOINT_INTERVAL_SECS",
          default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub checkpoint_interval_secs: u64,
    /// The security monitor's rules (JSON; see docs/operations.md). Without it, the
    /// guide's defaults; `{"rules": []}` switches the monitor off.
    #[arg(
        long = "audit-monitor-rules-file",
        env = "PENNY_AUDIT_MONITOR_RULES_FILE"
    )]
    pub monitor_rules_file: Option<PathBuf>,
    /// The tenants service (`http://host:port`), where the monitor suspends users.
    #[arg(long = "audit-tenants-url", env = "PENNY_AUDIT_TENANTS_URL")]
    pub tenants_url: Option<String>,
}

/// Everything the audit service needs.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Where the audit database is (the serving role).
    pub database_url: String,
    /// The owner's URL for migrations (PostgreSQL).
    pub migration_database_url: Option<String>,
    /// The key that signs checkpoints.
    pub checkpoint_key: Arc<SigningKey>,
    /// Earlier checkpoint keys still trusted.
    pub previous_checkpoint_keys: Jwks,
    /// A checkpoint every this many events…
    pub checkpoint_every: u64,
    /// …and at least this often for a chain that grew.
    pub checkpoint_interval: Duration,
    /// The security monitor's rules; `None` runs no monitor.
    pub monitor_rules: Option<RuleSet>,
    /// The tenants service, where the monitor suspends users.
    pub tenants_url: Option<String>,
}

impl AuditConfig {
    /// Defaults around a database and a key (tests and `penny dev`).
    pub fn new(database_url: String, checkpoint_key: Arc<SigningKey>) -> Self {
        Self {
            database_url,
            migration_database_url: None,
            checkpoint_key,
            previous_checkpoint_keys: Jwks::default(),
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(60),
            monitor_rules: None,
            tenants_url: None,
        }
    }
}

impl Args {
    /// The configuration; fails naming the setting when a file is unreadable or invalid.
    pub fn into_config(self) -> anyhow::Result<AuditConfig> {
        let bytes = std::fs::read(&self.checkpoint_key_file).with_context(|| {
            format!(
                "PENNY_AUDIT_CHECKPOINT_KEY_FILE: cannot read {}",
                self.checkpoint_key_file.display()
            )
        })?;
        let key = SigningKey::from_pkcs8(&bytes).with_context(|| {
            format!(
                "PENNY_AUDIT_CHECKPOINT_KEY_FILE {}: not an Ed25519 PKCS#8 key",
                self.checkpoint_key_file.display()
            )
        })?;
        let previous = match &self.checkpoint_previous_jwks_file {
            Some(path) => {
                let bytes = std::fs::read(path).with_context(|| {
                    format!(
                        "PENNY_AUDIT_CHECKPOINT_PREVIOUS_JWKS_FILE: cannot read {}",
                        path.display()
                    )
                })?;
                serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "PENNY_AUDIT_CHECKPOINT_PREVIOUS_JWKS_FILE {}: not a JWKS",
                        path.display()
                    )
                })?
            }
            None => Jwks::default(),
        };
        let rules = match &self.monitor_rules_file {
            Some(path) => {
                let bytes = std::fs::read(path).with_context(|| {
                    format!(
                        "PENNY_AUDIT_MONITOR_RULES_FILE: cannot read {}",
                        path.display()
                    )
                })?;
                RuleSet::parse(&bytes).map_err(|e| {
                    anyhow::anyhow!("PENNY_AUDIT_MONITOR_RULES_FILE {}: {e}", path.display())
                })?
            }
            None => RuleSet::defaults(),
        };
        Ok(AuditConfig {
            database_url: self.database_url,
            migration_database_url: self.migration_database_url,
            checkpoint_key: Arc::new(key),
            previous_checkpoint_keys: previous,
            checkpoint_every: self.checkpoint_every,
            checkpoint_interval: Duration::from_secs(self.checkpoint_interval_secs),
            monitor_rules: Some(rules),
            tenants_url: self.tenants_url,
        })
    }
}
