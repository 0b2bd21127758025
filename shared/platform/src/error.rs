//! The one mapping from failures to `tonic::Status`.
//!
//! Every status the fleet returns carries rich details (`google.rpc.ErrorInfo` with a
//! [`Reason`] and domain `penny`, `BadRequest` listing every bad field, `RetryInfo` when
//! retrying helps). Messages are written for the caller and never contain SQL, file paths,
//! stack traces or secrets: internal failures are logged once, here, under a reference id
//! that the caller sees instead of the cause.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub use penny_proto::common::v1::ErrorReason as Reason;

/// The `ErrorInfo.domain` of every Penny error.
pub const ERROR_DOMAIN: &str = "penny";

/// One invalid request field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field path, e.g. `items[3].context.purpose`.
    pub field: String,
    /// What is wrong with it, for a person.
    pub description: String,
}

/// A failure on its way to the caller.
#[derive(Debug, Clone)]
pub struct ApiError {
    code: Code,
    reason: Reason,
    message: String,
    violations: Vec<FieldViolation>,
    retry_after: Option<Duration>,
    metadata: HashMap<String, String>,
}

impl ApiError {
    /// A failure with the given code, reason and caller-facing message.
    pub fn new(code: Code, reason: Reason, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            violations: Vec::new(),
            retry_after: None,
            metadata: HashMap::new(),
        }
    }

    /// INVALID_ARGUMENT listing every bad field.
    pub fn invalid_argument(violations: Vec<FieldViolation>) -> Self {
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        let message = format!("invalid request: {}", fields.join(", "));
        Self {
            violations,
            ..Self::new(Code::InvalidArgument, Reason::InvalidArgument, message)
        }
    }

    /// INVALID_ARGUMENT for one field.
    pub fn invalid_field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::invalid_argument(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }])
    }

    /// NOT_FOUND.
    pub fn not_found(reason: Reason, message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, reason, message)
    }

    /// FAILED_PRECONDITION.
    pub fn failed_precondition(reason: Reason, message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, reason, message)
    }

    /// UNAUTHENTICATED. The message is deliberately the same for every cause that a
    /// caller could use to probe the verifier.
    pub fn unauthenticated(reason: Reason) -> Self {
        Self::new(
            Code::Unauthenticated,
            reason,
            "missing or invalid credentials",
        )
    }

    /// PERMISSION_DENIED.
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(Code::PermissionDenied, Reason::PermissionDenied, message)
    }

    /// UNAVAILABLE, with the time after which a retry may succeed.
    pub fn unavailable(reason: Reason, message: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(Code::Unavailable, reason, message)
        }
    }

    /// INTERNAL. The cause is logged once, here, with a reference id; the caller sees only
    /// the reference, so no SQL, path or secret can leak through the message.
    pub fn internal(cause: &dyn fmt::Display) -> Self {
        let reference = uuid::Uuid::new_v4();
        tracing::error!(%reference, error = %cause, "internal error");
        let mut err = Self::new(
            Code::Internal,
            Reason::Internal,
            format!("internal error (reference {reference})"),
        );
        err.metadata
            .insert("reference".to_owned(), reference.to_string());
        err
    }

    /// A failed database statement: UNAVAILABLE with a retry delay when the database could
    /// not serve it right now ([`crate::db::is_unavailable`]: down, out of connections, busy,
    /// a deadlock), so callers and sagas retry; INTERNAL under a reference otherwise. Either
    /// way the cause is logged here and never sent.
    pub fn database(err: &sea_orm::DbErr) -> Self {
        if crate::db::is_unavailable(err) {
            tracing::warn!(error = %err, "database unavailable");
            return Self::unavailable(
                Reason::DependencyUnavailable,
                "the database cannot serve this request right now; retry later",
                Duration::from_secs(1),
            );
        }
        Self::internal(err)
    }

    /// The same failure with a more precise reason.
    #[must_use]
    pub fn with_reason(mut self, reason: Reason) -> Self {
        self.reason = reason;
        self
    }

    /// Adds a key/value to `ErrorInfo.metadata`. Never put secrets here.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The machine-readable reason.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// The caller-facing message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The invalid fields, if any.
    pub fn violations(&self) -> &[FieldViolation] {
        &self.violations
    }

    /// Another fleet service's refusal of a call made *as the caller* (with the caller's
    /// own token), passed back unchanged: its code, reason, message and field violations.
    /// Only for refusals that are the caller's to fix; transient failures are
    /// [`is_transient`] and become DEPENDENCY_UNAVAILABLE instead.
    pub fn relayed(status: &Status) -> Self {
        let details = status.get_error_details();
        let reason = details
            .error_info()
            .and_then(|info| Reason::from_str_name(&format!("ERROR_REASON_{}", info.reason)))
            .unwrap_or(Reason::Unspecified);
        let violations = details
            .bad_request()
            .map(|bad| {
                bad.field_violations
                    .iter()
                    .map(|v| FieldViolation {
                        field: v.field.clone(),
                        description: v.description.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            violations,
            ..Self::new(status.code(), reason, status.message())
        }
    }
}

/// Whether a failed call to another fleet service is transient: it could not answer now
/// (down, overloaded, shedding load, timed out, or the connection failed), so a retry later
/// may succeed. Callers answer those UNAVAILABLE with `DEPENDENCY_UNAVAILABLE`; any other
/// refusal is not the end user's to retry and is an internal error.
pub fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::ResourceExhausted
            | Code::Unknown
    )
}

/// The `ErrorInfo.reason` string of a reason: its proto name without the enum prefix.
pub fn reason_name(reason: Reason) -> &'static str {
    let name = reason.as_str_name();
    name.strip_prefix("ERROR_REASON_").unwrap_or(name)
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        let mut details = ErrorDetails::new();
        details.set_error_info(reason_name(err.reason), ERROR_DOMAIN, err.metadata);
        if !err.violations.is_empty() {
            for violation in err.violations {
                details.add_bad_request_violation(violation.field, violation.description);
            }
        }
        if let Some(retry_after) = err.retry_after {
            details.set_retry_info(Some(retry_after));
        }
        Status::with_error_details(err.code, err.message, details)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_failures_to_answer_are_transient() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
        ] {
            assert!(is_transient(&tonic::Status::new(code, "x")), "{code:?}");
        }
        for code in [
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::Internal,
        ] {
            assert!(!is_transient(&tonic::Status::new(code, "x")), "{code:?}");
        }
    }
    use super::*;

    #[test]
    fn invalid_argument_lists_every_field() {
        let status: Status = ApiError::invalid_argument(vec![
            FieldViolation {
                field: "tenant_id".into(),
                description: "must be a UUID".into(),
            },
            FieldViolation {
                field: "items".into(),
                description: "at most 1000 items".into(),
            },
        ])
        .into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request details");
        let fields: Vec<_> = bad
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["tenant_id", "items"]);
        let info = details.error_info().expect("error info");
        assert_eq!(info.reason, "INVALID_ARGUMENT");
        assert_eq!(info.domain, "penny");
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let status: Status =
            ApiError::internal(&"relation \"keys\" does not exist at /var/lib/x.db").into();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("relation"));
        assert!(!status.message().contains("/var/lib"));
        assert!(status.message().starts_with("internal error (reference "));
    }

    #[test]
    fn unavailable_carries_retry_info() {
        let status: Status = ApiError::unavailable(
            Reason::BackendUnavailable,
            "key backend unavailable",
            Duration::from_secs(2),
        )
        .into();
        let details = status.get_error_details();
        assert_eq!(
            details.retry_info().and_then(|r| r.retry_delay),
            Some(Duration::from_secs(2))
        );
    }
}
