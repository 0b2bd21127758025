//! The authz service's one error type and its mapping to `tonic::Status`.

use penny_platform::{ApiError, Reason};
use tonic::{Code, Status};

/// Everything that can go wrong in authorization management.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// A request field is invalid (field, why).
    #[error("{1}")]
    Invalid(String, String),
    /// The role, binding or tenant does not exist (for this caller).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A custom role of that name exists.
    #[error("a role of that name already exists in the tenant")]
    AlreadyExists,
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// Granting would hand out more than the granter holds.
    #[error("{0}")]
    Escalation(&'static str),
    /// Built-in roles are read-only.
    #[error("built-in roles cannot be created, changed or deleted")]
    BuiltInReadOnly,
    /// The role still has bindings.
    #[error("the role still has {0} binding(s); revoke them or delete with force")]
    RoleInUse(u64),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
}

impl From<crate::store::StoreError> for AuthzError {
    fn from(err: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match err {
            StoreError::Exists => Self::AlreadyExists,
            StoreError::NotFound => Self::NotFound("role"),
            StoreError::InUse(n) => Self::RoleInUse(n),
            StoreError::Db(db) => Self::Database(db),
        }
    }
}

impl From<AuthzError> for ApiError {
    fn from(err: AuthzError) -> Self {
        match &err {
            AuthzError::Invalid(field, message) => {
                ApiError::invalid_field(field.clone(), message.clone())
            }
            AuthzError::NotFound(_) => ApiError::not_found(Reason::NotFound, err.to_string()),
            AuthzError::AlreadyExists => {
                ApiError::new(Code::AlreadyExists, Reason::AlreadyExists, err.to_string())
            }
            AuthzError::PermissionDenied(_) => ApiError::permission_denied(err.to_string()),
            AuthzError::Escalation(_) => ApiError::new(
                Code::PermissionDenied,
                Reason::PrivilegeEscalation,
                err.to_string(),
            ),
            AuthzError::BuiltInReadOnly => {
                ApiError::failed_precondition(Reason::BuiltInRoleReadOnly, err.to_string())
            }
            AuthzError::RoleInUse(_) => {
                ApiError::failed_precondition(Reason::RoleInUse, err.to_string())
            }
            AuthzError::Database(db) => ApiError::database(db),
        }
    }
}

impl From<AuthzError> for Status {
    fn from(err: AuthzError) -> Self {
        ApiError::from(err).into()
    }
}
