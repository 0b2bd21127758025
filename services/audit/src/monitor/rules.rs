//! The monitor's rules: what they match, what they count by, when they fire and what they
//! do. Read from a JSON file (`PENNY_AUDIT_MONITOR_RULES_FILE`); without one, the guide's
//! defaults ([`RuleSet::defaults`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use penny_proto::audit::v1 as pb;
use penny_proto::common::v1::PrincipalKind as PbKind;
use serde::Deserialize;

use crate::chain::{Payload, Record};

/// Most rules in one file.
const MAX_RULES: usize = 64;
/// The longest window a counting rule may have (7 days).
pub const MAX_WINDOW_SECS: u64 = 7 * 24 * 3600;
/// Buckets a window is counted in (a window is counted to within one bucket).
pub const BUCKETS_PER_WINDOW: u64 = 30;

/// How a rule decides to fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `threshold` matching events per key within `window_secs` (a window of 0 with a
    /// threshold of 1 fires on every matching event).
    Threshold,
    /// A sign-in from a network (/24 for IPv4, /48 for IPv6) the user was never seen on
    /// before (not on a user's first network).
    NewNetwork,
    /// A sign-in at an hour of the day (UTC) at which the user, with at least
    /// `min_history` earlier sign-ins, has never signed in, nor in the hours beside it.
    UnusualHour,
}

/// What a rule counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// The end user's IP address, across every tenant.
    Ip,
    /// The acting user.
    User,
    /// The acting API key.
    ApiKey,
    /// The tenant.
    Tenant,
}

impl KeyKind {
    /// The wire form.
    pub fn proto(self) -> pb::KeyKind {
        match self {
            Self::Ip => pb::KeyKind::Ip,
            Self::User => pb::KeyKind::User,
            Self::ApiKey => pb::KeyKind::ApiKey,
            Self::Tenant => pb::KeyKind::Tenant,
        }
    }
}

/// What a rule does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Record the alert.
    None,
    /// Block the IP address everywhere, in auth (`AuthService.BlockIp`).
    BlockIp,
    /// Suspend the user in tenants (`TenantService.SuspendUser`).
    SuspendUser,
    /// Raise a critical alert.
    ImmediateAlert,
}

impl Action {
    /// The wire form.
    pub fn proto(self) -> pb::AlertAction {
        match self {
            Self::None => pb::AlertAction::None,
            Self::BlockIp => pb::AlertAction::BlockIp,
            Self::SuspendUser => pb::AlertAction::SuspendUser,
            Self::ImmediateAlert => pb::AlertAction::ImmediateAlert,
        }
    }

    /// Whether another service carries it out.
    pub fn is_executed(self) -> bool {
        matches!(self, Self::BlockIp | Self::SuspendUser)
    }
}

/// How urgent a rule's alerts are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Informational.
    Low,
    /// Worth a look.
    Medium,
    /// Needs attention.
    High,
    /// Needs immediate attention.
    Critical,
}

impl Severity {
    /// The wire form.
    pub fn proto(self) -> pb::AlertSeverity {
        match self {
            Self::Low => pb::AlertSeverity::Low,
            Self::Medium => pb::AlertSeverity::Medium,
            Self::High => pb::AlertSeverity::High,
            Self::Critical => pb::AlertSeverity::Critical,
        }
    }
}

/// Which outcomes a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeName {
    /// Succeeded.
    Success,
    /// Failed.
    Failure,
    /// Refused.
    Denied,
}

/// Which principals a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalName {
    /// A person.
    User,
    /// An API key.
    ApiKey,
    /// A fleet service.
    Service,
}

/// Which events a rule looks at; every list given must contain the event's value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Actions (`auth.sign_in`); a trailing `*` matches a prefix.
    #[serde(default)]
    pub actions: Vec<String>,
    /// Outcomes.
    #[serde(default)]
    pub outcomes: Vec<OutcomeName>,
    /// Principal kinds.
    #[serde(default)]
    pub principal_kinds: Vec<PrincipalName>,
    /// Attribute → the values it may have.
    #[serde(default)]
    pub attributes: BTreeMap<String, Vec<String>>,
}

/// One rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The name alerts carry (`suspiciousLogin`); 1..64 ASCII letters, digits, `_`, `-`.
    pub name: String,
    /// How it fires.
    pub kind: Kind,
    /// Which events it looks at.
    #[serde(rename = "match", default)]
    pub matches: Match,
    /// What it counts by.
    pub key: KeyKind,
    /// Matching events per key (threshold rules).
    #[serde(default = "one")]
    pub threshold: u64,
    /// The window, in seconds (threshold rules; 0 only with a threshold of 1).
    #[serde(default)]
    pub window_secs: u64,
    /// What it does.
    pub action: Action,
    /// How urgent its alerts are.
    pub severity: Severity,
    /// Record the alert but do not carry out the action.
    #[serde(default)]
    pub dry_run: bool,
    /// How long a BLOCK_IP block lasts, in seconds (default one hour).
    #[serde(default = "hour")]
    pub block_secs: u64,
    /// Sign-ins a user needs before an hour can be unusual (unusual-hour rules).
    #[serde(default = "twenty")]
    pub min_history: u64,
}

fn one() -> u64 {
    1
}
fn hour() -> u64 {
    3600
}
fn twenty() -> u64 {
    20
}

/// The rules file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    /// The rules, each evaluated on every appended event.
    pub rules: Vec<Rule>,
}

/// The guide's defaults, plus the anomaly rules.
const DEFAULT_RULES: &str = r#"{
  "rules": [
    { "name": "suspiciousLogin", "kind": "threshold",
      "match": { "actions": ["auth.sign_in"], "outcomes": ["failure"],
                 "attributes": { "result": ["invalid_credentials"] } },
      "key": "ip", "threshold": 5, "window_secs": 300,
      "action": "block_ip", "block_secs": 3600, "severity": "high" },
    { "name": "dataExfiltration", "kind": "threshold",
      "match": { "principal_kinds": ["user"] },
      "key": "user", "threshold": 1000, "window_secs": 3600,
      "action": "suspend_user", "severity": "high" },
    { "name": "privilegeEscalation", "kind": "threshold",
      "match": { "actions": ["authz.grant_role"], "outcomes": ["success"],
                 "attributes": { "privilege_change": ["true"] } },
      "key": "tenant", "threshold": 1, "window_secs": 0,
      "action": "immediate_alert", "severity": "critical" },
    { "name": "newNetwork", "kind": "new_network",
      "match": { "actions": ["auth.sign_in"], "outcomes": ["success"] },
      "key": "user", "action": "none", "severity": "medium" },
    { "name": "unusualHour", "kind": "unusual_hour",
      "match": { "actions": ["auth.sign_in"], "outcomes": ["success"] },
      "key": "user", "min_history": 20, "action": "none", "severity": "low" },
    { "name": "highVelocity", "kind": "threshold",
      "match": { "actions": ["auth.sign_in"], "outcomes": ["success"] },
      "key": "user", "threshold": 10, "window_secs": 60,
      "action": "none", "severity": "medium" }
  ]
}"#;

impl RuleSet {
    /// The default rules.
    pub fn defaults() -> Self {
        Self::parse(DEFAULT_RULES.as_bytes()).unwrap_or(Self { rules: Vec::new() })
    }

    /// Parses and checks a rules file; the error names the rule and what is wrong.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let set: Self =
            serde_json::from_slice(bytes).map_err(|e| format!("not a rules file: {e}"))?;
        set.check()?;
        Ok(set)
    }

    fn check(&self) -> Result<(), String> {
        if self.rules.len() > MAX_RULES {
            return Err(format!("at most {MAX_RULES} rules"));
        }
        let mut names = std::collections::BTreeSet::new();
        for rule in &self.rules {
            let name = &rule.name;
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(format!(
                    "rule name {name:?}: 1..64 ASCII letters, digits, '_' or '-'"
                ));
            }
            if !names.insert(name.clone()) {
                return Err(format!("rule {name}: the name is used twice"));
            }
            if rule.kind == Kind::Threshold {
                if rule.threshold == 0 || rule.threshold > 1_000_000 {
                    return Err(format!("rule {name}: threshold must be 1..1000000"));
                }
                if rule.window_secs > MAX_WINDOW_SECS {
                    return Err(format!("rule {name}: window_secs must be at most 7 days"));
                }
                if rule.window_secs == 0 && rule.threshold != 1 {
                    return Err(format!("rule {name}: a window of 0 needs a threshold of 1"));
                }
            } else if rule.key != KeyKind::User {
                return Err(format!("rule {name}: anomaly rules count by user"));
            }
            if !(1..=365 * 24 * 3600).contains(&rule.block_secs) {
                return Err(format!("rule {name}: block_secs must be 1 s..365 days"));
            }
            match (rule.action, rule.key) {
                (Action::BlockIp, KeyKind::Ip) | (Action::SuspendUser, KeyKind::User) => {}
                (Action::BlockIp, _) => {
                    return Err(format!("rule {name}: block_ip needs key \"ip\""));
                }
                (Action::SuspendUser, _) => {
                    return Err(format!("rule {name}: suspend_user needs key \"user\""));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether some rule's action must be carried out by auth (`true`, _) or tenants
    /// (_, `true`).
    pub fn needs(&self) -> (bool, bool) {
        let live = |action| self.rules.iter().any(|r| !r.dry_run && r.action == action);
        (live(Action::BlockIp), live(Action::SuspendUser))
    }
}

impl Match {
    /// Whether the event is one the rule looks at.
    pub fn matches(&self, record: &Record, payload: &Payload) -> bool {
        let action_ok = self.actions.is_empty()
            || self.actions.iter().any(|a| match a.strip_suffix('*') {
                Some(prefix) => record.action.starts_with(prefix),
                None => *a == record.action,
            });
        let outcome_ok = self.outcomes.is_empty()
            || self.outcomes.iter().any(|o| {
                record.outcome
                    == match o {
                        OutcomeName::Success => pb::Outcome::Success,
                        OutcomeName::Failure => pb::Outcome::Failure,
                        OutcomeName::Denied => pb::Outcome::Denied,
                    } as i32
            });
        let principal_ok = self.principal_kinds.is_empty()
            || self.principal_kinds.iter().any(|k| {
                record.principal_kind
                    == match k {
                        PrincipalName::User => PbKind::User,
                        PrincipalName::ApiKey => PbKind::ApiKey,
                        PrincipalName::Service => PbKind::Service,
                    } as i32
            });
        let attributes_ok = self.attributes.iter().all(|(name, allowed)| {
            payload
                .attributes
                .get(name)
                .is_some_and(|value| allowed.contains(value))
        });
        action_ok && outcome_ok && principal_ok && attributes_ok
    }
}

impl Rule {
    /// The value this rule counts the event by, or `None` when the event has none (an
    /// event without an address, by nobody).
    pub fn key_of(&self, record: &Record, payload: &Payload) -> Option<String> {
        let user_of = |kind: PbKind| {
            (record.principal_kind == kind as i32 && !payload.user_id.is_empty())
                .then(|| payload.user_id.clone())
        };
        match self.key {
            KeyKind::Ip => payload
                .ip_address
                .parse::<IpAddr>()
                .ok()
                .map(|ip| ip.to_canonical().to_string()),
            KeyKind::User => user_of(PbKind::User),
            KeyKind::ApiKey => user_of(PbKind::ApiKey),
            KeyKind::Tenant => Some(record.tenant_id.to_string()),
        }
    }

    /// The width of one counting bucket, in seconds.
    pub fn bucket_secs(&self) -> i64 {
        i64::try_from((self.window_secs / BUCKETS_PER_WINDOW).max(1)).unwrap_or(1)
    }
}

/// The network an address belongs to for the new-network rule: its /24 (IPv4) or /48
/// (IPv6).
pub fn network_of(ip: &str) -> Option<String> {
    match ip.parse::<IpAddr>().ok()?.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            Some(format!("{a}.{b}.{c}.0/24"))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            Some(format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(action: &str, outcome: pb::Outcome, kind: PbKind) -> Record {
        Record {
            tenant_id: uuid::Uuid::nil(),
            sequence: 0,
            event_id: uuid::Uuid::nil(),
            service: "auth".into(),
            producer_id: String::new(),
            action: action.into(),
            resource: String::new(),
            resource_id: String::new(),
            principal_kind: kind as i32,
            outcome: outcome as i32,
            method: String::new(),
            duration_micros: 0,
            status: 0,
            trace_id: String::new(),
            event_time_micros: 0,
            receive_time_micros: 0,
        }
    }

    #[test]
    fn the_defaults_parse_and_match_what_the_guide_names() {
        let set = RuleSet::defaults();
        assert_eq!(set.rules.len(), 6);
        let login = &set.rules[0];
        let failed = record("auth.sign_in", pb::Outcome::Failure, PbKind::Unspecified);
        let mut payload = Payload {
            ip_address: "::ffff:203.0.113.7".into(),
            ..Payload::default()
        };
        // A sign-in that failed for another reason (a dependency down) is no guess.
        assert!(!login.matches.matches(&failed, &payload));
        payload
            .attributes
            .insert("result".into(), "invalid_credentials".into());
        assert!(login.matches.matches(&failed, &payload));
        assert_eq!(
            login.key_of(&failed, &payload).as_deref(),
            Some("203.0.113.7")
        );
        let ok = record("auth.sign_in", pb::Outcome::Success, PbKind::User);
        assert!(!login.matches.matches(&ok, &payload));
        let grant = record("authz.grant_role", pb::Outcome::Success, PbKind::User);
        let mut attrs = Payload::default();
        assert!(!set.rules[2].matches.matches(&grant, &attrs));
        attrs
            .attributes
            .insert("privilege_change".into(), "true".into());
        assert!(set.rules[2].matches.matches(&grant, &attrs));
        assert_eq!(set.needs(), (true, true));
    }

    #[test]
    fn bad_rules_are_refused_naming_the_rule() {
        let bad = |json: &str| RuleSet::parse(json.as_bytes()).unwrap_err();
        assert!(bad(r#"{"rules":[{"name":"x","kind":"threshold","key":"user","action":"block_ip","severity":"low"}]}"#).contains("block_ip needs key"));
        assert!(bad(r#"{"rules":[{"name":"x","kind":"threshold","key":"ip","threshold":2,"action":"none","severity":"low"}]}"#).contains("window of 0"));
        assert!(bad(r#"{"rules":[{"name":"x y","kind":"threshold","key":"ip","action":"none","severity":"low"}]}"#).contains("rule name"));
        assert!(bad(r#"{"rules":[],"extra":1}"#).contains("not a rules file"));
    }

    #[test]
    fn networks_are_slash_24_and_slash_48() {
        assert_eq!(
            network_of("198.51.100.23").as_deref(),
            Some("198.51.100.0/24")
        );
        assert_eq!(
            network_of("2001:db8:abcd:12::1").as_deref(),
            Some("2001:db8:abcd::/48")
        );
        assert_eq!(network_of("nope"), None);
    }
}
