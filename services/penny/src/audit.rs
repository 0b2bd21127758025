//! `penny audit …`: the audit trail's offline tools.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use penny_audit::checkpoint::TrustedKeys;
use penny_platform::principal::Jwks;
use penny_platform::signing::SigningKey;

/// The checkpoint key `penny dev` keeps in its data directory.
const DEV_CHECKPOINT_KEY: &str = "audit-checkpoint.pk8";
/// Its public half, for `penny audit verify --jwks`.
const DEV_CHECKPOINT_JWKS: &str = "audit-checkpoint.jwks.json";

/// `penny audit …`
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Make a checkpoint key (PKCS#8, owner-only) for PENNY_AUDIT_CHECKPOINT_KEY_FILE, and
    /// write its public half as a JWKS for verifiers.
    NewCheckpointKey {
        /// Where the private key goes (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Where its public JWKS goes.
        #[arg(long)]
        jwks_out: PathBuf,
    },
    /// Verify an export (the JSON lines of AuditService/Export, from the first event)
    /// offline, against a signed checkpoint (the JSON of AuditService/GetCheckpoint) and
    /// the checkpoint keys you trust. Exits 1 and names the first bad event when the
    /// export was edited, cut short, or events were inserted, deleted or reordered.
    Verify {
        /// The export.
        #[arg(long)]
        export: PathBuf,
        /// The checkpoint.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The trusted checkpoint keys (a JWKS, as new-checkpoint-key writes it).
        #[arg(long)]
        jwks: PathBuf,
    },
}

pub fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::NewCheckpointKey { out, jwks_out } => {
            anyhow::ensure!(
                !out.exists(),
                "{} exists; not replacing a key",
                out.display()
            );
            let key = SigningKey::generate()?;
            penny_platform::signing::write_private(&out, key.pkcs8_document())?;
            write_jwks(&key, &jwks_out)?;
            println!("checkpoint key {} written to {}", key.kid(), out.display());
            println!("its public JWKS: {}", jwks_out.display());
            Ok(())
        }
        AuditCommand::Verify {
            export,
            checkpoint,
            jwks,
        } => {
            let jwks: Jwks = serde_json::from_slice(
                &std::fs::read(&jwks).with_context(|| format!("cannot read {}", jwks.display()))?,
            )
            .with_context(|| format!("{}: not a JWKS", jwks.display()))?;
            let trusted = TrustedKeys::default().with_jwks(&jwks);
            anyhow::ensure!(!trusted.is_empty(), "the JWKS holds no Ed25519 key");
            let checkpoint_text = std::fs::read_to_string(&checkpoint)
                .with_context(|| format!("cannot read {}", checkpoint.display()))?;
            let checkpoint = penny_audit::offline::parse_checkpoint(&checkpoint_text)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let file = std::fs::File::open(&export)
                .with_context(|| format!("cannot read {}", export.display()))?;
            match penny_audit::offline::verify_export(
                std::io::BufReader::new(file),
                &checkpoint,
                &trusted,
            ) {
                Ok(report) => {
                    println!(
                        "valid: {} events verified; events 1..{} are covered by checkpoint {} (key {}); {} later event(s) are chained but not yet signed",
                        report.verified,
                        report.checkpoint_sequence,
                        report.checkpoint_sequence,
                        checkpoint.key_id,
                        report.unsigned_tail
                    );
                    Ok(())
                }
                Err(err) => Err(anyhow::anyhow!("INVALID: {err}")),
            }
        }
    }
}

fn write_jwks(key: &SigningKey, path: &Path) -> anyhow::Result<()> {
    let jwks = serde_json::to_vec_pretty(&key.jwks())?;
    std::fs::write(path, jwks).with_context(|| format!("cannot write {}", path.display()))
}

/// `penny dev`'s checkpoint key: created once in the data directory (with its JWKS beside
/// it), reused on every start.
pub fn load_or_create_checkpoint_key(dir: &Path) -> anyhow::Result<SigningKey> {
    let path = dir.join(DEV_CHECKPOINT_KEY);
    let key = if path.exists() {
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        SigningKey::from_pkcs8(&bytes)
            .with_context(|| format!("{}: not an Ed25519 PKCS#8 key", path.display()))?
    } else {
        let key = SigningKey::generate()?;
        penny_platform::signing::write_private(&path, key.pkcs8_document())?;
        key
    };
    write_jwks(&key, &dir.join(DEV_CHECKPOINT_JWKS))?;
    Ok(key)
}
