//! Verifying an export away from the service (`penny audit verify`): the JSON lines of
//! `Export`, a checkpoint as `GetCheckpoint` returned it (proto3 JSON, as grpcurl prints
//! it), and the checkpoint keys the verifier trusts. The same chain rules as `VerifyChain`;
//! a tail cut off before the checkpoint, or any event changed before it, is found.

use std::io::BufRead;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::chain::{Broken, ChainCheck, Failure, GENESIS};
use crate::checkpoint::{Checkpoint, TrustedKeys, Untrusted};
use crate::export::{LineError, parse_line};

/// What a successful offline check covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Events verified.
    pub verified: u64,
    /// The checkpoint's sequence: events up to it are covered by its signature.
    pub checkpoint_sequence: u64,
    /// Events after the checkpoint: chained, but not yet covered by a signature.
    pub unsigned_tail: u64,
}

/// Why an export did not verify.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// A line could not be read.
    #[error("line {line}: {why}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        why: String,
    },
    /// The checkpoint is not signed by a trusted key.
    #[error("the checkpoint does not verify: {0:?}")]
    Checkpoint(Untrusted),
    /// A line belongs to another tenant's chain.
    #[error("line {line}: an event of another tenant")]
    OtherTenant {
        /// 1-based line number.
        line: usize,
    },
    /// The chain is broken.
    #[error("event {}: {:?}: {}", .0.sequence, .0.failure, .0.message)]
    Broken(Broken),
}

/// Reads a checkpoint from the JSON `GetCheckpoint` returns (`{"checkpoint": {...}}`, or
/// the inner object).
pub fn parse_checkpoint(text: &str) -> Result<Checkpoint, LineError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| LineError(format!("not JSON: {e}")))?;
    let value = value.get("checkpoint").unwrap_or(&value);
    let string = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| LineError(format!("checkpoint: missing {name}")))
    };
    let bytes = |name: &str| {
        STANDARD
            .decode(string(name)?)
            .map_err(|_| LineError(format!("checkpoint: {name} is not base64")))
    };
    let sequence = match value.get("sequence") {
        Some(Value::String(s)) => s.parse().ok(),
        Some(Value::Number(n)) => n.as_u64(),
        _ => None,
    }
    .ok_or_else(|| LineError("checkpoint: sequence is not a number".into()))?;
    let create_micros = OffsetDateTime::parse(&string("createTime")?, &Rfc3339)
        .ok()
        .and_then(|t| i64::try_from(t.unix_timestamp_nanos() / 1000).ok())
        .ok_or_else(|| LineError("checkpoint: createTime is not a time".into()))?;
    Ok(Checkpoint {
        tenant_id: Uuid::try_parse(&string("tenantId")?)
            .map_err(|_| LineError("checkpoint: tenantId is not a UUID".into()))?,
        sequence,
        hash: bytes("hash")?
            .try_into()
            .map_err(|_| LineError("checkpoint: hash is not 32 bytes".into()))?,
        create_micros,
        signed_payload: bytes("signedPayload")?,
        signature: bytes("signature")?,
        key_id: string("keyId")?,
        public_key: bytes("publicKey").unwrap_or_default(),
    })
}

/// Verifies an export, from its first event, against `checkpoint`.
pub fn verify_export(
    export: impl BufRead,
    checkpoint: &Checkpoint,
    trusted: &TrustedKeys,
) -> Result<Report, OfflineError> {
    trusted
        .check(checkpoint)
        .map_err(OfflineError::Checkpoint)?;
    let mut check = ChainCheck::starting_at(1, GENESIS);
    for (index, line) in export.lines().enumerate() {
        let number = index + 1;
        let line = line.map_err(|e| OfflineError::Line {
            line: number,
            why: e.to_string(),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let event = parse_line(&line).map_err(|e| OfflineError::Line {
            line: number,
            why: e.0,
        })?;
        if event.record.tenant_id != checkpoint.tenant_id {
            return Err(OfflineError::OtherTenant { line: number });
        }
        check.next(&event).map_err(OfflineError::Broken)?;
        if event.record.sequence == checkpoint.sequence && event.hash != checkpoint.hash {
            return Err(OfflineError::Broken(Broken {
                sequence: checkpoint.sequence,
                failure: Failure::CheckpointMismatch,
                message: "the event differs from the checkpoint signed for it".into(),
            }));
        }
    }
    if let Some(broken) = check.unrecorded_redaction() {
        return Err(OfflineError::Broken(broken));
    }
    let reached = check.expected() - 1;
    if reached < checkpoint.sequence {
        return Err(OfflineError::Broken(Broken {
            sequence: reached + 1,
            failure: Failure::CheckpointMismatch,
            message: format!(
                "the export ends at event {reached} but the checkpoint was signed at event {} (its tail is gone)",
                checkpoint.sequence
            ),
        }));
    }
    Ok(Report {
        verified: check.verified(),
        checkpoint_sequence: checkpoint.sequence,
        unsigned_tail: reached - checkpoint.sequence,
    })
}
