//! The keys service's one error type and its mapping to `tonic::Status`.
//!
//! Messages never carry key material, plaintext, ciphertext bodies, SQL or Vault's own
//! error text (which can name policies and paths): internal causes are logged once, by
//! `ApiError::internal`, under a reference id; a database that could not serve the call
//! is answered UNAVAILABLE by `ApiError::database`, its cause logged at warn.

use std::time::Duration;

use penny_platform::{ApiError, Reason};
use tonic::{Code, Status};

use crate::domain::ciphertext::ParseError;

/// Everything that can go wrong in key management.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The tenant has no key.
    #[error("the tenant has no key")]
    KeyNotFound,
    /// The ciphertext names a version the key does not have.
    #[error("key version {0} does not exist")]
    VersionNotFound(u32),
    /// The ciphertext's version is below the key's `min_decryption_version`.
    #[error("key version {0} is below the key's minimum decryption version")]
    VersionBelowMinimum(u32),
    /// `DeleteKey` on a key whose `deletion_allowed` is false.
    #[error("deletion is not allowed for this key; set deletion_allowed first")]
    DeletionNotAllowed,
    /// A configuration change the key cannot take (field, reason).
    #[error("{1}")]
    InvalidConfig(&'static str, String),
    /// The ciphertext string is not well formed.
    #[error("malformed ciphertext: {0}")]
    Malformed(#[from] ParseError),
    /// A ciphertext of the other engine (`vault:` to the local engine or vice versa).
    #[error("ciphertext was not produced by this key backend")]
    WrongEngine,
    /// Authentication failed: tampered, truncated, or another tenant's or object's context.
    /// Deliberately one variant: the caller cannot tell which.
    #[error("ciphertext could not be decrypted")]
    DecryptionFailed,
    /// The backend cannot be reached, or is sealed.
    #[error("key backend unavailable")]
    BackendUnavailable(String),
    /// The backend refused (permission denied, misconfiguration).
    #[error("key backend refused the operation")]
    BackendRefused(String),
    /// A concurrent change won; retry.
    #[error("the key was changed concurrently; retry")]
    Conflict,
    /// A database failure.
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    /// Anything else that is our fault.
    #[error("{0}")]
    Internal(String),
}

impl KeysError {
    /// The caller-facing form. Internal causes are logged here, once.
    pub fn to_api_error(&self) -> ApiError {
        match self {
            Self::KeyNotFound => ApiError::not_found(Reason::KeyNotFound, self.to_string()),
            Self::VersionNotFound(_) => {
                ApiError::not_found(Reason::KeyVersionNotFound, self.to_string())
            }
            Self::VersionBelowMinimum(_) => {
                ApiError::failed_precondition(Reason::KeyVersionBelowMinimum, self.to_string())
            }
            Self::DeletionNotAllowed => {
                ApiError::failed_precondition(Reason::KeyDeletionNotAllowed, self.to_string())
            }
            Self::InvalidConfig(field, message) => ApiError::invalid_field(*field, message.clone()),
            Self::Malformed(_) | Self::WrongEngine => ApiError::new(
                Code::InvalidArgument,
                Reason::CiphertextMalformed,
                self.to_string(),
            ),
            Self::DecryptionFailed => ApiError::new(
                Code::InvalidArgument,
                Reason::DecryptionFailed,
                self.to_string(),
            ),
            Self::BackendUnavailable(cause) => {
                tracing::warn!(%cause, "key backend unavailable");
                ApiError::unavailable(
                    Reason::BackendUnavailable,
                    self.to_string(),
                    Duration::from_secs(1),
                )
            }
            Self::BackendRefused(cause) => {
                tracing::error!(%cause, "key backend refused an operation");
                ApiError::failed_precondition(Reason::BackendRefused, self.to_string())
            }
            Self::Conflict => ApiError::new(
                Code::Aborted,
                Reason::ConcurrentModification,
                self.to_string(),
            ),
            Self::Database(err) => ApiError::database(err),
            Self::Internal(cause) => ApiError::internal(cause),
        }
    }
}

impl From<KeysError> for Status {
    fn from(err: KeysError) -> Self {
        err.to_api_error().into()
    }
}

/// The per-item form used in batch replies.
pub fn batch_item_error(err: &KeysError) -> penny_proto::common::v1::BatchItemError {
    let api = err.to_api_error();
    penny_proto::common::v1::BatchItemError {
        code: api.code() as i32,
        reason: api.reason() as i32,
        message: api.message().to_owned(),
        field: api
            .violations()
            .first()
            .map(|v| v.field.clone())
            .unwrap_or_default(),
    }
}
