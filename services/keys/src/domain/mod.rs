//! The rules of key management, free of tonic and SQL.
//!
//! A tenant owns one keyring (`penny-tenant-<uuid>`) of numbered versions. Everything
//! encrypted under it is bound to an [`EncryptionContext`] (tenant, purpose, object), so a
//! ciphertext moved to another tenant or object fails exactly like a tampered one.

pub mod backend;
pub mod ciphertext;
pub mod context;
pub mod service;

pub use backend::{DataKey, ItemError, ItemResult, KeyBackend, KeyConfigChange, Sealed};
pub use ciphertext::Ciphertext;
pub use context::EncryptionContext;
pub use service::Keys;

use std::fmt;

use time::OffsetDateTime;
use uuid::Uuid;

/// A tenant's id. A newtype so it cannot be swapped with another id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(pub Uuid);

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl TenantId {
    /// The name of the tenant's key, in the store and in Vault.
    pub fn key_name(self) -> String {
        format!("penny-tenant-{}", self.0)
    }
}

/// Which engine holds the key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// The embedded engine: versions wrapped by a KEK derived from the master key.
    Local,
    /// HashiCorp Vault transit.
    Vault,
}

impl BackendKind {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Vault => "vault",
        }
    }
}

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersionInfo {
    /// 1, 2, …
    pub version: u32,
    /// When it was made.
    pub created_at: OffsetDateTime,
}

/// A keyring's metadata: never any key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The owning tenant.
    pub tenant_id: TenantId,
    /// The newest version, used for encryption.
    pub latest_version: u32,
    /// Versions below this no longer decrypt.
    pub min_decryption_version: u32,
    /// Versions below this no longer encrypt.
    pub min_encryption_version: u32,
    /// Whether `DeleteKey` may destroy the keyring.
    pub deletion_allowed: bool,
    /// The engine.
    pub backend: BackendKind,
    /// Every version still held.
    pub versions: Vec<KeyVersionInfo>,
    /// When the keyring was made.
    pub created_at: OffsetDateTime,
}

/// Largest plaintext item accepted by `Encrypt`.
pub const MAX_PLAINTEXT_BYTES: usize = 1024 * 1024;
/// Largest ciphertext accepted by `Decrypt` / `Rewrap`: 2 MiB of text, above the base64 of
/// the largest plaintext with its nonce, tag and prefix.
pub const MAX_CIPHERTEXT_CHARS: usize = 2 * 1024 * 1024;
/// Most items in one `Encrypt`, `Decrypt` or `Rewrap`.
pub const MAX_BATCH_ITEMS: usize = 1000;
