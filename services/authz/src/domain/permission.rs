//! Permissions are `resource:action`. A role grants `*` (everything), `resource:*` (every
//! action on one resource) or `resource:action`; a check asks for one concrete
//! `resource:action`. Nothing else parses, so no string can widen a grant by accident.

use std::fmt;

/// Longest resource or action name.
pub const MAX_PART_LEN: usize = 64;

fn valid_part(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= MAX_PART_LEN
        && part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A concrete permission a caller needs: `resource:action`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Required {
    resource: String,
    action: String,
}

impl Required {
    /// Parses `resource:action` (no wildcards).
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let (resource, action) = text.split_once(':').ok_or("must be resource:action")?;
        if resource == "*" || action == "*" {
            return Err("a checked permission is concrete: no wildcards");
        }
        if !valid_part(resource) || !valid_part(action) {
            return Err("resource and action are 1-64 characters of a-z, 0-9, '_' and '-'");
        }
        Ok(Self {
            resource: resource.to_owned(),
            action: action.to_owned(),
        })
    }

    /// The resource.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The action.
    pub fn action(&self) -> &str {
        &self.action
    }
}

impl fmt::Display for Required {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.resource, self.action)
    }
}

/// What a role grants.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Grant {
    /// `*`: everything (only the built-in `admin`, only in the platform tenant).
    All,
    /// `resource:*`.
    Resource(String),
    /// `resource:action`.
    Exact(String, String),
}

impl Grant {
    /// Parses `*`, `resource:*` or `resource:action`.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        if text == "*" {
            return Ok(Self::All);
        }
        let (resource, action) = text
            .split_once(':')
            .ok_or("must be *, resource:* or resource:action")?;
        if !valid_part(resource) {
            return Err("resource is 1-64 characters of a-z, 0-9, '_' and '-'");
        }
        if action == "*" {
            return Ok(Self::Resource(resource.to_owned()));
        }
        if !valid_part(action) {
            return Err("action is *, or 1-64 characters of a-z, 0-9, '_' and '-'");
        }
        Ok(Self::Exact(resource.to_owned(), action.to_owned()))
    }

    /// Whether this grant allows the required permission.
    pub fn allows(&self, required: &Required) -> bool {
        match self {
            Self::All => true,
            Self::Resource(resource) => *resource == required.resource,
            Self::Exact(resource, action) => {
                *resource == required.resource && *action == required.action
            }
        }
    }

    /// Whether holding this grant means holding everything `other` grants (used to refuse
    /// privilege escalation: you may hand out only what you hold).
    pub fn covers(&self, other: &Grant) -> bool {
        match (self, other) {
            (Self::All, _) => true,
            (_, Self::All) => false,
            (Self::Resource(mine), Self::Resource(theirs)) => mine == theirs,
            (Self::Resource(mine), Self::Exact(theirs, _)) => mine == theirs,
            (Self::Exact(..), Self::Resource(_)) => false,
            (Self::Exact(r1, a1), Self::Exact(r2, a2)) => r1 == r2 && a1 == a2,
        }
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("*"),
            Self::Resource(resource) => write!(f, "{resource}:*"),
            Self::Exact(resource, action) => write!(f, "{resource}:{action}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn part() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9_-]{0,8}"
    }

    fn grant() -> impl Strategy<Value = Grant> {
        prop_oneof![
            Just(Grant::All),
            part().prop_map(Grant::Resource),
            (part(), part()).prop_map(|(r, a)| Grant::Exact(r, a)),
        ]
    }

    proptest! {
        #[test]
        fn wildcards_mean_what_they_say(resource in part(), action in part(), other in part()) {
            let required = Required::parse(&format!("{resource}:{action}")).unwrap();
            prop_assert!(Grant::All.allows(&required));
            prop_assert!(Grant::Resource(resource.clone()).allows(&required));
            prop_assert!(Grant::Exact(resource.clone(), action.clone()).allows(&required));
            if other != resource {
                prop_assert!(!Grant::Resource(other.clone()).allows(&required));
                prop_assert!(!Grant::Exact(other.clone(), action.clone()).allows(&required));
            }
            if other != action {
                prop_assert!(!Grant::Exact(resource.clone(), other).allows(&required));
            }
        }

        #[test]
        fn parse_and_display_round_trip(g in grant()) {
            prop_assert_eq!(Grant::parse(&g.to_string()).unwrap(), g);
        }

        /// Coverage is sound: whatever a covered grant allows, the covering grant allows.
        #[test]
        fn covers_is_sound(a in grant(), b in grant(), resource in part(), action in part()) {
            let required = Required::parse(&format!("{resource}:{action}")).unwrap();
            if a.covers(&b) && b.allows(&required) {
                prop_assert!(a.allows(&required));
            }
        }

        /// Nothing but `*` covers `*`, and a narrower grant never covers a wider one.
        #[test]
        fn no_escalation_through_coverage(resource in part(), action in part()) {
            prop_assert!(!Grant::Resource(resource.clone()).covers(&Grant::All));
            prop_assert!(!Grant::Exact(resource.clone(), action.clone()).covers(&Grant::All));
            prop_assert!(!Grant::Exact(resource.clone(), action).covers(&Grant::Resource(resource)));
        }

        #[test]
        fn garbage_never_parses(text in "\\\\PC{0,20}") {
            if let Ok(required) = Required::parse(&text) {
                prop_assert_eq!(required.to_string(), text);
            }
        }
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "", "a", "a:", ":b", "A:b", "a:B", "a:*", "*:b", "*", "a:b:c", "a b:c", "a:b ",
        ] {
            assert!(Required::parse(bad).is_err(), "{bad}");
        }
        for bad in ["", "a", ":*", "*:*", "a:b:c", "**", "a:**"] {
            assert!(Grant::parse(bad).is_err(), "{bad}");
        }
    }
}
