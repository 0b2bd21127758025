//! The decision: tenant boundary first, then the subject's bindings, deny by default.

use uuid::Uuid;

use super::permission::{Grant, Required};
use super::roles::{ADMIN_ROLE, Role};
use super::{Binding, Subject};

/// Why access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// The subject belongs to another tenant: no role is even looked at.
    TenantMismatch,
    /// The subject has no binding in scope.
    NoBinding,
    /// Bindings exist but none of their roles grants the permission.
    NoMatchingPermission,
}

/// The outcome of a check, with its explanation.
// Boxing the allowed case would add an allocation to every successful check; the value is
// moved twice at most.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by this binding, role and grant.
    Allowed {
        /// The binding that matched.
        binding: Binding,
        /// Its role.
        role: Role,
        /// The grant that allowed it.
        grant: Grant,
    },
    /// Refused.
    Denied(DenyReason),
}

impl Decision {
    /// Whether access is allowed.
    pub fn allowed(&self) -> bool {
        matches!(self, Self::Allowed { .. })
    }
}

/// Whether a binding applies to a check at `workspace`: tenant-wide bindings apply
/// everywhere in the tenant, workspace bindings only in their workspace.
fn in_scope(binding: &Binding, workspace: Option<Uuid>) -> bool {
    match binding.workspace_id {
        None => true,
        Some(bound) => workspace == Some(bound),
    }
}

/// Decides whether `subject` holds `required` in `tenant` (at `workspace`, if any).
///
/// `bindings` are the subject's bindings in `tenant`; `role` resolves a role name in that
/// tenant (built-in or custom). The tenant boundary is checked before any role, and the
/// `admin` role counts only in `platform_tenant`, so no wildcard crosses tenants.
pub fn decide<'r>(
    tenant: Uuid,
    platform_tenant: Uuid,
    subject: &Subject,
    required: &Required,
    workspace: Option<Uuid>,
    bindings: &[Binding],
    role: impl Fn(&str) -> Option<&'r Role>,
) -> Decision {
    if subject.tenant_id != tenant {
        return Decision::Denied(DenyReason::TenantMismatch);
    }
    let mut any_binding = false;
    for binding in bindings {
        if binding.tenant_id != tenant
            || binding.subject != *subject
            || !in_scope(binding, workspace)
        {
            continue;
        }
        if binding.role == ADMIN_ROLE && tenant != platform_tenant {
            continue;
        }
        any_binding = true;
        let Some(role) = role(&binding.role) else {
            continue;
        };
        if let Some(grant) = role.grants.iter().find(|g| g.allows(required)) {
            return Decision::Allowed {
                binding: binding.clone(),
                role: role.clone(),
                grant: grant.clone(),
            };
        }
    }
    Decision::Denied(if any_binding {
        DenyReason::NoMatchingPermission
    } else {
        DenyReason::NoBinding
    })
}

/// Every grant `subject` holds in `tenant` at `workspace`, de-duplicated, in binding order.
pub fn effective_grants<'r>(
    tenant: Uuid,
    platform_tenant: Uuid,
    subject: &Subject,
    workspace: Option<Uuid>,
    bindings: &[Binding],
    role: impl Fn(&str) -> Option<&'r Role>,
) -> Vec<Grant> {
    let mut grants: Vec<Grant> = Vec::new();
    if subject.tenant_id != tenant {
        return grants;
    }
    for binding in bindings {
        if binding.tenant_id != tenant
            || binding.subject != *subject
            || !in_scope(binding, workspace)
        {
            continue;
        }
        if binding.role == ADMIN_ROLE && tenant != platform_tenant {
            continue;
        }
        if let Some(role) = role(&binding.role) {
            for grant in &role.grants {
                if !grants.contains(grant) {
                    grants.push(grant.clone());
                }
            }
        }
    }
    grants
}

/// Whether `held` covers every grant in `wanted`: the rule that refuses escalation.
pub fn covers_all(held: &[Grant], wanted: &[Grant]) -> bool {
    wanted.iter().all(|w| held.iter().any(|h| h.covers(w)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SubjectKind;
    use crate::domain::roles::built_in;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use time::OffsetDateTime;

    const PLATFORM: Uuid = Uuid::from_u128(1);

    fn subject(tenant: Uuid, id: &str) -> Subject {
        Subject {
            kind: SubjectKind::User,
            id: id.to_owned(),
            tenant_id: tenant,
        }
    }

    fn binding(tenant: Uuid, subject: &Subject, role: &str, workspace: Option<Uuid>) -> Binding {
        Binding {
            id: Uuid::new_v4(),
            tenant_id: tenant,
            subject: subject.clone(),
            role: role.to_owned(),
            workspace_id: workspace,
            granter_id: "test".into(),
            created_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn roles() -> HashMap<String, Role> {
        ["admin", "owner", "member", "viewer"]
            .into_iter()
            .map(|n| (n.to_owned(), built_in(n).unwrap()))
            .collect()
    }

    fn check(
        tenant: Uuid,
        who: &Subject,
        permission: &str,
        workspace: Option<Uuid>,
        bindings: &[Binding],
    ) -> Decision {
        let roles = roles();
        decide(
            tenant,
            PLATFORM,
            who,
            &Required::parse(permission).unwrap(),
            workspace,
            bindings,
            |name| roles.get(name),
        )
    }

    #[test]
    fn owner_member_viewer_as_the_guide_says() {
        let t = Uuid::new_v4();
        let alice = subject(t, "alice");
        let owner = [binding(t, &alice, "owner", None)];
        assert!(check(t, &alice, "user:invite", None, &owner).allowed());
        assert!(check(t, &alice, "billing:read", None, &owner).allowed());
        assert!(!check(t, &alice, "conversation:read", None, &owner).allowed());
        let member = [binding(t, &alice, "member", None)];
        assert!(check(t, &alice, "file:upload", None, &member).allowed());
        assert!(!check(t, &alice, "file:read", None, &member).allowed());
        let viewer = [binding(t, &alice, "viewer", None)];
        assert!(check(t, &alice, "message:read", None, &viewer).allowed());
        assert_eq!(
            check(t, &alice, "message:write", None, &viewer),
            Decision::Denied(DenyReason::NoMatchingPermission)
        );
        assert_eq!(
            check(t, &alice, "message:read", None, &[]),
            Decision::Denied(DenyReason::NoBinding)
        );
    }

    #[test]
    fn admin_counts_only_in_the_platform_tenant() {
        let staff = subject(PLATFORM, "staff");
        assert!(
            check(
                PLATFORM,
                &staff,
                "tenant:delete",
                None,
                &[binding(PLATFORM, &staff, "admin", None)]
            )
            .allowed()
        );
        let t = Uuid::new_v4();
        let sneaky = subject(t, "sneaky");
        assert!(
            !check(
                t,
                &sneaky,
                "tenant:delete",
                None,
                &[binding(t, &sneaky, "admin", None)]
            )
            .allowed()
        );
    }

    #[test]
    fn workspace_bindings_stay_in_their_workspace() {
        let t = Uuid::new_v4();
        let (w1, w2) = (Uuid::new_v4(), Uuid::new_v4());
        let bob = subject(t, "bob");
        let bindings = [binding(t, &bob, "member", Some(w1))];
        assert!(check(t, &bob, "message:write", Some(w1), &bindings).allowed());
        assert!(!check(t, &bob, "message:write", Some(w2), &bindings).allowed());
        assert!(!check(t, &bob, "message:write", None, &bindings).allowed());
    }

    fn permission() -> impl Strategy<Value = String> {
        (
            prop::sample::select(vec![
                "tenant",
                "user",
                "workspace",
                "billing",
                "conversation",
                "message",
                "file",
                "tool",
                "other",
            ]),
            prop::sample::select(vec![
                "read", "write", "delete", "upload", "execute", "invite",
            ]),
        )
            .prop_map(|(r, a)| format!("{r}:{a}"))
    }

    proptest! {
        /// No binding, role or wildcard of one tenant allows anything in another, whoever
        /// the subject is, even the platform admin.
        #[test]
        fn nothing_crosses_the_tenant_boundary(
            perm in permission(),
            role in prop::sample::select(vec!["admin", "owner", "member", "viewer"]),
            home_is_platform in any::<bool>(),
        ) {
            let home = if home_is_platform { PLATFORM } else { Uuid::new_v4() };
            let other = Uuid::new_v4();
            let who = subject(home, "x");
            let bindings = [binding(home, &who, role, None), binding(other, &who, role, None)];
            prop_assert_eq!(check(other, &who, &perm, None, &bindings), Decision::Denied(DenyReason::TenantMismatch));
        }

        /// Deny by default: without bindings nothing is allowed.
        #[test]
        fn deny_by_default(perm in permission()) {
            let t = Uuid::new_v4();
            prop_assert!(!check(t, &subject(t, "nobody"), &perm, None, &[]).allowed());
        }

        /// Another subject's bindings never count.
        #[test]
        fn bindings_are_personal(perm in permission()) {
            let t = Uuid::new_v4();
            let (a, b) = (subject(t, "a"), subject(t, "b"));
            prop_assert!(!check(t, &b, &perm, None, &[binding(t, &a, "admin", None), binding(t, &a, "owner", None)]).allowed());
        }

        /// Escalation is refused: a holder of `from` may hand out `to` only when every grant
        /// of `to` is covered by what it holds, and whatever it can hand out, it can do.
        #[test]
        fn escalation_is_refused(
            from in prop::sample::select(vec!["admin", "owner", "member", "viewer"]),
            to in prop::sample::select(vec!["admin", "owner", "member", "viewer"]),
            perm in permission(),
        ) {
            let roles = roles();
            let held = &roles[from].grants;
            let wanted = &roles[to].grants;
            let may_grant = covers_all(held, wanted);
            if may_grant {
                let required = Required::parse(&perm).unwrap();
                if wanted.iter().any(|g| g.allows(&required)) {
                    prop_assert!(held.iter().any(|g| g.allows(&required)));
                }
            }
            if from != "admin" && to == "admin" {
                prop_assert!(!may_grant);
            }
            if from == "viewer" && to != "viewer" {
                prop_assert!(!may_grant);
            }
        }
    }
}
