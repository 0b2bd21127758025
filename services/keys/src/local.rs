//! The embedded engine: keyrings in the keys database, each version a random 256-bit key
//! wrapped by a per-tenant key-encryption key derived with HKDF-SHA256 from the master key.
//!
//! Ciphertexts are `penny:v<N>:<base64(nonce ‖ ciphertext ‖ tag)>`, AES-256-GCM with a
//! random 96-bit nonce and the encoded [`EncryptionContext`] plus the version as associated
//! data. Unwrapped version keys are cached in memory for one second (plus a half-second
//! grace while one caller re-reads them), so a change made by another replica (rotation,
//! minimum version, deletion) is seen within 1.5 s; changes made through this replica are
//! seen at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use aes_gcm::aead::Nonce;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key};
use async_trait::async_trait;
use base64::Engine;
use hkdf::Hkdf;
use sha2::Sha256;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::domain::backend::check_config_change;
use crate::domain::ciphertext::Prefix;
use crate::domain::{
    BackendKind, Ciphertext, DataKey, EncryptionContext, ItemResult, KeyBackend, KeyConfigChange,
    KeyInfo, Sealed, TenantId,
};
use crate::error::KeysError;
use crate::store::Store;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// How long a cached keyring is trusted before it is read again.
const CACHE_TTL: Duration = Duration::from_secs(1);
/// While one caller re-reads an expired keyring, the others keep using it for at most this
/// much longer, so expiry costs one database read instead of one per concurrent caller.
const REFRESH_GRACE: Duration = Duration::from_millis(500);

/// The 256-bit master key every KEK derives from.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// Parses 64 hex digits or the base64 of 32 bytes. The error never echoes the value.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let text = text.trim();
        let mut key = Zeroizing::new([0u8; 32]);
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
                let pair = std::str::from_utf8(chunk).map_err(|_| "not hex")?;
                key[i] = u8::from_str_radix(pair, 16).map_err(|_| "not hex")?;
            }
            return Ok(Self(key));
        }
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| "must be 64 hex digits or the base64 of 32 bytes")?,
        );
        if decoded.len() != 32 {
            return Err("must be exactly 32 bytes (256 bits)");
        }
        key.copy_from_slice(&decoded);
        Ok(Self(key))
    }

    /// A fresh random key, hex-encoded (for `penny dev`).
    pub fn generate_hex() -> Zeroizing<String> {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::fill(&mut key[..]);
        let mut hex = Zeroizing::new(String::with_capacity(64));
        for byte in key.iter() {
            hex.push_str(&format!("{byte:02x}"));
        }
        hex
    }

    /// The tenant's key-encryption key.
    fn kek(&self, tenant: TenantId) -> Result<Aes256Gcm, KeysError> {
        let hkdf = Hkdf::<Sha256>::new(Some(b"penny.keys.kek.v1"), &self.0[..]);
        let mut okm = Zeroizing::new([0u8; 32]);
        hkdf.expand(tenant.0.as_bytes(), &mut okm[..])
            .map_err(|_| KeysError::Internal("hkdf expand".into()))?;
        cipher(&okm[..])
    }
}

fn cipher(key: &[u8]) -> Result<Aes256Gcm, KeysError> {
    let key =
        Key::<Aes256Gcm>::try_from(key).map_err(|_| KeysError::Internal("key length".into()))?;
    Ok(Aes256Gcm::new(&key))
}

fn version_aad(tenant: TenantId, version: u32) -> Vec<u8> {
    let mut aad = b"penny.keys.version.v1".to_vec();
    aad.extend_from_slice(tenant.0.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

fn data_aad(context: &EncryptionContext, version: u32) -> Vec<u8> {
    let mut aad = context.encode();
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

fn seal(cipher: &Aes256Gcm, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeysError> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce);
    let sealed = cipher
        .encrypt(
            &Nonce::<Aes256Gcm>::from(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| KeysError::Internal("aes-gcm encrypt".into()))?;
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

fn open(cipher: &Aes256Gcm, body: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeysError> {
    if body.len() < NONCE_LEN + TAG_LEN {
        return Err(KeysError::DecryptionFailed);
    }
    let (nonce, sealed) = body.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| KeysError::DecryptionFailed)?;
    cipher
        .decrypt(
            &Nonce::<Aes256Gcm>::from(nonce),
            Payload { msg: sealed, aad },
        )
        .map(Zeroizing::new)
        .map_err(|_| KeysError::DecryptionFailed)
}

/// Unwraps one stored version key. The engine's own path; public so that tests can prove
/// the stored bytes are wrapped (and search the database for the unwrapped key).
pub fn unwrap_version_key(
    master: &MasterKey,
    tenant: TenantId,
    version: u32,
    wrapped: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KeysError> {
    open(&master.kek(tenant)?, wrapped, &version_aad(tenant, version))
}

/// A keyring with its versions unwrapped, as cached.
struct LoadedKeyring {
    info: KeyInfo,
    ciphers: HashMap<u32, Aes256Gcm>,
    loaded_at: Instant,
    refreshing: AtomicBool,
}

impl LoadedKeyring {
    fn latest(&self) -> Result<(u32, &Aes256Gcm), KeysError> {
        let version = self.info.latest_version;
        self.ciphers
            .get(&version)
            .map(|c| (version, c))
            .ok_or(KeysError::VersionNotFound(version))
    }

    fn for_decryption(&self, version: u32) -> Result<&Aes256Gcm, KeysError> {
        if version > self.info.latest_version {
            return Err(KeysError::VersionNotFound(version));
        }
        if version < self.info.min_decryption_version {
            return Err(KeysError::VersionBelowMinimum(version));
        }
        self.ciphers
            .get(&version)
            .ok_or(KeysError::VersionNotFound(version))
    }

    fn seal(&self, plaintext: &[u8], context: &EncryptionContext) -> ItemResult<Sealed> {
        let (version, cipher) = self.latest()?;
        let body = seal(cipher, plaintext, &data_aad(context, version))?;
        let ciphertext = Ciphertext {
            prefix: Prefix::Penny,
            version,
            body,
        };
        Ok(Sealed {
            ciphertext: ciphertext.format(),
            version,
        })
    }

    fn open(&self, text: &str, context: &EncryptionContext) -> ItemResult<Zeroizing<Vec<u8>>> {
        let parsed = Ciphertext::parse(text)?;
        if parsed.prefix != Prefix::Penny {
            return Err(KeysError::WrongEngine);
        }
        let cipher = self.for_decryption(parsed.version)?;
        open(cipher, &parsed.body, &data_aad(context, parsed.version))
    }
}

/// The embedded engine.
pub struct LocalBackend {
    store: Store,
    master: MasterKey,
    cache: RwLock<HashMap<TenantId, Arc<LoadedKeyring>>>,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend").finish_non_exhaustive()
    }
}

impl LocalBackend {
    /// An engine over `store`, wrapping with KEKs derived from `master`.
    pub fn new(store: Store, master: MasterKey) -> Self {
        Self {
            store,
            master,
            cache: RwLock::new(HashMap::new()),
        }
    }

    fn forget(&self, tenant: TenantId) {
        if let Ok(mut cache) = self.cache.write() {
            cache.remove(&tenant);
        }
    }

    fn wrap_new_version(&self, tenant: TenantId, version: u32) -> Result<Vec<u8>, KeysError> {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::fill(&mut key[..]);
        seal(
            &self.master.kek(tenant)?,
            &key[..],
            &version_aad(tenant, version),
        )
    }

    /// The tenant's keyring, from the cache when fresh.
    async fn keyring(&self, tenant: TenantId) -> Result<Arc<LoadedKeyring>, KeysError> {
        let cached = self.cache.read().ok().and_then(|c| c.get(&tenant).cloned());
        if let Some(ring) = &cached {
            let age = ring.loaded_at.elapsed();
            if age < CACHE_TTL {
                return Ok(ring.clone());
            }
            // Expired: one caller refreshes, the others use it a little longer (bounded).
            if age < CACHE_TTL + REFRESH_GRACE && ring.refreshing.swap(true, Ordering::AcqRel) {
                return Ok(ring.clone());
            }
        }
        let loaded = self.load_keyring(tenant).await;
        if loaded.is_err()
            && let Some(ring) = &cached
        {
            ring.refreshing.store(false, Ordering::Release);
        }
        loaded
    }

    async fn load_keyring(&self, tenant: TenantId) -> Result<Arc<LoadedKeyring>, KeysError> {
        let stored = self.store.load(tenant).await?.ok_or_else(|| {
            self.forget(tenant);
            KeysError::KeyNotFound
        })?;
        let kek = self.master.kek(tenant)?;
        let mut ciphers = HashMap::with_capacity(stored.wrapped.len());
        for (version, wrapped) in &stored.wrapped {
            let key = open(&kek, wrapped, &version_aad(tenant, *version)).map_err(|_| {
                // Wrong master key or a damaged row: never serve, never guess.
                KeysError::Internal(format!(
                    "cannot unwrap key version {version} of tenant {tenant}: wrong master key or damaged row"
                ))
            })?;
            ciphers.insert(*version, cipher(&key)?);
        }
        let ring = Arc::new(LoadedKeyring {
            info: stored.info,
            ciphers,
            loaded_at: Instant::now(),
            refreshing: AtomicBool::new(false),
        });
        if let Ok(mut cache) = self.cache.write() {
            cache.insert(tenant, ring.clone());
        }
        Ok(ring)
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

#[async_trait]
impl KeyBackend for LocalBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Local
    }

    async fn ready(&self) -> bool {
        penny_platform::db::ping(self.store.connection()).await
    }

    async fn create_key(&self, tenant: TenantId) -> Result<(KeyInfo, bool), KeysError> {
        let wrapped = self.wrap_new_version(tenant, 1)?;
        let created = self
            .store
            .create(tenant, BackendKind::Local, wrapped, now())
            .await?;
        self.forget(tenant);
        Ok((self.keyring(tenant).await?.info.clone(), created))
    }

    /// The key's description, read afresh (another replica may have rotated or deleted
    /// it): no version is unwrapped and nothing enters the cache, so describing every
    /// tenant's key (files' background rewrap does, once a pass) costs no key material.
    async fn get_key(&self, tenant: TenantId) -> Result<KeyInfo, KeysError> {
        match self.store.load(tenant).await? {
            Some(stored) => Ok(stored.info),
            None => {
                self.forget(tenant);
                Err(KeysError::KeyNotFound)
            }
        }
    }

    async fn list_keys(
        &self,
        after: Option<TenantId>,
        limit: u32,
    ) -> Result<Vec<KeyInfo>, KeysError> {
        Ok(self
            .store
            .list(after.map(|t| t.0), u64::from(limit))
            .await?)
    }

    async fn rotate_key(&self, tenant: TenantId) -> Result<KeyInfo, KeysError> {
        for _attempt in 0..3 {
            let latest = self
                .store
                .load(tenant)
                .await?
                .ok_or(KeysError::KeyNotFound)?
                .info
                .latest_version;
            let next = latest.checked_add(1).ok_or(KeysError::Conflict)?;
            let wrapped = self.wrap_new_version(tenant, next)?;
            if self
                .store
                .add_version(tenant, latest, wrapped, now())
                .await?
            {
                self.forget(tenant);
                return Ok(self.keyring(tenant).await?.info.clone());
            }
        }
        Err(KeysError::Conflict)
    }

    async fn update_key_config(
        &self,
        tenant: TenantId,
        change: KeyConfigChange,
    ) -> Result<KeyInfo, KeysError> {
        self.forget(tenant);
        let info = self.keyring(tenant).await?.info.clone();
        check_config_change(&info, &change)?;
        if !self.store.update_config(tenant, &change, now()).await? {
            return Err(KeysError::KeyNotFound);
        }
        self.forget(tenant);
        Ok(self.keyring(tenant).await?.info.clone())
    }

    async fn delete_key(&self, tenant: TenantId) -> Result<(), KeysError> {
        self.forget(tenant);
        let info = self.keyring(tenant).await?.info.clone();
        if !info.deletion_allowed {
            return Err(KeysError::DeletionNotAllowed);
        }
        let deleted = self.store.delete(tenant).await?;
        self.forget(tenant);
        if deleted {
            Ok(())
        } else {
            Err(KeysError::KeyNotFound)
        }
    }

    async fn generate_data_key(
        &self,
        context: &EncryptionContext,
        bits: u32,
    ) -> Result<DataKey, KeysError> {
        let ring = self.keyring(context.tenant_id).await?;
        let len = usize::try_from(bits / 8).map_err(|_| KeysError::Internal("bits".into()))?;
        let mut plaintext = Zeroizing::new(vec![0u8; len]);
        rand::fill(&mut plaintext[..]);
        let sealed = ring.seal(&plaintext, context)?;
        Ok(DataKey {
            plaintext,
            wrapped: sealed.ciphertext,
            version: sealed.version,
        })
    }

    async fn encrypt(
        &self,
        tenant: TenantId,
        items: Vec<(Zeroizing<Vec<u8>>, EncryptionContext)>,
    ) -> Result<Vec<ItemResult<Sealed>>, KeysError> {
        let ring = self.keyring(tenant).await?;
        Ok(items
            .iter()
            .map(|(plaintext, context)| ring.seal(plaintext, context))
            .collect())
    }

    async fn decrypt(
        &self,
        tenant: TenantId,
        items: Vec<(String, EncryptionContext)>,
    ) -> Result<Vec<ItemResult<Zeroizing<Vec<u8>>>>, KeysError> {
        let ring = self.keyring(tenant).await?;
        Ok(items
            .iter()
            .map(|(ciphertext, context)| ring.open(ciphertext, context))
            .collect())
    }

    async fn rewrap(
        &self,
        tenant: TenantId,
        items: Vec<(String, EncryptionContext)>,
    ) -> Result<Vec<ItemResult<Sealed>>, KeysError> {
        let ring = self.keyring(tenant).await?;
        Ok(items
            .iter()
            .map(|(ciphertext, context)| {
                let plaintext = ring.open(ciphertext, context)?;
                ring.seal(&plaintext, context)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_key_parsing() {
        let hex = MasterKey::generate_hex();
        assert!(MasterKey::parse(&hex).is_ok());
        assert!(
            MasterKey::parse(&base64::engine::general_purpose::STANDARD.encode([7u8; 32])).is_ok()
        );
        assert!(MasterKey::parse("too short").is_err());
        assert!(
            MasterKey::parse(&base64::engine::general_purpose::STANDARD.encode([7u8; 16])).is_err()
        );
        let err = MasterKey::parse("zz".repeat(32).as_str()).unwrap_err();
        assert!(!err.contains("zz"));
    }

    #[tokio::test]
    async fn describing_a_key_unwraps_nothing_and_follows_other_replicas() {
        let path = std::env::temp_dir().join(format!("penny-keys-{}.db", uuid::Uuid::new_v4()));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let db = penny_platform::db::connect_and_migrate::<crate::migration::Migrator>(&url)
            .await
            .unwrap();
        let store = Store::new(db).await.unwrap();
        let master = || MasterKey::parse(&"11".repeat(32)).unwrap();
        let backend = LocalBackend::new(store.clone(), master());
        let tenant = TenantId(uuid::Uuid::new_v4());
        backend.create_key(tenant).await.unwrap();
        backend.forget(tenant);
        let cached = |backend: &LocalBackend| backend.cache.read().unwrap().len();
        let info = backend.get_key(tenant).await.unwrap();
        assert_eq!(info.latest_version, 1);
        assert_eq!(cached(&backend), 0, "GetKey loaded key material");
        // A rotation through another replica shows at once.
        LocalBackend::new(store, master())
            .rotate_key(tenant)
            .await
            .unwrap();
        assert_eq!(backend.get_key(tenant).await.unwrap().latest_version, 2);
        assert_eq!(cached(&backend), 0);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn kek_differs_per_tenant_and_master() {
        let a = MasterKey::parse(&"11".repeat(32)).unwrap();
        let b = MasterKey::parse(&"22".repeat(32)).unwrap();
        let t1 = TenantId(uuid::Uuid::new_v4());
        let t2 = TenantId(uuid::Uuid::new_v4());
        let sealed = seal(&a.kek(t1).unwrap(), b"secret", b"aad").unwrap();
        assert!(open(&a.kek(t1).unwrap(), &sealed, b"aad").is_ok());
        assert!(open(&a.kek(t2).unwrap(), &sealed, b"aad").is_err());
        assert!(open(&b.kek(t1).unwrap(), &sealed, b"aad").is_err());
        assert!(open(&a.kek(t1).unwrap(), &sealed, b"other").is_err());
    }
}
