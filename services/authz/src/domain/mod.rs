//! The rules of authorization, free of tonic and SQL.
//!
//! Permissions are `resource:action`; roles grant them with `*` and `resource:*`
//! wildcards; bindings give a subject a role in a tenant, tenant-wide or in one workspace.
//! A decision checks the tenant boundary before any role and denies by default.

pub mod decision;
pub mod permission;
pub mod roles;

use time::OffsetDateTime;
use uuid::Uuid;

pub use decision::{Decision, DenyReason};
pub use permission::{Grant, Required};
pub use roles::Role;

/// What kind of principal a subject is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubjectKind {
    /// A person.
    User,
    /// An API key.
    ApiKey,
    /// A fleet service or internal caller.
    Service,
}

impl SubjectKind {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::ApiKey => "api_key",
            Self::Service => "service",
        }
    }

    /// From storage.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "user" => Some(Self::User),
            "api_key" => Some(Self::ApiKey),
            "service" => Some(Self::Service),
            _ => None,
        }
    }
}

/// Who a decision is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subject {
    /// User, API key or service.
    pub kind: SubjectKind,
    /// Its id.
    pub id: String,
    /// Its home tenant.
    pub tenant_id: Uuid,
}

/// A role given to a subject in a tenant, tenant-wide or in one workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The binding's id.
    pub id: Uuid,
    /// The tenant.
    pub tenant_id: Uuid,
    /// Who holds the role.
    pub subject: Subject,
    /// The role's name (built-in or custom).
    pub role: String,
    /// `None`: the whole tenant.
    pub workspace_id: Option<Uuid>,
    /// Who granted it.
    pub granter_id: String,
    /// When.
    pub created_at: OffsetDateTime,
}

/// What changed, for the change feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A binding was granted.
    BindingCreated,
    /// A binding was revoked.
    BindingDeleted,
    /// A custom role was created.
    RoleCreated,
    /// A custom role's permissions or description changed.
    RoleUpdated,
    /// A custom role was deleted.
    RoleDeleted,
}

impl ChangeKind {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BindingCreated => "binding_created",
            Self::BindingDeleted => "binding_deleted",
            Self::RoleCreated => "role_created",
            Self::RoleUpdated => "role_updated",
            Self::RoleDeleted => "role_deleted",
        }
    }

    /// From storage.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "binding_created" => Some(Self::BindingCreated),
            "binding_deleted" => Some(Self::BindingDeleted),
            "role_created" => Some(Self::RoleCreated),
            "role_updated" => Some(Self::RoleUpdated),
            "role_deleted" => Some(Self::RoleDeleted),
            _ => None,
        }
    }
}

/// The object a change is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeObject {
    /// A binding (as it was, for deletions).
    Binding(Binding),
    /// A role (as it was, for deletions).
    Role(Role),
}

/// One entry of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Strictly increasing across the feed, in commit order.
    pub revision: u64,
    /// What happened.
    pub kind: ChangeKind,
    /// The tenant it happened in.
    pub tenant_id: Uuid,
    /// The binding or role.
    pub object: ChangeObject,
    /// When it was committed.
    pub committed_at: OffsetDateTime,
}
