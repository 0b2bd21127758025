//! The tenant model: tenants with their plan and security policy, users, workspaces. Pure
//! values and the rules that bound them; no I/O.

use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

/// A tenant's subscription plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// 20 requests per minute.
    Free,
    /// 60 requests per minute.
    Starter,
    /// 200 requests per minute.
    Pro,
    /// 1000 requests per minute.
    Enterprise,
}

impl Plan {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Starter => "starter",
            Self::Pro => "pro",
            Self::Enterprise => "enterprise",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "free" => Self::Free,
            "starter" => Self::Starter,
            "pro" => Self::Pro,
            "enterprise" => Self::Enterprise,
            _ => return None,
        })
    }
}

/// A tenant's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantState {
    /// In use.
    Active,
    /// A creation or deletion saga has not finished; not usable.
    Pending,
    /// Deleted: key destroyed, bindings revoked, users tombstoned.
    Deleted,
}

impl TenantState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Pending => "pending",
            Self::Deleted => "deleted",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "active" => Self::Active,
            "pending" => Self::Pending,
            "deleted" => Self::Deleted,
            _ => return None,
        })
    }
}

/// Which saga a PENDING tenant is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saga {
    /// None running.
    Idle,
    /// Creating: the key and the owner's binding may be missing.
    Create,
    /// Deleting: bindings, key and users may still exist.
    Delete,
}

impl Saga {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "",
            Self::Create => "create",
            Self::Delete => "delete",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "" => Self::Idle,
            "create" => Self::Create,
            "delete" => Self::Delete,
            _ => return None,
        })
    }
}

/// A user's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserStatus {
    /// May sign in.
    Active,
    /// Blocked.
    Suspended,
    /// Removed; personal data gone.
    Deleted,
}

impl UserStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Deleted => "deleted",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "active" => Self::Active,
            "suspended" => Self::Suspended,
            "deleted" => Self::Deleted,
            _ => return None,
        })
    }
}

/// Bounds of the security policy.
pub mod policy_bounds {
    use std::time::Duration;

    /// Shortest session lifetime.
    pub const SESSION_MIN: Duration = Duration::from_secs(5 * 60);
    /// Longest session lifetime.
    pub const SESSION_MAX: Duration = Duration::from_secs(30 * 24 * 3600);
    /// Fewest failures before a lockout.
    pub const THRESHOLD_MIN: u32 = 1;
    /// Most failures before a lockout.
    pub const THRESHOLD_MAX: u32 = 100;
    /// Shortest lockout window and duration.
    pub const LOCKOUT_MIN: Duration = Duration::from_secs(60);
    /// Longest lockout window and duration.
    pub const LOCKOUT_MAX: Duration = Duration::from_secs(24 * 3600);
}

/// A tenant's security settings, enforced by the auth service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecurityPolicy {
    /// Whether every user must use MFA.
    pub mfa_required: bool,
    /// Session and access-token lifetime.
    pub session_lifetime: Duration,
    /// Failures tolerated in the window before locking.
    pub lockout_threshold: u32,
    /// The window failures are counted in.
    pub lockout_window: Duration,
    /// The first lockout's duration.
    pub lockout_duration: Duration,
}

impl Default for SecurityPolicy {
    fn default() -> Self {
        Self {
            mfa_required: false,
            session_lifetime: Duration::from_secs(24 * 3600),
            lockout_threshold: 5,
            lockout_window: Duration::from_secs(300),
            lockout_duration: Duration::from_secs(15 * 60),
        }
    }
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Its id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// Unique handle.
    pub slug: String,
    /// The plan.
    pub plan: Plan,
    /// The security policy.
    pub policy: SecurityPolicy,
    /// The lifecycle state.
    pub state: TenantState,
    /// The saga a PENDING tenant is in.
    pub saga: Saga,
    /// Whether this is the platform tenant.
    pub platform: bool,
    /// The CreateTenant idempotency key.
    pub request_id: Option<Uuid>,
    /// The first user.
    pub owner_id: Option<Uuid>,
    /// Created at.
    pub created_at: OffsetDateTime,
    /// Last changed at.
    pub updated_at: OffsetDateTime,
}

/// A person in a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Its id.
    pub id: Uuid,
    /// Its tenant.
    pub tenant_id: Uuid,
    /// Email as given (empty once deleted).
    pub email: String,
    /// Display name (empty once deleted).
    pub display_name: String,
    /// The status.
    pub status: UserStatus,
    /// Why suspended; empty otherwise.
    pub suspend_reason: String,
    /// The security-monitor alert behind the suspension, if any.
    pub suspend_alert_id: Option<Uuid>,
    /// Created at.
    pub created_at: OffsetDateTime,
    /// Last changed at.
    pub updated_at: OffsetDateTime,
}

/// A workspace in a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    /// Its id.
    pub id: Uuid,
    /// Its tenant.
    pub tenant_id: Uuid,
    /// Name, unique per tenant (case-insensitive).
    pub name: String,
    /// Description.
    pub description: String,
    /// Created at.
    pub created_at: OffsetDateTime,
}

/// Longest display name, tenant name or workspace name, in characters.
pub const MAX_NAME_LEN: usize = 128;
/// Longest workspace description.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Longest suspension or reactivation reason.
pub const MAX_REASON_LEN: usize = 512;
/// Shortest and longest email.
pub const EMAIL_LEN: (usize, usize) = (3, 254);
/// Shortest and longest slug.
pub const SLUG_LEN: (usize, usize) = (3, 63);
/// The platform tenant's slug, which no customer tenant may take.
pub const PLATFORM_SLUG: &str = "platform";

/// The current time at the precision every database keeps (microseconds), so a value
/// handed back before storing equals the one read back later.
pub fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1000 * 1000)
        .unwrap_or(now)
}

/// Why a slug is unusable, if it is.
pub fn slug_problem(slug: &str) -> Option<&'static str> {
    let (min, max) = SLUG_LEN;
    if slug.len() < min || slug.len() > max {
        return Some("must be 3..63 characters");
    }
    if !slug.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Some("must start with a letter a-z");
    }
    if !slug
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some("may contain only a-z, 0-9 and '-'");
    }
    if slug == PLATFORM_SLUG {
        return Some("is reserved");
    }
    None
}

/// Why an email is unusable, if it is. Deliberately plain: one `@`, something on each side,
/// no spaces or control characters; deliverability is the mail system's business.
pub fn email_problem(email: &str) -> Option<&'static str> {
    let (min, max) = EMAIL_LEN;
    let chars = email.chars().count();
    if chars < min || chars > max {
        return Some("must be 3..254 characters");
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("must not contain spaces or control characters");
    }
    match email.split_once('@') {
        Some((local, domain))
            if !local.is_empty() && !domain.is_empty() && !domain.contains('@') =>
        {
            None
        }
        _ => Some("must be an address of the form local@domain"),
    }
}

/// The case-insensitive key emails and workspace names are unique by.
pub fn fold_case(text: &str) -> String {
    text.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        for good in ["acme", "a-1", "abc-def-123"] {
            assert_eq!(slug_problem(good), None, "{good}");
        }
        for bad in [
            "ab",
            "1abc",
            "-abc",
            "Acme",
            "ac me",
            "acmé",
            "platform",
            &"a".repeat(64),
        ] {
            assert!(slug_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn emails() {
        for good in ["a@b", "Ann.Lee+chat@example.org"] {
            assert_eq!(email_problem(good), None, "{good}");
        }
        for bad in ["ab", "a@", "@b", "a@b@c", "a b@c", "a@b\n", "noatsign"] {
            assert!(email_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn stored_names_round_trip() {
        for plan in [Plan::Free, Plan::Starter, Plan::Pro, Plan::Enterprise] {
            assert_eq!(Plan::parse(plan.as_str()), Some(plan));
        }
        for state in [
            TenantState::Active,
            TenantState::Pending,
            TenantState::Deleted,
        ] {
            assert_eq!(TenantState::parse(state.as_str()), Some(state));
        }
        for saga in [Saga::Idle, Saga::Create, Saga::Delete] {
            assert_eq!(Saga::parse(saga.as_str()), Some(saga));
        }
        for status in [
            UserStatus::Active,
            UserStatus::Suspended,
            UserStatus::Deleted,
        ] {
            assert_eq!(UserStatus::parse(status.as_str()), Some(status));
        }
    }
}
