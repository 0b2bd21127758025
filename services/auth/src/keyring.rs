//! The token-signing key ring: Ed25519 keys stored sealed through KeyService, rotated on a
//! schedule, published in the JWKS before they sign and until every token they signed has
//! expired.
//!
//! Every replica keeps its ring in step with the database: it loads the keys at start and
//! on each maintenance round, signs with the newest key whose activation time has come, and
//! makes the next key when the current one is older than the rotation period. A new key
//! is published [`prepublish`] before it signs, so verifiers (which fetch the JWKS every
//! minute, and at once when a token names a key they do not know) hold it in time.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use penny_platform::principal::{Jwk, Jwks, LEEWAY_SECS, PLATFORM_TENANT_ID, TokenVerifier};
use penny_platform::signing::SigningKey;
use time::OffsetDateTime;

use crate::error::AuthError;
use crate::service::{Auth, DEFAULT_TOKEN_LIFETIME};
use crate::store::StoredSigningKey;

/// The purpose bound to sealed signing keys.
const PURPOSE: &str = "signing-key";
/// Signing keys are replaced this often unless configured otherwise.
pub const DEFAULT_ROTATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// How long before it signs a new key is published: two JWKS refreshes of every verifier,
/// or half the rotation period when that is shorter (tests).
pub fn prepublish(rotation: Duration) -> Duration {
    (2 * penny_platform::revocation::JWKS_REFRESH + Duration::from_secs(30)).min(rotation / 2)
}

/// How often a replica reconciles its ring with the database.
pub fn maintenance_interval(rotation: Duration) -> Duration {
    Duration::from_secs(60)
        .min(rotation / 4)
        .max(Duration::from_millis(250))
}

#[derive(Default)]
struct RingState {
    current: Option<Arc<SigningKey>>,
    published: Vec<Jwk>,
    verifier: Option<TokenVerifier>,
}

/// The keys this replica signs with and publishes. Cheap to clone.
#[derive(Clone, Default)]
pub struct KeyRing {
    state: Arc<RwLock<RingState>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing").finish_non_exhaustive()
    }
}

impl KeyRing {
    /// The key to sign with; UNAVAILABLE until the ring has been loaded.
    pub fn current(&self) -> Result<Arc<SigningKey>, AuthError> {
        self.state
            .read()
            .ok()
            .and_then(|s| s.current.clone())
            .ok_or(AuthError::Dependency("keys"))
    }

    /// The published keys.
    pub fn jwks(&self) -> Jwks {
        Jwks {
            keys: self
                .state
                .read()
                .map(|s| s.published.clone())
                .unwrap_or_default(),
        }
    }

    /// A verifier for the published keys (introspection).
    pub fn verifier(&self) -> Option<TokenVerifier> {
        self.state.read().ok().and_then(|s| s.verifier.clone())
    }

    /// Whether a key is loaded.
    pub fn loaded(&self) -> bool {
        self.state.read().is_ok_and(|s| s.current.is_some())
    }
}

fn jwk_of(stored: &StoredSigningKey) -> Jwk {
    Jwk {
        kty: "OKP".to_owned(),
        crv: "Ed25519".to_owned(),
        x: stored.public_key.clone(),
        kid: stored.kid.clone(),
        alg: "EdDSA".to_owned(),
        use_: "sig".to_owned(),
    }
}

impl Auth {
    /// Makes a key, seals it, stores it to start signing at `activates_at`.
    async fn make_signing_key(
        &self,
        now: OffsetDateTime,
        activates_at: OffsetDateTime,
    ) -> Result<(), AuthError> {
        let key = SigningKey::generate().map_err(|e| AuthError::Internal(e.to_string()))?;
        let sealed = self
            .seal(PLATFORM_TENANT_ID, PURPOSE, key.kid(), key.pkcs8_document())
            .await?;
        self.store
            .insert_signing_key(&StoredSigningKey {
                kid: key.kid().to_owned(),
                public_key: key.jwk().x,
                private_ciphertext: sealed,
                created_at: now,
                activates_at,
                retired_at: None,
                expires_at: None,
            })
            .await?;
        tracing::info!(kid = key.kid(), activates_at = %activates_at, "signing key made");
        Ok(())
    }

    /// One maintenance round: make the first or the next key when due, retire keys a newer
    /// active key replaces, and load what the database holds.
    pub async fn maintain_signing_keys(&self) -> Result<(), AuthError> {
        let now = OffsetDateTime::now_utc();
        let mut keys = self.store.signing_keys(now).await?;
        let active = keys
            .iter()
            .rev()
            .find(|k| k.activates_at <= now && k.retired_at.is_none());
        let pending = keys.iter().any(|k| k.activates_at > now);
        let due = match active {
            None => !pending,
            Some(key) => !pending && key.activates_at + self.rotation <= now,
        };
        if due {
            // The very first key signs at once; a successor once verifiers have it.
            let activates_at = if active.is_none() {
                now
            } else {
                now + prepublish(self.rotation)
            };
            self.make_signing_key(now, activates_at).await?;
            keys = self.store.signing_keys(now).await?;
        }
        let Some(newest) = keys
            .iter()
            .rev()
            .find(|k| k.activates_at <= now && k.retired_at.is_none())
            .cloned()
        else {
            return Err(AuthError::Internal("no signing key is active".into()));
        };
        let keep_published =
            DEFAULT_TOKEN_LIFETIME + Duration::from_secs(LEEWAY_SECS) + Duration::from_secs(60);
        if self
            .store
            .retire_signing_keys(&newest.kid, newest.activates_at, now, now + keep_published)
            .await?
            > 0
        {
            tracing::info!(kid = %newest.kid, "signing key rotated");
        }
        let current = match self.keyring.current() {
            Ok(current) if current.kid() == newest.kid => current,
            _ => {
                let pkcs8 = self
                    .open(
                        PLATFORM_TENANT_ID,
                        PURPOSE,
                        &newest.kid,
                        &newest.private_ciphertext,
                    )
                    .await?;
                Arc::new(SigningKey::from_pkcs8(&pkcs8).ok_or_else(|| {
                    AuthError::Internal("a stored signing key does not open to Ed25519".into())
                })?)
            }
        };
        let published: Vec<Jwk> = keys.iter().map(jwk_of).collect();
        let verifier = TokenVerifier::new(&Jwks {
            keys: published.clone(),
        })
        .map_err(|e| AuthError::Internal(e.to_string()))?;
        if let Ok(mut state) = self.keyring.state.write() {
            state.current = Some(current);
            state.published = published;
            state.verifier = Some(verifier);
        }
        Ok(())
    }

    /// Keeps the ring in step with the database for as long as the service lives: every
    /// second until the first load succeeds, then every maintenance interval.
    pub(crate) fn spawn_key_maintenance(&self) {
        let (auth, alive) = self.for_background();
        tokio::spawn(async move {
            loop {
                if alive.strong_count() == 0 {
                    return;
                }
                let pause = match auth.maintain_signing_keys().await {
                    Ok(()) => maintenance_interval(auth.rotation),
                    Err(err) => {
                        tracing::warn!(error = %err, "signing keys could not be maintained; retrying");
                        Duration::from_secs(1)
                    }
                };
                tokio::time::sleep(pause).await;
            }
        });
    }
}
