//! The auth service's one error type and its mapping to `tonic::Status`.

use std::time::Duration;

use penny_platform::{ApiError, Reason};
use tonic::{Code, Status};

use crate::domain::password::HashError;

/// Everything that can go wrong authenticating.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A request field is invalid (field, why).
    #[error("{1}")]
    Invalid(&'static str, String),
    /// Unknown user, wrong password, locked account, suspended user: one answer for all.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// The client address is on the block list.
    #[error("sign-in from this address is blocked")]
    IpBlocked,
    /// An API key secret that is malformed, unknown, revoked or expired.
    #[error("the API key is not valid")]
    ApiKeyInvalid,
    /// A set-password token that is unknown, used or expired.
    #[error("the set-password token is not valid")]
    TokenInvalid,
    /// A new password the policy refuses.
    #[error("{0}")]
    PasswordPolicy(&'static str),
    /// The user does not exist (administrative path).
    #[error("user not found")]
    UserNotFound,
    /// A service the call needs did not answer.
    #[error("the {0} service is unavailable")]
    Dependency(&'static str),
    /// Something that should not happen.
    #[error("{0}")]
    Internal(String),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    /// Hashing failed.
    #[error(transparent)]
    Hash(#[from] HashError),
    /// A refusal already in the platform's terms (tenant scope, permission checks).
    #[error("{}", .0.message())]
    Api(#[from] ApiError),
}

impl From<crate::store::TokenRefused> for AuthError {
    fn from(err: crate::store::TokenRefused) -> Self {
        match err {
            crate::store::TokenRefused::Invalid => Self::TokenInvalid,
            crate::store::TokenRefused::Db(db) => Self::Database(db),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Invalid(field, message) => ApiError::invalid_field(field, message),
            AuthError::InvalidCredentials => ApiError::new(
                Code::Unauthenticated,
                Reason::InvalidCredentials,
                err.to_string(),
            ),
            AuthError::IpBlocked => {
                ApiError::new(Code::PermissionDenied, Reason::IpBlocked, err.to_string())
            }
            AuthError::ApiKeyInvalid => ApiError::new(
                Code::Unauthenticated,
                Reason::Unauthenticated,
                err.to_string(),
            ),
            AuthError::TokenInvalid => ApiError::new(
                Code::Unauthenticated,
                Reason::SetPasswordTokenInvalid,
                err.to_string(),
            ),
            AuthError::PasswordPolicy(why) => ApiError::invalid_field("new_password", why)
                .with_reason(Reason::PasswordPolicyViolation),
            AuthError::UserNotFound => ApiError::not_found(Reason::NotFound, err.to_string()),
            AuthError::Dependency(_) => ApiError::unavailable(
                Reason::DependencyUnavailable,
                err.to_string(),
                Duration::from_secs(1),
            ),
            AuthError::Internal(cause) => ApiError::internal(&cause),
            AuthError::Database(db) => ApiError::database(&db),
            AuthError::Hash(hash) => ApiError::internal(&hash),
            AuthError::Api(api) => api,
        }
    }
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        ApiError::from(err).into()
    }
}
