//! The tenants service's one error type and its mapping to `tonic::Status`.

use std::time::Duration;

use penny_platform::{ApiError, Reason};
use tonic::{Code, Status};

/// Everything that can go wrong managing tenants.
#[derive(Debug, thiserror::Error)]
pub enum TenantsError {
    /// A request field is invalid (field, why).
    #[error("{1}")]
    Invalid(&'static str, String),
    /// The tenant, user or workspace does not exist (for this caller).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The slug, email or workspace name is taken.
    #[error("{0}")]
    AlreadyExists(&'static str),
    /// The tenant is not ACTIVE, the user is deleted, or the platform tenant was targeted.
    #[error("{0}")]
    FailedPrecondition(&'static str),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// The caller tried to hand out more than it holds.
    #[error("{0}")]
    Escalation(&'static str),
    /// A service a saga step needs did not answer; the saga resumes on retry.
    #[error("the {service} service is unavailable; {resume}")]
    Dependency {
        /// Which service.
        service: &'static str,
        /// How to resume.
        resume: &'static str,
    },
    /// Another service refused the caller's request for a reason that is the caller's to
    /// fix (a role it may not grant); its status goes back unchanged.
    #[error("{}", .0.message())]
    Refused(Box<Status>),
    /// Something that should not happen (a service answering unexpectedly).
    #[error("{0}")]
    Internal(String),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
}

impl From<crate::store::StoreError> for TenantsError {
    fn from(err: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match err {
            StoreError::SlugTaken => Self::AlreadyExists("a tenant with that slug exists"),
            StoreError::RequestIdTaken => Self::Invalid(
                "request_id",
                "was used by another CreateTenant request".into(),
            ),
            StoreError::EmailTaken => Self::AlreadyExists("a user with that email exists"),
            StoreError::NameTaken => Self::AlreadyExists("a workspace with that name exists"),
            StoreError::NotFound => Self::NotFound("object"),
            StoreError::NotActive => {
                Self::FailedPrecondition("the tenant is not active (being created or deleted)")
            }
            StoreError::Db(db) => Self::Database(db),
        }
    }
}

impl From<TenantsError> for ApiError {
    fn from(err: TenantsError) -> Self {
        match err {
            TenantsError::Invalid(field, message) => ApiError::invalid_field(field, message),
            TenantsError::NotFound(_) => ApiError::not_found(Reason::NotFound, err.to_string()),
            TenantsError::AlreadyExists(_) => {
                ApiError::new(Code::AlreadyExists, Reason::AlreadyExists, err.to_string())
            }
            TenantsError::FailedPrecondition(_) => {
                ApiError::failed_precondition(Reason::FailedPrecondition, err.to_string())
            }
            TenantsError::PermissionDenied(_) => ApiError::permission_denied(err.to_string()),
            TenantsError::Escalation(_) => ApiError::new(
                Code::PermissionDenied,
                Reason::PrivilegeEscalation,
                err.to_string(),
            ),
            TenantsError::Dependency { .. } => ApiError::unavailable(
                Reason::DependencyUnavailable,
                err.to_string(),
                Duration::from_secs(1),
            ),
            TenantsError::Refused(status) => {
                ApiError::new(status.code(), Reason::PermissionDenied, status.message())
            }
            TenantsError::Internal(cause) => ApiError::internal(&cause),
            TenantsError::Database(db) => ApiError::database(&db),
        }
    }
}

impl From<TenantsError> for Status {
    fn from(err: TenantsError) -> Self {
        match err {
            // Already a complete status with its own details (reason, bad fields).
            TenantsError::Refused(status) => *status,
            other => ApiError::from(other).into(),
        }
    }
}
