//! Signed download URLs: `<public base>/v1/files/<tenant>/<file>?expires=<unix seconds>&kv=<key
//! version>&sig=<hex>`, where `sig` is HMAC-SHA256, under the service's URL signing key,
//! of a canonical string that holds each part in one fixed form on its own line. A URL is
//! refused unless its path and query are exactly that form: no other or repeated
//! parameter, no percent-encoding, no `..`, no other spelling of an id, no expiry past.
//! The signature is compared in constant time.

use std::time::Duration;

use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;
use uuid::Uuid;

/// Lifetime of a URL when the caller names none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Longest lifetime of a URL.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest URL signing key, in bytes.
pub const MIN_KEY_BYTES: usize = 32;
/// The path prefix of signed downloads.
pub const PATH_PREFIX: &str = "/v1/files/";
const DOMAIN: &str = "penny-files-signed-url-v1";

/// What a valid URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedRef {
    /// The tenant.
    pub tenant: Uuid,
    /// The file.
    pub file: Uuid,
    /// The file's key version when the URL was made.
    pub key_version: u32,
    /// When the URL expires (Unix seconds).
    pub expires: u64,
}

/// Why a URL is refused (for logs and audit; the caller sees only 403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlRefusal {
    /// The path is not `/v1/files/<tenant>/<file>` in canonical form.
    Path,
    /// Missing, unknown, repeated, encoded or malformed parameters.
    Query,
    /// The signature does not match.
    Signature,
    /// The URL has expired.
    Expired,
    /// The URL was valid, but its file is gone, no longer clean, or rewrapped since.
    Gone,
}

impl UrlRefusal {
    /// A short name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Path => "path",
            Self::Query => "query",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::Gone => "gone",
        }
    }
}

/// Makes and checks signed URLs.
#[derive(Clone)]
pub struct UrlSigner {
    /// HMAC-SHA256 keyed once, cloned for each URL.
    keyed: Hmac<Sha256>,
    base: String,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlSigner")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// A UUID in its one canonical form (lower-case, hyphenated), or nothing.
fn canonical_uuid(text: &str) -> Option<Uuid> {
    let id = Uuid::try_parse(text).ok()?;
    (id.hyphenated().to_string() == text).then_some(id)
}

/// Decimal digits without sign or leading zero (`0` alone is allowed).
fn canonical_number(text: &str, max_digits: usize) -> Option<u64> {
    if text.is_empty()
        || text.len() > max_digits
        || !text.bytes().all(|b| b.is_ascii_digit())
        || (text.len() > 1 && text.starts_with('0'))
    {
        return None;
    }
    text.parse().ok()
}

fn hex_decode(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let digit = |b: u8| {
            if b.is_ascii_digit() {
                b - b'0'
            } else {
                b - b'a' + 10
            }
        };
        out[i] = digit(pair[0]) << 4 | digit(pair[1]);
    }
    Some(out)
}

impl UrlSigner {
    /// A signer with `key` (at least [`MIN_KEY_BYTES`]) for URLs under `base` (the
    /// externally reachable `http(s)://host[:port]` of the files HTTP listener).
    pub fn new(key: &[u8], base: &str) -> Result<Self, String> {
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the URL signing key must be at least {MIN_KEY_BYTES} bytes"
            ));
        }
        let base = base.trim_end_matches('/');
        let authority = base
            .strip_prefix("https://")
            .or_else(|| base.strip_prefix("http://"));
        let valid = authority.is_some_and(|a| {
            !a.is_empty() && !a.contains(['/', '?', '#', '@', ' ']) && a.len() <= 255
        });
        if !valid {
            return Err("the public URL must be http(s)://host[:port], without a path".into());
        }
        let keyed = <Hmac<Sha256>>::new_from_slice(key)
            .map_err(|_| "the URL signing key cannot key HMAC-SHA256".to_owned())?;
        Ok(Self {
            keyed,
            base: base.to_owned(),
        })
    }

    fn mac(&self, tenant: Uuid, file: Uuid, expires: u64, key_version: u32) -> Hmac<Sha256> {
        // Each part in its one form, one per line: no two different URLs share a string.
        let canonical = format!(
            "{DOMAIN}\n{}\n{}\n{expires}\n{key_version}",
            tenant.hyphenated(),
            file.hyphenated()
        );
        let mut mac = self.keyed.clone();
        mac.update(canonical.as_bytes());
        mac
    }

    /// The URL for `tenant`'s `file` at `key_version`, valid until `expires`.
    pub fn url(&self, tenant: Uuid, file: Uuid, expires: u64, key_version: u32) -> String {
        let sig: String = self
            .mac(tenant, file, expires, key_version)
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!(
            "{}{PATH_PREFIX}{}/{}?expires={expires}&kv={key_version}&sig={sig}",
            self.base,
            tenant.hyphenated(),
            file.hyphenated()
        )
    }

    /// Checks a request's path and raw query at `now` (Unix seconds).
    pub fn verify(
        &self,
        path: &str,
        query: Option<&str>,
        now: u64,
    ) -> Result<SignedRef, UrlRefusal> {
        let rest = path.strip_prefix(PATH_PREFIX).ok_or(UrlRefusal::Path)?;
        let (tenant, file) = rest.split_once('/').ok_or(UrlRefusal::Path)?;
        let tenant = canonical_uuid(tenant).ok_or(UrlRefusal::Path)?;
        let file = canonical_uuid(file).ok_or(UrlRefusal::Path)?;
        let query = query.ok_or(UrlRefusal::Query)?;
        let (mut expires, mut kv, mut sig) = (None, None, None);
        for pair in query.split('&') {
            let (name, value) = pair.split_once('=').ok_or(UrlRefusal::Query)?;
            let slot = match name {
                "expires" => &mut expires,
                "kv" => &mut kv,
                "sig" => &mut sig,
                _ => return Err(UrlRefusal::Query),
            };
            if slot.replace(value).is_some() {
                return Err(UrlRefusal::Query);
            }
        }
        let expires = expires
            .and_then(|v| canonical_number(v, 20))
            .ok_or(UrlRefusal::Query)?;
        let key_version = kv
            .and_then(|v| canonical_number(v, 10))
            .and_then(|v| u32::try_from(v).ok())
            .ok_or(UrlRefusal::Query)?;
        let sig = sig.and_then(hex_decode).ok_or(UrlRefusal::Query)?;
        self.mac(tenant, file, expires, key_version)
            .verify_slice(&sig)
            .map_err(|_| UrlRefusal::Signature)?;
        if now >= expires {
            return Err(UrlRefusal::Expired);
        }
        Ok(SignedRef {
            tenant,
            file,
            key_version,
            expires,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, Option<String>) {
        let rest = url.strip_prefix("https://files.test").unwrap();
        match rest.split_once('?') {
            Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
            None => (rest.to_owned(), None),
        }
    }

    #[test]
    fn a_url_verifies_and_every_alteration_is_refused() {
        let signer = UrlSigner::new(&[9; 32], "https://files.test/").unwrap();
        let (tenant, file) = (Uuid::new_v4(), Uuid::new_v4());
        let url = signer.url(tenant, file, 2_000, 3);
        let (path, query) = split(&url);
        let good = signer.verify(&path, query.as_deref(), 1_000).unwrap();
        assert_eq!(
            (good.tenant, good.file, good.key_version, good.expires),
            (tenant, file, 3, 2_000)
        );
        let query = query.unwrap();
        let sig = query.rsplit_once("sig=").unwrap().1.to_owned();
        let refused =
            |path: &str, query: &str| signer.verify(path, Some(query), 1_000).unwrap_err();
        // Expired, to the second.
        assert_eq!(
            signer.verify(&path, Some(&query), 2_000).unwrap_err(),
            UrlRefusal::Expired
        );
        // Every bit of the signature matters.
        for bit in 0..256 {
            let mut bytes = hex_decode(&sig).unwrap();
            bytes[bit / 8] ^= 1 << (bit % 8);
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(
                refused(&path, &query.replace(&sig, &hex)),
                UrlRefusal::Signature
            );
        }
        // Another file, tenant, expiry or key version.
        let other = Uuid::new_v4();
        assert_eq!(
            refused(&path.replace(&file.to_string(), &other.to_string()), &query),
            UrlRefusal::Signature
        );
        assert_eq!(
            refused(
                &path.replace(&tenant.to_string(), &other.to_string()),
                &query
            ),
            UrlRefusal::Signature
        );
        assert_eq!(
            refused(&path, &query.replace("expires=2000", "expires=2001")),
            UrlRefusal::Signature
        );
        assert_eq!(
            refused(&path, &query.replace("kv=3", "kv=4")),
            UrlRefusal::Signature
        );
        // Duplicated, unknown, missing, encoded or padded parameters.
        for bad in [
            format!("{query}&kv=3"),
            format!("{query}&x=1"),
            format!("expires=2000&kv=3&sig={sig}&sig={sig}"),
            format!("kv=3&sig={sig}"),
            query.replace("expires=2000", "expires=02000"),
            query.replace("expires=2000", "expires=%32000"),
            query.replace("kv=3", "kv=+3"),
            query.replace(&sig, &sig.to_uppercase()),
            format!("{query}&"),
            String::new(),
        ] {
            assert!(
                matches!(
                    refused(&path, &bad),
                    UrlRefusal::Query | UrlRefusal::Signature
                ),
                "{bad}"
            );
        }
        assert_eq!(
            signer.verify(&path, None, 1_000).unwrap_err(),
            UrlRefusal::Query
        );
        // Path tricks: other spellings, traversal, extra segments, encodings.
        for bad in [
            path.to_uppercase(),
            path.replace("/v1/files/", "/v1/files//"),
            format!("{path}/"),
            format!("{path}/.."),
            path.replace("/v1/", "/v1/../v1/"),
            path.replace(&file.to_string(), &file.simple().to_string()),
            path.replace(&file.to_string(), &format!("{{{file}}}")),
            path.replace('-', "%2d"),
            format!("/v2/files/{tenant}/{file}"),
        ] {
            assert_eq!(refused(&bad, &query), UrlRefusal::Path, "{bad}");
        }
        // Another key.
        let other_signer = UrlSigner::new(&[8; 32], "https://files.test").unwrap();
        assert_eq!(
            other_signer.verify(&path, Some(&query), 1_000).unwrap_err(),
            UrlRefusal::Signature
        );
    }

    #[test]
    fn keys_and_bases_are_checked() {
        assert!(UrlSigner::new(&[1; 31], "https://x").is_err());
        assert!(UrlSigner::new(&[1; 32], "ftp://x").is_err());
        assert!(UrlSigner::new(&[1; 32], "https://x/?a").is_err());
        assert!(UrlSigner::new(&[1; 32], "https://x/prefix").is_err());
        assert!(UrlSigner::new(&[1; 32], "https://user@x").is_err());
        let signer = UrlSigner::new(&[1; 32], "https://x:8443/").unwrap();
        assert!(
            signer
                .url(Uuid::nil(), Uuid::nil(), 1, 1)
                .starts_with("https://x:8443/v1/files/")
        );
    }
}
