//! What every engine shares: ciphertexts are parsed before an engine sees them, so junk,
//! a foreign engine's prefix or an unknown version fails per item, the same way on both
//! engines, and only well-formed items are sent on.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::ciphertext::Prefix;
use super::{
    BackendKind, Ciphertext, DataKey, EncryptionContext, ItemResult, KeyBackend, KeyConfigChange,
    KeyInfo, Sealed, TenantId,
};
use crate::error::KeysError;

/// Key management over one engine.
#[derive(Clone)]
pub struct Keys {
    backend: Arc<dyn KeyBackend>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("backend", &self.backend.kind())
            .finish()
    }
}

fn expected_prefix(kind: BackendKind) -> Prefix {
    match kind {
        BackendKind::Local => Prefix::Penny,
        BackendKind::Vault => Prefix::Vault,
    }
}

/// Vault reports version problems as text without the version: put the one we parsed back.
fn with_version(err: KeysError, version: u32) -> KeysError {
    match err {
        KeysError::VersionBelowMinimum(_) => KeysError::VersionBelowMinimum(version),
        KeysError::VersionNotFound(_) => KeysError::VersionNotFound(version),
        other => other,
    }
}

impl Keys {
    /// Key management over `backend`.
    pub fn new(backend: Arc<dyn KeyBackend>) -> Self {
        Self { backend }
    }

    /// The engine in use.
    pub fn backend_kind(&self) -> BackendKind {
        self.backend.kind()
    }

    /// Readiness of the engine and its database.
    pub async fn ready(&self) -> bool {
        self.backend.ready().await
    }

    /// See [`KeyBackend::create_key`].
    pub async fn create_key(&self, tenant: TenantId) -> Result<(KeyInfo, bool), KeysError> {
        self.backend.create_key(tenant).await
    }

    /// See [`KeyBackend::get_key`].
    pub async fn get_key(&self, tenant: TenantId) -> Result<KeyInfo, KeysError> {
        self.backend.get_key(tenant).await
    }

    /// See [`KeyBackend::list_keys`].
    pub async fn list_keys(
        &self,
        after: Option<TenantId>,
        limit: u32,
    ) -> Result<Vec<KeyInfo>, KeysError> {
        self.backend.list_keys(after, limit).await
    }

    /// See [`KeyBackend::rotate_key`].
    pub async fn rotate_key(&self, tenant: TenantId) -> Result<KeyInfo, KeysError> {
        self.backend.rotate_key(tenant).await
    }

    /// See [`KeyBackend::update_key_config`].
    pub async fn update_key_config(
        &self,
        tenant: TenantId,
        change: KeyConfigChange,
    ) -> Result<KeyInfo, KeysError> {
        self.backend.update_key_config(tenant, change).await
    }

    /// See [`KeyBackend::delete_key`].
    pub async fn delete_key(&self, tenant: TenantId) -> Result<(), KeysError> {
        self.backend.delete_key(tenant).await
    }

    /// See [`KeyBackend::generate_data_key`].
    pub async fn generate_data_key(
        &self,
        context: &EncryptionContext,
        bits: u32,
    ) -> Result<DataKey, KeysError> {
        self.backend.generate_data_key(context, bits).await
    }

    /// See [`KeyBackend::encrypt`].
    pub async fn encrypt(
        &self,
        tenant: TenantId,
        items: Vec<(Zeroizing<Vec<u8>>, EncryptionContext)>,
    ) -> Result<Vec<ItemResult<Sealed>>, KeysError> {
        self.backend.encrypt(tenant, items).await
    }

    /// See [`KeyBackend::decrypt`].
    pub async fn decrypt(
        &self,
        tenant: TenantId,
        items: Vec<(String, EncryptionContext)>,
    ) -> Result<Vec<ItemResult<Zeroizing<Vec<u8>>>>, KeysError> {
        let (versions, valid, mut results) = self.screen(items);
        if !valid.is_empty() {
            let indexes: Vec<usize> = valid.iter().map(|(i, _)| *i).collect();
            let opened = self
                .backend
                .decrypt(tenant, valid.into_iter().map(|(_, item)| item).collect())
                .await?;
            merge(&mut results, &indexes, &versions, opened)?;
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(Err(KeysError::Internal("missing result".into()))))
            .collect())
    }

    /// See [`KeyBackend::rewrap`].
    pub async fn rewrap(
        &self,
        tenant: TenantId,
        items: Vec<(String, EncryptionContext)>,
    ) -> Result<Vec<ItemResult<Sealed>>, KeysError> {
        let (versions, valid, mut results) = self.screen(items);
        if !valid.is_empty() {
            let indexes: Vec<usize> = valid.iter().map(|(i, _)| *i).collect();
            let sealed = self
                .backend
                .rewrap(tenant, valid.into_iter().map(|(_, item)| item).collect())
                .await?;
            merge(&mut results, &indexes, &versions, sealed)?;
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(Err(KeysError::Internal("missing result".into()))))
            .collect())
    }

    /// Splits items into well-formed ones (with their index) and per-item failures.
    #[allow(clippy::type_complexity)]
    fn screen<T>(
        &self,
        items: Vec<(String, EncryptionContext)>,
    ) -> (
        Vec<u32>,
        Vec<(usize, (String, EncryptionContext))>,
        Vec<Option<ItemResult<T>>>,
    ) {
        let expected = expected_prefix(self.backend.kind());
        let mut versions = Vec::with_capacity(items.len());
        let mut valid = Vec::with_capacity(items.len());
        let mut results = Vec::with_capacity(items.len());
        for (index, (ciphertext, context)) in items.into_iter().enumerate() {
            match Ciphertext::parse(&ciphertext) {
                Ok(parsed) if parsed.prefix == expected => {
                    versions.push(parsed.version);
                    valid.push((index, (ciphertext, context)));
                    results.push(None);
                }
                Ok(_) => {
                    versions.push(0);
                    results.push(Some(Err(KeysError::WrongEngine)));
                }
                Err(err) => {
                    versions.push(0);
                    results.push(Some(Err(KeysError::Malformed(err))));
                }
            }
        }
        (versions, valid, results)
    }
}

fn merge<T>(
    results: &mut [Option<ItemResult<T>>],
    indexes: &[usize],
    versions: &[u32],
    answered: Vec<ItemResult<T>>,
) -> Result<(), KeysError> {
    if answered.len() != indexes.len() {
        return Err(KeysError::BackendRefused(format!(
            "backend answered {} items for {}",
            answered.len(),
            indexes.len()
        )));
    }
    for (index, result) in indexes.iter().zip(answered) {
        let version = versions.get(*index).copied().unwrap_or(0);
        if let Some(slot) = results.get_mut(*index) {
            *slot = Some(result.map_err(|e| with_version(e, version)));
        }
    }
    Ok(())
}
