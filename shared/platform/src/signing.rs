//! The fleet's token-signing key, kept in the data directory until the auth service owns it.
//!
//! `penny dev` creates an Ed25519 key (`signing-key.pk8`, mode 0600) and publishes its
//! public half as `jwks.json`; every service verifies tokens against that JWKS and `penny
//! dev` mints the developer's token with the private half.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::principal::{AUDIENCE, Claims, ISSUER, Jwk, Jwks, PrincipalKind, TOKEN_TYPE, now_secs};

/// File name of the private key inside the data directory.
pub const SIGNING_KEY_FILE: &str = "signing-key.pk8";
/// File name of the published JWKS inside the data directory.
pub const JWKS_FILE: &str = "jwks.json";

/// Errors of the key store.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// Reading or writing a key file failed.
    #[error("signing key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file does not hold an Ed25519 PKCS#8 key.
    #[error("signing key file {0} does not hold an Ed25519 PKCS#8 key")]
    BadKey(PathBuf),
    /// The JWKS could not be written or parsed.
    #[error("jwks: {0}")]
    Jwks(String),
    /// Signing failed.
    #[error("signing failed")]
    Sign,
}

/// An Ed25519 signing key with its key id.
pub struct SigningKey {
    pkcs8: Vec<u8>,
    public: Vec<u8>,
    kid: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, SigningError> {
        let document =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| SigningError::Sign)?;
        Self::from_pkcs8(document.as_ref()).ok_or(SigningError::Sign)
    }

    /// The key in a PKCS#8 document, if it holds an Ed25519 key.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Option<Self> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).ok()?;
        let public = pair.public_key().as_ref().to_vec();
        let digest = Sha256::digest(&public);
        let kid = URL_SAFE_NO_PAD.encode(&digest[..12]);
        Some(Self {
            pkcs8: pkcs8.to_vec(),
            public,
            kid,
        })
    }

    /// Loads the key from `dir`, creating it (mode 0600) and the JWKS beside it when absent.
    pub fn load_or_create(dir: &Path) -> Result<Self, SigningError> {
        let path = dir.join(SIGNING_KEY_FILE);
        let key = match fs::read(&path) {
            Ok(bytes) => {
                Self::from_pkcs8(&bytes).ok_or_else(|| SigningError::BadKey(path.clone()))?
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                write_private(&path, &key.pkcs8)?;
                key
            }
            Err(source) => return Err(SigningError::Io { path, source }),
        };
        let jwks = serde_json::to_vec_pretty(&key.jwks())
            .map_err(|e| SigningError::Jwks(e.to_string()))?;
        let jwks_path = dir.join(JWKS_FILE);
        fs::write(&jwks_path, jwks).map_err(|source| SigningError::Io {
            path: jwks_path,
            source,
        })?;
        Ok(key)
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The private key as a PKCS#8 document, to store it sealed (never in the clear).
    pub fn pkcs8_document(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The raw Ed25519 public key (32 bytes).
    pub fn public_key(&self) -> &[u8] {
        &self.public
    }

    /// An Ed25519 signature (64 bytes) over `message` (audit checkpoints).
    pub fn sign_bytes(&self, message: &[u8]) -> Result<Vec<u8>, SigningError> {
        let pair = Ed25519KeyPair::from_pkcs8(&self.pkcs8).map_err(|_| SigningError::Sign)?;
        Ok(pair.sign(message).as_ref().to_vec())
    }

    /// This key's public half as a JWK.
    pub fn jwk(&self) -> Jwk {
        Jwk {
            kty: "OKP".to_owned(),
            crv: "Ed25519".to_owned(),
            x: URL_SAFE_NO_PAD.encode(&self.public),
            kid: self.kid.clone(),
            alg: "EdDSA".to_owned(),
            use_: "sig".to_owned(),
        }
    }

    /// The JWKS publishing this key's public half.
    pub fn jwks(&self) -> Jwks {
        Jwks {
            keys: vec![self.jwk()],
        }
    }

    /// Signs arbitrary claims with this key (`alg: EdDSA`, `typ: JWT`, this `kid`).
    pub fn sign<T: serde::Serialize>(&self, claims: &T) -> Result<String, SigningError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some(TOKEN_TYPE.to_owned());
        header.kid = Some(self.kid.clone());
        self.sign_with_header(header, claims)
    }

    /// Signs with a header of the caller's making (tests forge headers with it).
    pub fn sign_with_header<T: serde::Serialize>(
        &self,
        header: Header,
        claims: &T,
    ) -> Result<String, SigningError> {
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(&self.pkcs8))
            .map_err(|_| SigningError::Sign)
    }

    /// Mints an access token.
    pub fn mint(&self, grant: &TokenGrant) -> Result<String, SigningError> {
        self.mint_scoped(grant, &[])
    }

    /// Mints an access token restricted to `scopes` (none: unrestricted).
    pub fn mint_scoped(&self, grant: &TokenGrant, scopes: &[&str]) -> Result<String, SigningError> {
        self.mint_issued_at(grant, scopes, now_secs())
    }

    /// Mints a token whose `iat` (and `nbf`) is `issued_at`, seconds since the epoch: the
    /// moment the facts it rests on were read (a user's status), so a revocation made
    /// after that moment refuses it even when the token is signed later.
    pub fn mint_issued_at(
        &self,
        grant: &TokenGrant,
        scopes: &[&str],
        issued_at: u64,
    ) -> Result<String, SigningError> {
        let now = issued_at;
        let claims = Claims {
            sub: grant.subject.clone(),
            tenant_id: grant.tenant_id,
            roles: grant.roles.clone(),
            sid: grant.session_id.clone(),
            kind: grant.kind,
            scope: (!scopes.is_empty()).then(|| scopes.join(" ")),
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            exp: now.saturating_add(grant.lifetime.as_secs()),
            nbf: now,
            iat: now,
            jti: Uuid::new_v4().to_string(),
        };
        self.sign(&claims)
    }
}

/// What a minted token grants.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    /// User id, API key id or service client id.
    pub subject: String,
    /// The tenant.
    pub tenant_id: Uuid,
    /// Roles.
    pub roles: Vec<String>,
    /// Principal kind.
    pub kind: PrincipalKind,
    /// Session id, for users.
    pub session_id: Option<String>,
    /// How long the token lives.
    pub lifetime: Duration,
}

/// Writes a secret file readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SigningError> {
    let io = |source| SigningError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Whether `signature` is a valid Ed25519 signature of `message` under the raw 32-byte
/// `public_key`.
pub fn verify_ed25519(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::{PLATFORM_TENANT_ID, TokenVerifier};

    #[test]
    fn minted_tokens_verify_and_keys_persist() {
        let dir = std::env::temp_dir().join(format!("penny-signing-{}", Uuid::new_v4()));
        fs::create_dir_all(&dir).unwrap();
        let key = SigningKey::load_or_create(&dir).unwrap();
        let again = SigningKey::load_or_create(&dir).unwrap();
        assert_eq!(key.kid(), again.kid());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join(SIGNING_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let token = key
            .mint(&TokenGrant {
                subject: "dev-admin".into(),
                tenant_id: PLATFORM_TENANT_ID,
                roles: vec!["admin".into()],
                kind: PrincipalKind::User,
                session_id: None,
                lifetime: Duration::from_secs(60),
            })
            .unwrap();
        let verifier = TokenVerifier::new(&again.jwks()).unwrap();
        let principal = verifier.verify(&token).unwrap();
        assert!(principal.is_platform_admin());
        // Second time through the cache.
        assert_eq!(verifier.verify(&token).unwrap(), principal);
        fs::remove_dir_all(&dir).unwrap();
    }
}
