//! Who is calling: bearer JWTs verified against a JWKS, with a cache of verified tokens.
//!
//! The verifier pins EdDSA (Ed25519), requires a `kid` found in the JWKS, checks `iss`,
//! `aud`, `exp`, `nbf` and `typ`, and refuses `alg: none`, HMAC algorithms and any header
//! that would let the token choose its own key (`jku`, `jwk`, `x5u`, `x5c`) or demand
//! extensions we do not implement (`crit`). A token that verified once is remembered by its
//! SHA-256, so a repeated token costs a hash and a map lookup; its expiry is still checked
//! on every use.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{ApiError, Reason};
use crate::revocation::{Refusal, RevocationState};

/// The issuer every Penny token carries.
pub const ISSUER: &str = "penny.ai";
/// The audience every Penny token carries.
pub const AUDIENCE: &str = "penny-api";
/// The `typ` header every Penny access token carries.
pub const TOKEN_TYPE: &str = "JWT";
/// The tenant that holds platform staff. `admin` exists only here.
pub const PLATFORM_TENANT_ID: Uuid = Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0001);
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;
/// How many verified tokens the cache holds before it starts over.
const CACHE_CAPACITY: usize = 100_000;

/// What kind of party a principal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    /// A person, logged in through auth.
    User,
    /// An API key acting for a tenant.
    ApiKey,
    /// One of the fleet's own services or an internal caller.
    Service,
}

impl PrincipalKind {
    /// The wire form (`penny.common.v1.PrincipalKind`).
    pub fn proto(self) -> penny_proto::common::v1::PrincipalKind {
        use penny_proto::common::v1::PrincipalKind as Pb;
        match self {
            Self::User => Pb::User,
            Self::ApiKey => Pb::ApiKey,
            Self::Service => Pb::Service,
        }
    }

    /// The lowercase name used in logs and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::ApiKey => "api_key",
            Self::Service => "service",
        }
    }
}

/// The verified caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// User, API key or service.
    pub kind: PrincipalKind,
    /// The user id, API key id or service client id.
    pub id: String,
    /// The tenant the principal belongs to; never taken from request metadata.
    pub tenant_id: Uuid,
    /// Role names as issued.
    pub roles: Vec<String>,
    /// The session, for users.
    pub session_id: Option<String>,
    /// OAuth-style scopes, for services.
    pub scopes: Vec<String>,
}

impl Principal {
    /// Platform staff: a person with the `admin` role inside the platform tenant. An
    /// `admin` role claimed in any other tenant, or carried by an API key (whose roles are
    /// recorded once, at creation), counts for nothing.
    pub fn is_platform_admin(&self) -> bool {
        self.kind == PrincipalKind::User
            && self.tenant_id == PLATFORM_TENANT_ID
            && self.roles.iter().any(|r| r == "admin")
    }

    /// One of the fleet's services (or an internal caller with client credentials).
    pub fn is_service(&self) -> bool {
        self.kind == PrincipalKind::Service
    }
}

/// The claims of a Penny access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: user id, API key id or service client id.
    pub sub: String,
    /// The principal's tenant.
    pub tenant_id: Uuid,
    /// Role names.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Session id, for users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// What kind of principal this is.
    pub kind: PrincipalKind,
    /// Space-separated scopes, for services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not before, seconds since the epoch.
    pub nbf: u64,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Token id.
    pub jti: String,
}

impl Claims {
    fn into_principal(self) -> Principal {
        Principal {
            kind: self.kind,
            id: self.sub,
            tenant_id: self.tenant_id,
            roles: self.roles,
            session_id: self.sid,
            scopes: self
                .scope
                .map(|s| s.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
        }
    }
}

/// Why a token was refused. Logged at debug level; never shown to the caller, who always
/// sees the same UNAUTHENTICATED reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The header is not a Penny header.
    #[error("malformed token header")]
    MalformedHeader,
    /// An algorithm other than EdDSA.
    #[error("algorithm not allowed")]
    AlgorithmNotAllowed,
    /// A header field that would let the token pick its own key or require extensions.
    #[error("header field {0} not allowed")]
    ForbiddenHeader(&'static str),
    /// `typ` is missing or not `JWT`.
    #[error("wrong token type")]
    WrongType,
    /// No `kid`.
    #[error("missing kid")]
    MissingKid,
    /// A `kid` not in the JWKS.
    #[error("unknown kid")]
    UnknownKid,
    /// Past `exp` (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// Signature, claims, `iss`, `aud` or `nbf` failed.
    #[error("token invalid: {0}")]
    Invalid(String),
    /// The session, user, API key or service client was revoked.
    #[error("credential revoked")]
    Revoked,
    /// This verifier follows revocations and has not heard from auth recently enough to
    /// vouch for a user or API key credential.
    #[error("revocation state unknown")]
    RevocationStateUnknown,
}

impl From<TokenError> for ApiError {
    fn from(err: TokenError) -> Self {
        tracing::debug!(reason = %err, "token refused");
        match err {
            TokenError::Expired => ApiError::unauthenticated(Reason::TokenExpired),
            TokenError::Revoked => ApiError::unauthenticated(Reason::TokenRevoked),
            TokenError::RevocationStateUnknown => ApiError::unavailable(
                Reason::DependencyUnavailable,
                "credential revocations cannot be confirmed right now; retry later",
                Duration::from_secs(1),
            ),
            _ => ApiError::unauthenticated(Reason::Unauthenticated),
        }
    }
}

/// A JSON Web Key Set holding Ed25519 public keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Jwks {
    /// The keys.
    pub keys: Vec<Jwk>,
}

/// One Ed25519 public key (`kty: OKP`, `crv: Ed25519`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Jwk {
    /// Key type: `OKP`.
    pub kty: String,
    /// Curve: `Ed25519`.
    pub crv: String,
    /// The public key, base64url without padding.
    pub x: String,
    /// Key id.
    pub kid: String,
    /// Algorithm: `EdDSA`.
    #[serde(default)]
    pub alg: String,
    /// Use: `sig`.
    #[serde(default, rename = "use")]
    pub use_: String,
}

#[derive(Clone)]
struct CachedToken {
    principal: Principal,
    exp: u64,
    iat: u64,
}

/// Verifies bearer tokens. Cheap to clone; clones share keys and cache.
#[derive(Clone)]
pub struct TokenVerifier {
    inner: Arc<VerifierInner>,
}

pub(crate) struct VerifierInner {
    /// Keys from the JWKS file (bootstrap credentials such as `penny dev`'s).
    keys: RwLock<HashMap<String, DecodingKey>>,
    /// Keys auth publishes (its rotating signing keys), refreshed from its JWKS.
    published: RwLock<HashMap<String, DecodingKey>>,
    /// Auth's JWKS, when this verifier follows it: asks for an early refresh.
    jwks_source: Option<Arc<crate::revocation::JwksSource>>,
    cache: RwLock<HashMap<[u8; 32], CachedToken>>,
    validation: Validation,
    /// Revoked credentials, when this verifier follows auth's revocation stream.
    revocations: Option<Arc<RevocationState>>,
}

impl TokenVerifier {
    pub(crate) fn from_inner(inner: Arc<VerifierInner>) -> Self {
        Self { inner }
    }
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenVerifier").finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// A verifier trusting the Ed25519 keys of `jwks`. Keys of any other type are skipped.
    pub fn new(jwks: &Jwks) -> Result<Self, TokenError> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        let verifier = Self {
            inner: Arc::new(VerifierInner {
                keys: RwLock::new(HashMap::new()),
                published: RwLock::new(HashMap::new()),
                jwks_source: None,
                cache: RwLock::new(HashMap::new()),
                validation,
                revocations: None,
            }),
        };
        verifier.replace_keys(jwks)?;
        Ok(verifier)
    }

    /// A verifier with the same keys (and its own cache) that follows the auth service at
    /// `auth`: its revocation stream (called with `credential`) and its JWKS (the keys
    /// auth signs with, trusted beside this verifier's own). The followers stop when the
    /// returned verifier and all its clones are dropped. See [`crate::revocation`] for
    /// what is refused while the stream is not fresh.
    pub fn following_revocations(
        &self,
        auth: tonic::transport::Channel,
        credential: crate::credential::ServiceCredential,
    ) -> Self {
        let keys = self
            .inner
            .keys
            .read()
            .map(|keys| keys.clone())
            .unwrap_or_default();
        let published = self
            .inner
            .published
            .read()
            .map(|keys| keys.clone())
            .unwrap_or_default();
        let state = Arc::new(RevocationState::default());
        let source = Arc::new(crate::revocation::JwksSource::default());
        tokio::spawn(crate::revocation::follow(
            Arc::downgrade(&state),
            auth.clone(),
            credential,
        ));
        let verifier = Self {
            inner: Arc::new(VerifierInner {
                keys: RwLock::new(keys),
                published: RwLock::new(published),
                jwks_source: Some(source.clone()),
                cache: RwLock::new(HashMap::new()),
                validation: self.inner.validation.clone(),
                revocations: Some(state),
            }),
        };
        tokio::spawn(crate::revocation::follow_jwks(
            Arc::downgrade(&verifier.inner),
            source,
            auth,
        ));
        verifier
    }

    /// Replaces the keys auth publishes. Tokens cached under a key that is gone are
    /// forgotten.
    pub fn replace_published_keys(&self, jwks: &Jwks) -> Result<(), TokenError> {
        let keys = decoding_keys(jwks)?;
        let mut removed = false;
        if let Ok(mut guard) = self.inner.published.write() {
            removed = guard.keys().any(|kid| !keys.contains_key(kid));
            *guard = keys;
        }
        if removed && let Ok(mut cache) = self.inner.cache.write() {
            cache.clear();
        }
        Ok(())
    }

    /// Asks for auth's JWKS now (a token named a key this verifier does not know) and
    /// waits up to `limit` for it; whether a fresh set arrived. Requests are coalesced
    /// and rate-limited, so unknown `kid`s cannot make it hammer auth.
    pub async fn refresh_published_keys(&self, limit: Duration) -> bool {
        match &self.inner.jwks_source {
            Some(source) => source.refresh(limit).await,
            None => false,
        }
    }

    /// Whether this verifier follows auth's JWKS.
    pub fn follows_published_keys(&self) -> bool {
        self.inner.jwks_source.is_some()
    }

    pub(crate) fn revocation_state(&self) -> Option<&RevocationState> {
        self.inner.revocations.as_deref()
    }

    /// Refuses a principal whose credential is revoked (or, for users and API keys, whose
    /// revocation state this verifier cannot vouch for). `issued_at` is the token's `iat`;
    /// 0 for credentials without one (API keys).
    pub fn check_credential(
        &self,
        principal: &Principal,
        issued_at: u64,
    ) -> Result<(), TokenError> {
        self.check_revoked(principal, issued_at)
    }

    fn check_revoked(&self, principal: &Principal, iat: u64) -> Result<(), TokenError> {
        match self
            .revocation_state()
            .map(|state| state.check(principal, iat))
        {
            None | Some(Ok(())) => Ok(()),
            Some(Err(Refusal::Revoked)) => Err(TokenError::Revoked),
            Some(Err(Refusal::Unknown)) => Err(TokenError::RevocationStateUnknown),
        }
    }

    /// Replaces the verifier's own trusted keys (those of the JWKS file) and forgets every
    /// cached token.
    pub fn replace_keys(&self, jwks: &Jwks) -> Result<(), TokenError> {
        let keys = decoding_keys(jwks)?;
        if let Ok(mut guard) = self.inner.keys.write() {
            *guard = keys;
        }
        if let Ok(mut cache) = self.inner.cache.write() {
            cache.clear();
        }
        Ok(())
    }

    /// Verifies a compact JWT and returns its principal. A revoked credential is refused
    /// even when its token is cached.
    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = now_secs();
        if let Ok(cache) = self.inner.cache.read()
            && let Some(hit) = cache.get(&digest)
        {
            if now > hit.exp.saturating_add(LEEWAY_SECS) {
                return Err(TokenError::Expired);
            }
            self.check_revoked(&hit.principal, hit.iat)?;
            return Ok(hit.principal.clone());
        }
        let claims = self.verify_uncached(token)?;
        let exp = claims.exp;
        let iat = claims.iat;
        let principal = claims.into_principal();
        self.check_revoked(&principal, iat)?;
        if let Ok(mut cache) = self.inner.cache.write() {
            if cache.len() >= CACHE_CAPACITY {
                cache.retain(|_, entry| entry.exp.saturating_add(LEEWAY_SECS) >= now);
                if cache.len() >= CACHE_CAPACITY {
                    cache.clear();
                }
            }
            cache.insert(
                digest,
                CachedToken {
                    principal: principal.clone(),
                    exp,
                    iat,
                },
            );
        }
        Ok(principal)
    }

    /// Full verification, without the cache.
    pub fn verify_uncached(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|err| match err.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithmName => {
                TokenError::AlgorithmNotAllowed
            }
            _ => TokenError::MalformedHeader,
        })?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::AlgorithmNotAllowed);
        }
        if header.jku.is_some() {
            return Err(TokenError::ForbiddenHeader("jku"));
        }
        if header.jwk.is_some() {
            return Err(TokenError::ForbiddenHeader("jwk"));
        }
        if header.x5u.is_some() {
            return Err(TokenError::ForbiddenHeader("x5u"));
        }
        if header.x5c.is_some() {
            return Err(TokenError::ForbiddenHeader("x5c"));
        }
        if header.crit.is_some() {
            return Err(TokenError::ForbiddenHeader("crit"));
        }
        if header.typ.as_deref() != Some(TOKEN_TYPE) {
            return Err(TokenError::WrongType);
        }
        let kid = header.kid.ok_or(TokenError::MissingKid)?;
        let key = {
            let keys = self.inner.keys.read().map_err(|_| TokenError::UnknownKid)?;
            match keys.get(&kid) {
                Some(key) => key.clone(),
                None => self
                    .inner
                    .published
                    .read()
                    .map_err(|_| TokenError::UnknownKid)?
                    .get(&kid)
                    .cloned()
                    .ok_or(TokenError::UnknownKid)?,
            }
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, &key, &self.inner.validation).map_err(|err| {
                match err.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                    other => TokenError::Invalid(format!("{other:?}")),
                }
            })?;
        Ok(data.claims)
    }
}

/// The Ed25519 keys of a JWKS by `kid`; keys of any other type are skipped.
fn decoding_keys(jwks: &Jwks) -> Result<HashMap<String, DecodingKey>, TokenError> {
    let mut keys = HashMap::new();
    for jwk in &jwks.keys {
        if jwk.kty != "OKP" || jwk.crv != "Ed25519" {
            continue;
        }
        let key =
            DecodingKey::from_ed_components(&jwk.x).map_err(|_| TokenError::MalformedHeader)?;
        keys.insert(jwk.kid.clone(), key);
    }
    Ok(keys)
}

/// A request carrying `authorization: Bearer <token>`: how every caller in the fleet (the
/// authorizer, the CLI, the load tool, tests) presents its credential. Fails only when the
/// token is not a valid header value; the token never appears in the error.
pub fn bearer_request<T>(message: T, token: &str) -> Result<tonic::Request<T>, ApiError> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| ApiError::unauthenticated(Reason::Unauthenticated))?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_requests_carry_the_token_and_refuse_bad_header_values() {
        let request = bearer_request((), "abc.def.ghi").unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer abc.def.ghi"
        );
        let err = bearer_request((), "evil\r\ninjected: 1").unwrap_err();
        assert!(!err.message().contains("evil"));
    }
}
