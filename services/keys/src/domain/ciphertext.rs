//! Ciphertext strings: `penny:v<N>:<base64>` (local engine) and `vault:v<N>:<base64>`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// A parsed ciphertext string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ciphertext {
    /// `penny` or `vault`.
    pub prefix: Prefix,
    /// The key version it was made with.
    pub version: u32,
    /// The decoded bytes after the version (local engine: nonce ‖ ciphertext ‖ tag).
    pub body: Vec<u8>,
}

/// Which engine made a ciphertext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    /// `penny:`
    Penny,
    /// `vault:`
    Vault,
}

impl Prefix {
    fn as_str(self) -> &'static str {
        match self {
            Self::Penny => "penny",
            Self::Vault => "vault",
        }
    }
}

/// Why a ciphertext string could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not `penny:` or `vault:`.
    #[error("unknown ciphertext prefix")]
    Prefix,
    /// Not `v<N>` with N ≥ 1.
    #[error("malformed key version")]
    Version,
    /// The body is not base64.
    #[error("ciphertext body is not base64")]
    Body,
}

impl Ciphertext {
    /// Parses `prefix:v<N>:<base64>`.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut parts = text.splitn(3, ':');
        let prefix = match parts.next() {
            Some("penny") => Prefix::Penny,
            Some("vault") => Prefix::Vault,
            _ => return Err(ParseError::Prefix),
        };
        let version = parts
            .next()
            .and_then(|v| v.strip_prefix('v'))
            .filter(|digits| {
                !digits.is_empty()
                    && digits.len() <= 9
                    && digits.bytes().all(|b| b.is_ascii_digit())
            })
            .and_then(|digits| digits.parse::<u32>().ok())
            .filter(|v| *v >= 1)
            .ok_or(ParseError::Version)?;
        let body = parts
            .next()
            .filter(|b| !b.is_empty())
            .and_then(|b| STANDARD.decode(b).ok())
            .ok_or(ParseError::Body)?;
        Ok(Self {
            prefix,
            version,
            body,
        })
    }

    /// Formats back to `prefix:v<N>:<base64>`.
    pub fn format(&self) -> String {
        format!(
            "{}:v{}:{}",
            self.prefix.as_str(),
            self.version,
            STANDARD.encode(&self.body)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let c = Ciphertext {
            prefix: Prefix::Penny,
            version: 12,
            body: vec![1, 2, 3, 250],
        };
        assert_eq!(Ciphertext::parse(&c.format()), Ok(c));
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "",
            "penny",
            "penny:v1",
            "penny:v1:",
            "penny:1:AAAA",
            "penny:v0:AAAA",
            "penny:v-1:AAAA",
            "penny:v+1:AAAA",
            "penny:v99999999999:AAAA",
            "penny:v1:!!!",
            "aws:v1:AAAA",
            "PENNY:v1:AAAA",
        ] {
            assert!(Ciphertext::parse(bad).is_err(), "{bad}");
        }
    }
}
