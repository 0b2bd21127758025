//! The audit service's one error type and its mapping to `tonic::Status`.

use penny_platform::{ApiError, Reason};
use tonic::Status;

/// Everything that can go wrong in the trail.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The request is invalid (every bad field listed).
    #[error("{}", .0.message())]
    Invalid(ApiError),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
}

impl From<ApiError> for AuditError {
    fn from(err: ApiError) -> Self {
        Self::Invalid(err)
    }
}

impl From<AuditError> for ApiError {
    fn from(err: AuditError) -> Self {
        match err {
            AuditError::Invalid(api) => api,
            // Events the caller could not store are retried by the caller: UNAVAILABLE,
            // never a silent loss.
            AuditError::Database(db) => {
                tracing::error!(error = %db, "audit database failed");
                ApiError::unavailable(
                    Reason::AuditUnavailable,
                    "the audit trail cannot be read or written right now; retry later",
                    std::time::Duration::from_secs(1),
                )
            }
        }
    }
}

impl From<AuditError> for Status {
    fn from(err: AuditError) -> Self {
        ApiError::from(err).into()
    }
}
