//! The one interface both engines implement.

use async_trait::async_trait;
use zeroize::Zeroizing;

use super::{BackendKind, EncryptionContext, KeyInfo, TenantId};
use crate::error::KeysError;

/// The result of one batch item.
pub type ItemResult<T> = Result<T, ItemError>;
/// A batch item's failure (the same type: an item fails for the same reasons a call does).
pub type ItemError = KeysError;

/// A fresh data key: plaintext for the caller, wrapped for storage.
pub struct DataKey {
    /// The plaintext key; zeroed when dropped.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// The key wrapped under the tenant's key and bound to the context.
    pub wrapped: String,
    /// The key version that wrapped it.
    pub version: u32,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// A ciphertext and the version that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// `penny:v<N>:…` or `vault:v<N>:…`.
    pub ciphertext: String,
    /// N.
    pub version: u32,
}

/// A change to a key's configuration; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyConfigChange {
    /// New minimum decryption version (1..=latest).
    pub min_decryption_version: Option<u32>,
    /// Whether the key may be deleted.
    pub deletion_allowed: Option<bool>,
}

/// A key engine. Every method is tenant-scoped except `list_keys`.
#[async_trait]
pub trait KeyBackend: Send + Sync + 'static {
    /// Which engine this is.
    fn kind(&self) -> BackendKind;
    /// Whether the engine is usable now (readiness).
    async fn ready(&self) -> bool;
    /// Creates the tenant's key unless it exists; returns it and whether it was created.
    async fn create_key(&self, tenant: TenantId) -> Result<(KeyInfo, bool), KeysError>;
    /// The tenant's key metadata.
    async fn get_key(&self, tenant: TenantId) -> Result<KeyInfo, KeysError>;
    /// Keys ordered by tenant, after a tenant, at most `limit`.
    async fn list_keys(
        &self,
        after: Option<TenantId>,
        limit: u32,
    ) -> Result<Vec<KeyInfo>, KeysError>;
    /// Adds a version; new encryptions use it.
    async fn rotate_key(&self, tenant: TenantId) -> Result<KeyInfo, KeysError>;
    /// Changes the minimum decryption version or deletion flag.
    async fn update_key_config(
        &self,
        tenant: TenantId,
        change: KeyConfigChange,
    ) -> Result<KeyInfo, KeysError>;
    /// Destroys the key: everything under it becomes unreadable.
    async fn delete_key(&self, tenant: TenantId) -> Result<(), KeysError>;
    /// A fresh data key of `bits` bits, wrapped under the tenant's latest version.
    async fn generate_data_key(
        &self,
        context: &EncryptionContext,
        bits: u32,
    ) -> Result<DataKey, KeysError>;
    /// Encrypts each item under the tenant's latest version.
    async fn encrypt(
        &self,
        tenant: TenantId,
        items: Vec<(Zeroizing<Vec<u8>>, EncryptionContext)>,
    ) -> Result<Vec<ItemResult<Sealed>>, KeysError>;
    /// Decrypts each item.
    async fn decrypt(
        &self,
        tenant: TenantId,
        items: Vec<(String, EncryptionContext)>,
    ) -> Result<Vec<ItemResult<Zeroizing<Vec<u8>>>>, KeysError>;
    /// Re-encrypts each item under the latest version without revealing it.
    async fn rewrap(
        &self,
        tenant: TenantId,
        items: Vec<(String, EncryptionContext)>,
    ) -> Result<Vec<ItemResult<Sealed>>, KeysError>;
}

/// Checks a configuration change against the key it applies to.
pub fn check_config_change(info: &KeyInfo, change: &KeyConfigChange) -> Result<(), KeysError> {
    if let Some(min) = change.min_decryption_version {
        if min < 1 || min > info.latest_version {
            return Err(KeysError::InvalidConfig(
                "min_decryption_version",
                format!(
                    "must be between 1 and the latest version ({})",
                    info.latest_version
                ),
            ));
        }
        if min < info.min_decryption_version {
            // Lowering the minimum would resurrect versions an operator retired.
            return Err(KeysError::InvalidConfig(
                "min_decryption_version",
                format!(
                    "cannot be lowered below the current minimum ({})",
                    info.min_decryption_version
                ),
            ));
        }
    }
    Ok(())
}
