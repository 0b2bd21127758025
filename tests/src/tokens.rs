//! Forged and malformed tokens: every way a bearer token must be refused.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use penny_platform::principal::{AUDIENCE, ISSUER, PLATFORM_TENANT_ID, now_secs};
use penny_platform::signing::SigningKey;
use serde_json::{Value, json};

/// Valid claims for a platform admin, as JSON to tamper with.
pub fn admin_claims() -> Value {
    let now = now_secs();
    json!({
        "sub": "forger",
        "tenant_id": PLATFORM_TENANT_ID,
        "roles": ["admin"],
        "kind": "user",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now + 600,
        "nbf": now,
        "iat": now,
        "jti": uuid::Uuid::new_v4().to_string(),
    })
}

/// A correctly signed token with the given claims.
pub fn signed(key: &SigningKey, claims: &Value) -> String {
    key.sign(claims).expect("sign")
}

/// A correctly signed token whose header was changed by `edit`.
pub fn signed_with_header(
    key: &SigningKey,
    claims: &Value,
    edit: impl FnOnce(&mut Header),
) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.typ = Some("JWT".into());
    header.kid = Some(key.kid().to_owned());
    edit(&mut header);
    key.sign_with_header(header, claims).expect("sign")
}

/// `alg: none` with an empty signature.
pub fn alg_none(key: &SigningKey, claims: &Value) -> String {
    let header = json!({"alg": "none", "typ": "JWT", "kid": key.kid()});
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// HS256 keyed with the public key's bytes: the classic algorithm-confusion forgery.
pub fn hs256_with_public_key(key: &SigningKey, claims: &Value) -> String {
    let public = URL_SAFE_NO_PAD
        .decode(&key.jwks().keys[0].x)
        .expect("public key");
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key.kid().to_owned());
    header.typ = Some("JWT".into());
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_secret(&public).expect("hmac key"),
    )
    .expect("hs256")
}

/// A valid token whose signature is replaced by 64 zero bytes.
pub fn zero_signature(key: &SigningKey, claims: &Value) -> String {
    let token = signed(key, claims);
    let (signing_input, _signature) = token.rsplit_once('.').expect("jwt");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode([0u8; 64]))
}
