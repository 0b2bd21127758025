//! Signed checkpoints: every so many events (or seconds) audit signs the head of a
//! tenant's chain with its Ed25519 checkpoint key. A chain rewritten from some event on,
//! or cut short, no longer matches a checkpoint signed before, which a verifier holding
//! the public key (pinned from a trusted source, never taken from the checkpoint) detects.
//!
//! ```text
//! signed_payload = "penny.audit.v1.checkpoint" ‖ tenant_id ‖ sequence ‖ hash ‖ create_time
//! ```
//!
//! with the same length-prefixed encoding as the chain (strings and byte strings as an
//! 8-byte big-endian length and their bytes, numbers as 8 big-endian bytes).

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use penny_platform::principal::Jwks;
use penny_platform::signing::{SigningKey, verify_ed25519};
use uuid::Uuid;

use crate::chain::Hash;

/// One signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The tenant whose chain it signs.
    pub tenant_id: Uuid,
    /// The chain position signed.
    pub sequence: u64,
    /// The hash of the event at `sequence`.
    pub hash: Hash,
    /// When it was made, in microseconds since the Unix epoch.
    pub create_micros: i64,
    /// The exact bytes signed.
    pub signed_payload: Vec<u8>,
    /// Ed25519 signature over `signed_payload`.
    pub signature: Vec<u8>,
    /// The signing key's id.
    pub key_id: String,
    /// The signing key's public half (32 bytes), as the signer said.
    pub public_key: Vec<u8>,
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The bytes a checkpoint signs.
pub fn signed_payload(tenant: Uuid, sequence: u64, hash: &Hash, create_micros: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    put(&mut out, b"penny.audit.v1.checkpoint");
    put(&mut out, tenant.as_bytes());
    out.extend_from_slice(&sequence.to_be_bytes());
    put(&mut out, hash);
    out.extend_from_slice(&create_micros.to_be_bytes());
    out
}

/// Signs checkpoints with audit's key.
#[derive(Clone)]
pub struct Signer {
    key: Arc<SigningKey>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key.kid())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer with `key`.
    pub fn new(key: Arc<SigningKey>) -> Self {
        Self { key }
    }

    /// A checkpoint of `tenant`'s chain at `sequence`, whose event has `hash`.
    pub fn sign(
        &self,
        tenant: Uuid,
        sequence: u64,
        hash: Hash,
        create_micros: i64,
    ) -> Result<Checkpoint, penny_platform::signing::SigningError> {
        let signed_payload = signed_payload(tenant, sequence, &hash, create_micros);
        let signature = self.key.sign_bytes(&signed_payload)?;
        Ok(Checkpoint {
            tenant_id: tenant,
            sequence,
            hash,
            create_micros,
            signed_payload,
            signature,
            key_id: self.key.kid().to_owned(),
            public_key: self.key.public_key().to_vec(),
        })
    }

    /// The key's id.
    pub fn key_id(&self) -> &str {
        self.key.kid()
    }

    /// The key's public half.
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key()
    }
}

/// The public keys checkpoints are checked against: audit's own, and earlier ones an
/// operator still trusts (after a key change), by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    by_id: HashMap<String, Vec<u8>>,
}

/// Why a checkpoint was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untrusted {
    /// Its key is not one of the trusted keys.
    UnknownKey,
    /// Its signed bytes are not the encoding of its fields.
    PayloadMismatch,
    /// The signature does not verify.
    BadSignature,
}

impl TrustedKeys {
    /// Trusts `public_key` under `key_id`.
    pub fn with(mut self, key_id: &str, public_key: &[u8]) -> Self {
        self.by_id.insert(key_id.to_owned(), public_key.to_vec());
        self
    }

    /// Trusts every Ed25519 key of `jwks` too (skipping any that is not one).
    pub fn with_jwks(mut self, jwks: &Jwks) -> Self {
        for key in &jwks.keys {
            if key.kty == "OKP"
                && key.crv == "Ed25519"
                && let Ok(public) = URL_SAFE_NO_PAD.decode(&key.x)
                && public.len() == 32
            {
                self.by_id.insert(key.kid.clone(), public);
            }
        }
        self
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Checks `checkpoint`'s signature under the trusted key it names.
    pub fn check(&self, checkpoint: &Checkpoint) -> Result<(), Untrusted> {
        let public = self
            .by_id
            .get(&checkpoint.key_id)
            .ok_or(Untrusted::UnknownKey)?;
        let expected = signed_payload(
            checkpoint.tenant_id,
            checkpoint.sequence,
            &checkpoint.hash,
            checkpoint.create_micros,
        );
        if expected != checkpoint.signed_payload {
            return Err(Untrusted::PayloadMismatch);
        }
        if !verify_ed25519(public, &checkpoint.signed_payload, &checkpoint.signature) {
            return Err(Untrusted::BadSignature);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_verifies_only_as_signed_and_only_under_a_trusted_key() {
        let key = Arc::new(SigningKey::generate().unwrap());
        let signer = Signer::new(key.clone());
        let trusted = TrustedKeys::default().with(key.kid(), key.public_key());
        let checkpoint = signer.sign(Uuid::from_u128(1), 1000, [7; 32], 5).unwrap();
        trusted.check(&checkpoint).unwrap();

        let mut moved = checkpoint.clone();
        moved.sequence = 999;
        assert_eq!(trusted.check(&moved), Err(Untrusted::PayloadMismatch));
        let mut resigned = moved.clone();
        resigned.signed_payload = signed_payload(resigned.tenant_id, 999, &resigned.hash, 5);
        assert_eq!(trusted.check(&resigned), Err(Untrusted::BadSignature));

        // Signed by another key that claims to be it, or by an unknown one.
        let other = Signer::new(Arc::new(SigningKey::generate().unwrap()));
        let mut forged = other.sign(Uuid::from_u128(1), 1000, [7; 32], 5).unwrap();
        assert_eq!(trusted.check(&forged), Err(Untrusted::UnknownKey));
        forged.key_id = key.kid().to_owned();
        assert_eq!(trusted.check(&forged), Err(Untrusted::BadSignature));
        // Trusted through a JWKS (a previous key).
        let jwks = Jwks {
            keys: vec![
                penny_platform::signing::SigningKey::from_pkcs8(
                    SigningKey::generate().unwrap().pkcs8_document(),
                )
                .unwrap()
                .jwk(),
            ],
        };
        assert!(!TrustedKeys::default().with_jwks(&jwks).is_empty());
    }
}
