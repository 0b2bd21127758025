//! Who may call which RPC: one table per service, enforced by the standard stack.
//!
//! Every service declares a [`Requirement`] for each of its RPCs; the stack looks the
//! request's path up before the handler runs. A path missing from the table is refused, so
//! an RPC added without a decision cannot be called.

use std::collections::HashMap;

use crate::error::ApiError;
use crate::principal::Principal;

/// The scope of a user token that only allows MFA enrolment.
pub const ENROLL_SCOPE: &str = "mfa:enroll";

/// What a caller must be to call one RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// Anyone, without credentials (health, reflection).
    Public,
    /// Any authenticated principal.
    Authenticated,
    /// Any authenticated principal, including a user token restricted to MFA enrolment
    /// (scope [`ENROLL_SCOPE`]); every other requirement refuses restricted user tokens.
    Enrollment,
    /// A fleet service, or platform staff.
    ServiceOrAdmin,
    /// A fleet service only (audit's Append: people do not write the trail).
    Service,
    /// Platform staff only.
    PlatformAdmin,
    /// A permission (`resource:action`) held in the caller's own tenant, decided by the
    /// authz service. Fleet services and platform staff pass; users and API keys need a
    /// role that grants it. The handler still scopes the request to the caller's tenant.
    Permission(&'static str),
}

impl Requirement {
    /// The permission authz must confirm for this principal, if any.
    pub fn permission_for(self, principal: &Principal) -> Option<&'static str> {
        match self {
            Self::Permission(permission)
                if !(principal.is_service() || principal.is_platform_admin()) =>
            {
                Some(permission)
            }
            _ => None,
        }
    }

    /// Whether a credential is needed at all.
    pub fn needs_principal(self) -> bool {
        self != Self::Public
    }

    /// Decides what can be decided from the principal alone; a [`Self::Permission`] also
    /// needs the authz service (see [`Self::permission_for`]).
    pub fn check(self, principal: &Principal) -> Result<(), ApiError> {
        // A user token with scopes is a restricted one (MFA enrolment): good only where
        // the table says so.
        if principal.kind == crate::PrincipalKind::User
            && !principal.scopes.is_empty()
            && self != Self::Enrollment
            && self != Self::Public
        {
            return Err(ApiError::permission_denied(
                "this token only allows MFA enrolment",
            ));
        }
        let allowed = match self {
            Self::Public | Self::Authenticated | Self::Enrollment | Self::Permission(_) => true,
            Self::ServiceOrAdmin => principal.is_service() || principal.is_platform_admin(),
            Self::Service => principal.is_service(),
            Self::PlatformAdmin => principal.is_platform_admin(),
        };
        if allowed {
            Ok(())
        } else {
            Err(ApiError::permission_denied(
                "the caller may not perform this operation",
            ))
        }
    }
}

/// The table `gRPC path → requirement` of one server.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    rules: HashMap<String, Requirement>,
}

impl AccessPolicy {
    /// An empty table: everything refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares one RPC, `service` fully qualified (`penny.keys.v1.KeyService`).
    #[must_use]
    pub fn rpc(mut self, service: &str, method: &str, requirement: Requirement) -> Self {
        self.rules
            .insert(format!("/{service}/{method}"), requirement);
        self
    }

    /// Declares every method of a service at once (health, reflection).
    #[must_use]
    pub fn service(mut self, service: &str, requirement: Requirement) -> Self {
        self.rules.insert(format!("/{service}/*"), requirement);
        self
    }

    /// The requirement for a request path, or `None` when the table has no entry.
    pub fn requirement(&self, path: &str) -> Option<Requirement> {
        if let Some(found) = self.rules.get(path) {
            return Some(*found);
        }
        let (service, _method) = path.rsplit_once('/')?;
        self.rules.get(&format!("{service}/*")).copied()
    }

    /// Every declared path, for tests that walk the descriptor set.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.rules.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::{PLATFORM_TENANT_ID, PrincipalKind};
    use uuid::Uuid;

    fn principal(kind: PrincipalKind, tenant: Uuid, roles: &[&str]) -> Principal {
        Principal {
            kind,
            id: "p".into(),
            tenant_id: tenant,
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            session_id: None,
            scopes: vec![],
        }
    }

    #[test]
    fn unknown_paths_have_no_requirement() {
        let policy = AccessPolicy::new().rpc("a.B", "C", Requirement::Authenticated);
        assert_eq!(
            policy.requirement("/a.B/C"),
            Some(Requirement::Authenticated)
        );
        assert_eq!(policy.requirement("/a.B/D"), None);
        let policy = policy.service("grpc.health.v1.Health", Requirement::Public);
        assert_eq!(
            policy.requirement("/grpc.health.v1.Health/Watch"),
            Some(Requirement::Public)
        );
    }

    #[test]
    fn admin_only_counts_in_the_platform_tenant() {
        let staff = principal(PrincipalKind::User, PLATFORM_TENANT_ID, &["admin"]);
        let customer_admin = principal(PrincipalKind::User, Uuid::new_v4(), &["admin"]);
        let service = principal(PrincipalKind::Service, PLATFORM_TENANT_ID, &[]);
        assert!(Requirement::PlatformAdmin.check(&staff).is_ok());
        assert!(Requirement::PlatformAdmin.check(&customer_admin).is_err());
        assert!(Requirement::PlatformAdmin.check(&service).is_err());
        assert!(Requirement::ServiceOrAdmin.check(&service).is_ok());
        assert!(Requirement::ServiceOrAdmin.check(&customer_admin).is_err());
        // An API key recorded with `admin` in the platform tenant is not staff.
        let staff_key = principal(PrincipalKind::ApiKey, PLATFORM_TENANT_ID, &["admin"]);
        assert!(Requirement::PlatformAdmin.check(&staff_key).is_err());
        assert!(Requirement::ServiceOrAdmin.check(&staff_key).is_err());
        // Service means a fleet service: staff do not pass.
        assert!(Requirement::Service.check(&service).is_ok());
        assert!(Requirement::Service.check(&staff).is_err());
    }

    #[test]
    fn restricted_user_tokens_pass_only_enrolment_rules() {
        let mut enrolling = principal(PrincipalKind::User, Uuid::new_v4(), &[]);
        enrolling.scopes = vec![ENROLL_SCOPE.to_owned()];
        assert!(Requirement::Enrollment.check(&enrolling).is_ok());
        assert!(Requirement::Public.check(&enrolling).is_ok());
        for refused in [
            Requirement::Authenticated,
            Requirement::Permission("tenant:read"),
            Requirement::ServiceOrAdmin,
        ] {
            assert!(refused.check(&enrolling).is_err(), "{refused:?}");
        }
    }
}
