//! Request validation: every bound checked before domain code, every bad field reported.
//!
//! A handler creates one [`Violations`], asks it to parse each field (which records what is
//! wrong and returns a harmless placeholder), then calls [`Violations::finish`]: the caller
//! gets INVALID_ARGUMENT naming every bad field at once, never only the first.

use uuid::Uuid;

use crate::error::{ApiError, FieldViolation, Reason};

/// Collects the bad fields of one request.
#[derive(Debug, Default)]
pub struct Violations {
    violations: Vec<FieldViolation>,
    /// A more precise `ErrorInfo.reason` than INVALID_ARGUMENT, from the first violation
    /// that had one.
    reason: Option<Reason>,
}

impl Violations {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a bad field.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Records a bad field whose kind has its own reason (e.g. `BATCH_TOO_LARGE`).
    pub fn add_with_reason(
        &mut self,
        field: impl Into<String>,
        description: impl Into<String>,
        reason: Reason,
    ) {
        self.add(field, description);
        self.reason.get_or_insert(reason);
    }

    /// Whether nothing was recorded so far.
    pub fn is_empty(&self) -> bool {
        self.violations.is_empty()
    }

    /// Parses a required UUID. Returns the nil UUID (never used: see [`Self::finish`]) when
    /// the field is invalid.
    pub fn uuid(&mut self, field: &str, value: &str) -> Uuid {
        if value.is_empty() {
            self.add(field, "required");
            return Uuid::nil();
        }
        match Uuid::try_parse(value) {
            Ok(id) if !id.is_nil() => id,
            Ok(_) => {
                self.add(field, "must not be the nil UUID");
                Uuid::nil()
            }
            Err(_) => {
                self.add(field, "must be a UUID");
                Uuid::nil()
            }
        }
    }

    /// Checks a string's length in characters, `min..=max`.
    pub fn length(&mut self, field: &str, value: &str, min: usize, max: usize) {
        let chars = value.chars().count();
        if chars < min {
            if min == 1 {
                self.add(field, "required");
            } else {
                self.add(field, format!("must be at least {min} characters"));
            }
        } else if chars > max {
            self.add(field, format!("must be at most {max} characters"));
        }
    }

    /// Checks a byte string's length, `min..=max`.
    pub fn byte_length(&mut self, field: &str, value: &[u8], min: usize, max: usize) {
        if value.len() < min {
            self.add(field, format!("must be at least {min} bytes"));
        } else if value.len() > max {
            self.add(field, format!("must be at most {max} bytes"));
        }
    }

    /// Checks a repeated field's count, `min..=max`.
    pub fn count(&mut self, field: &str, count: usize, min: usize, max: usize) {
        if count < min {
            self.add(field, format!("must hold at least {min} item(s)"));
        } else if count > max {
            self.add_with_reason(
                field,
                format!("must hold at most {max} items"),
                Reason::BatchTooLarge,
            );
        }
    }

    /// Checks that a string is a token of `[a-z0-9_.-]`, `1..=max` characters.
    pub fn token(&mut self, field: &str, value: &str, max: usize) {
        if value.is_empty() {
            self.add(field, "required");
        } else if value.len() > max {
            self.add(field, format!("must be at most {max} characters"));
        } else if !value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        }) {
            self.add(field, "may contain only a-z, 0-9, '_', '.' and '-'");
        }
    }

    /// Checks human-readable text (a name, a reason): `min..=max` characters and no control
    /// characters, so nothing smuggles line breaks or escapes into logs and listings.
    pub fn text(&mut self, field: &str, value: &str, min: usize, max: usize) {
        let before = self.violations.len();
        self.length(field, value, min, max);
        if self.violations.len() == before && value.chars().any(is_unsafe_in_text) {
            self.add(
                field,
                "must not contain control, line-separator or bidirectional-override characters",
            );
        }
    }

    /// Checks an update mask: present, not empty, every path allowed and named once.
    /// Returns the paths (empty when the mask is invalid).
    pub fn field_mask(
        &mut self,
        field: &str,
        mask: Option<&prost_types::FieldMask>,
        allowed: &[&str],
    ) -> Vec<String> {
        let Some(mask) = mask.filter(|m| !m.paths.is_empty()) else {
            self.add(field, "required: name the fields to change");
            return Vec::new();
        };
        let mut seen: Vec<String> = Vec::with_capacity(mask.paths.len());
        let before = self.violations.len();
        for path in &mask.paths {
            if !allowed.contains(&path.as_str()) {
                let shown: String = path.chars().take(64).collect();
                self.add(
                    field,
                    format!(
                        "path {shown:?} cannot be changed here; allowed: {}",
                        allowed.join(", ")
                    ),
                );
            } else if seen.contains(path) {
                self.add(field, format!("path {path:?} is named twice"));
            } else {
                seen.push(path.clone());
            }
        }
        if self.violations.len() == before {
            seen
        } else {
            Vec::new()
        }
    }

    /// Fails with INVALID_ARGUMENT listing every recorded field, or succeeds.
    pub fn finish(self) -> Result<(), ApiError> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            let err = ApiError::invalid_argument(self.violations);
            Err(match self.reason {
                Some(reason) => err.with_reason(reason),
                None => err,
            })
        }
    }
}

/// `value` made safe to record: each character [`Self::text`] refuses replaced with U+FFFD,
/// and cut to `max` characters. For text a caller reports rather than chooses (a user
/// agent, a path), which must be kept rather than refused.
pub fn sanitized(value: &str, max: usize) -> String {
    value
        .chars()
        .take(max)
        .map(|c| if is_unsafe_in_text(c) { '\u{FFFD}' } else { c })
        .collect()
}

/// Characters that could break a log line or disguise text: C0/C1 controls, the Unicode
/// line and paragraph separators, and the bidirectional overrides and isolates.
fn is_unsafe_in_text(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// AIP-158 page size: 0 means the default, above `max` is coerced to `max`, negative is
/// invalid.
pub fn page_size(violations: &mut Violations, value: i32, default: u32, max: u32) -> u32 {
    match u32::try_from(value) {
        Ok(0) => default,
        Ok(n) => n.min(max),
        Err(_) => {
            violations.add("page_size", "must not be negative");
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_every_bad_field() {
        let mut v = Violations::new();
        v.uuid("tenant_id", "not-a-uuid");
        v.token("purpose", "Has Spaces", 64);
        v.length("object_id", "", 1, 256);
        v.count("items", 1001, 1, 1000);
        let err = v.finish().expect_err("four violations");
        assert_eq!(err.reason(), Reason::BatchTooLarge);
        let fields: Vec<_> = err.violations().iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["tenant_id", "purpose", "object_id", "items"]);
    }

    #[test]
    fn accepts_good_fields() {
        let mut v = Violations::new();
        let id = v.uuid("tenant_id", "0192b5d4-8f5e-7c3a-9d2b-1a2b3c4d5e6f");
        v.token("purpose", "mfa.secret", 64);
        v.length("object_id", "file-1", 1, 256);
        assert!(v.finish().is_ok());
        assert!(!id.is_nil());
    }

    #[test]
    fn nil_uuid_is_refused() {
        let mut v = Violations::new();
        v.uuid("tenant_id", "00000000-0000-0000-0000-000000000000");
        assert!(v.finish().is_err());
    }

    #[test]
    fn text_refuses_control_characters() {
        let mut v = Violations::new();
        v.text("name", "Acme\nInc", 1, 128);
        v.text("display_name", "Zoë", 1, 128);
        v.text("reason", "line\u{2028}break", 1, 128);
        v.text("title", "evil\u{202E}txt.exe", 1, 128);
        let err = v.finish().expect_err("unsafe characters");
        let fields: Vec<_> = err.violations().iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["name", "reason", "title"]);
    }

    #[test]
    fn field_masks_name_only_allowed_paths_once() {
        let allowed = ["name", "plan"];
        let mask = |paths: &[&str]| prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        };
        let mut v = Violations::new();
        assert_eq!(
            v.field_mask("update_mask", Some(&mask(&["plan", "name"])), &allowed),
            ["plan", "name"]
        );
        assert!(v.is_empty());
        for bad in [
            Some(mask(&["tenant_id"])),
            Some(mask(&["name", "name"])),
            Some(mask(&[])),
            None,
        ] {
            let mut v = Violations::new();
            assert!(
                v.field_mask("update_mask", bad.as_ref(), &allowed)
                    .is_empty()
            );
            assert!(v.finish().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn page_size_bounds() {
        let mut v = Violations::new();
        assert_eq!(page_size(&mut v, 0, 50, 1000), 50);
        assert_eq!(page_size(&mut v, 7, 50, 1000), 7);
        assert_eq!(page_size(&mut v, 5000, 50, 1000), 1000);
        assert!(v.is_empty());
        page_size(&mut v, -1, 50, 1000);
        assert_eq!(v.finish().expect_err("negative").violations().len(), 1);
    }
}
