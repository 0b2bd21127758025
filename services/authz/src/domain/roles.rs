//! Roles: the built-in four from the security guide, and per-tenant custom roles.

use time::OffsetDateTime;
use uuid::Uuid;

use super::permission::Grant;

/// The built-in roles, exactly as the security guide lists them.
pub const BUILT_IN: [(&str, &str, &[&str]); 4] = [
    (
        "admin",
        "platform staff: everything; exists only in the platform tenant",
        &["*"],
    ),
    (
        "owner",
        "runs a tenant: its settings, users, workspaces and billing",
        &["tenant:*", "user:*", "workspace:*", "billing:*"],
    ),
    (
        "member",
        "uses the product: conversations, messages, uploads, tools",
        &["conversation:*", "message:*", "file:upload", "tool:execute"],
    ),
    (
        "viewer",
        "reads conversations, messages and files",
        &["conversation:read", "message:read", "file:read"],
    ),
];

/// The role that only platform staff may hold.
pub const ADMIN_ROLE: &str = "admin";
/// The role whose grant is always flagged as a privilege change.
pub const OWNER_ROLE: &str = "owner";

/// Longest role name.
pub const MAX_ROLE_NAME_LEN: usize = 64;
/// Most permissions in one custom role.
pub const MAX_ROLE_PERMISSIONS: usize = 100;

/// A role: built-in (no tenant) or a tenant's custom role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// The owning tenant; `None` for built-ins.
    pub tenant_id: Option<Uuid>,
    /// Unique within the tenant and never a built-in name.
    pub name: String,
    /// For people.
    pub description: String,
    /// What it grants, parsed.
    pub grants: Vec<Grant>,
    /// When it was made (built-ins: the epoch).
    pub created_at: OffsetDateTime,
    /// When it last changed.
    pub updated_at: OffsetDateTime,
}

impl Role {
    /// Whether this is one of the four built-ins.
    pub fn built_in(&self) -> bool {
        self.tenant_id.is_none()
    }
}

/// The built-in role of that name.
pub fn built_in(name: &str) -> Option<Role> {
    BUILT_IN
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(name, description, grants)| Role {
            tenant_id: None,
            name: (*name).to_owned(),
            description: (*description).to_owned(),
            grants: grants.iter().filter_map(|g| Grant::parse(g).ok()).collect(),
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        })
}

/// Every built-in role.
pub fn built_ins() -> Vec<Role> {
    BUILT_IN
        .iter()
        .filter_map(|(name, _, _)| built_in(name))
        .collect()
}

/// Checks a custom role name: `[a-z0-9_-]{1,64}` and not a built-in's.
pub fn check_custom_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_ROLE_NAME_LEN {
        return Err("must be 1-64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err("may contain only a-z, 0-9, '_' and '-'");
    }
    if built_in(name).is_some() {
        return Err("is the name of a built-in role");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_ins_parse_exactly_as_the_guide_lists_them() {
        let roles = built_ins();
        assert_eq!(roles.len(), 4);
        let owner = built_in("owner").unwrap();
        let names: Vec<String> = owner.grants.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["tenant:*", "user:*", "workspace:*", "billing:*"]);
        assert_eq!(built_in("admin").unwrap().grants, vec![Grant::All]);
        assert_eq!(built_in("viewer").unwrap().grants.len(), 3);
        assert_eq!(built_in("member").unwrap().grants.len(), 4);
    }

    #[test]
    fn custom_names() {
        assert!(check_custom_name("support-agent").is_ok());
        assert!(check_custom_name("owner").is_err());
        assert!(check_custom_name("Owner").is_err());
        assert!(check_custom_name("").is_err());
        assert!(check_custom_name(&"a".repeat(65)).is_err());
    }
}
