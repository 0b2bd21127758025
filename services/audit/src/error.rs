//! The audit service's one error type and its mapping to `tonic::Status`.

use penny_platform::{ApiError, Reason};
use sea_orm::SqlErr;
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
            // A stored row where the chain's head says none can be: someone wrote to the
            // trail behind audit's back. Retrying cannot help; an operator must look.
            AuditError::Database(db)
                if matches!(db.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) =>
            {
                tracing::error!(error = %db, "audit chain head disagrees with its events");
                ApiError::new(
                    tonic::Code::DataLoss,
                    Reason::AuditChainInconsistent,
                    "the audit trail disagrees with its own head; run VerifyChain and call an operator",
                )
            }
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
