//! The Vault transit engine, through `vaultrs`.
//!
//! One transit key per tenant, `penny-tenant-<uuid>`, type `aes256-gcm96`, `derived=true`:
//! the encoded [`EncryptionContext`] is the derivation context, so another tenant's or
//! object's context derives another key and decryption fails like tampering. Ciphertexts
//! are Vault's own `vault:v<N>:…`, passed through. Batches use Vault's `batch_input` (the
//! one call `vaultrs` lacks is defined here as a `rustify` endpoint and executed through
//! `vaultrs`). Vault sealed or unreachable is UNAVAILABLE at once; there is never a
//! fallback to another engine.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustify_derive::Endpoint;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use vaultrs::api::transit::KeyType;
use vaultrs::api::transit::requests::{
    CreateKeyRequest, DataKeyType, GenerateDataKeyRequest, UpdateKeyConfigurationRequest,
};
use vaultrs::api::transit::responses::ReadKeyData;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;
use zeroize::Zeroizing;

use crate::domain::backend::check_config_change;
use crate::domain::{
    BackendKind, Ciphertext, DataKey, EncryptionContext, ItemResult, KeyBackend, KeyConfigChange,
    KeyInfo, KeyVersionInfo, Sealed, TenantId,
};
use crate::error::KeysError;
use crate::store::Store;

/// How the service authenticates to Vault.
#[derive(Clone)]
pub enum VaultAuth {
    /// A token (`VAULT_TOKEN`).
    Token(Zeroizing<String>),
    /// Kubernetes auth: the pod's service-account JWT exchanged for a token.
    Kubernetes {
        /// The auth mount (`kubernetes`).
        mount: String,
        /// The Vault role.
        role: String,
        /// Where the service-account token is mounted.
        jwt_path: std::path::PathBuf,
    },
}

impl std::fmt::Debug for VaultAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token(_) => f.write_str("Token(..)"),
            Self::Kubernetes { mount, role, .. } => f
                .debug_struct("Kubernetes")
                .field("mount", mount)
                .field("role", role)
                .finish_non_exhaustive(),
        }
    }
}

/// Where Vault is and how to talk to it.
#[derive(Debug, Clone)]
pub struct VaultSettings {
    /// `VAULT_ADDR`.
    pub address: String,
    /// The transit mount (`transit`).
    pub mount: String,
    /// Authentication.
    pub auth: VaultAuth,
    /// Per-request timeout: Vault unreachable must fail fast.
    pub timeout: Duration,
}

/// The Vault transit engine.
pub struct VaultBackend {
    client: RwLock<Arc<VaultClient>>,
    settings: VaultSettings,
    store: Store,
    /// Tenants whose transit key was seen to exist, and when: encrypt never upserts a key.
    /// Entries expire so that a deletion by another replica is noticed.
    known: RwLock<HashMap<TenantId, Instant>>,
    /// Set when Vault answered 403 (token expired or revoked, policy changed): the service
    /// reports NOT_SERVING and, with Kubernetes auth, logs in again on the next probe.
    refused: AtomicBool,
}

/// How long a key seen in Vault is assumed to still exist.
const KNOWN_TTL: Duration = Duration::from_millis(1500);

impl std::fmt::Debug for VaultBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultBackend")
            .field("address", &self.settings.address)
            .field("mount", &self.settings.mount)
            .finish_non_exhaustive()
    }
}

fn build_client(settings: &VaultSettings, token: &str) -> Result<VaultClient, KeysError> {
    url::Url::parse(&settings.address)
        .map_err(|_| KeysError::BackendRefused("VAULT_ADDR is not a URL".into()))?;
    let built = VaultClientSettingsBuilder::default()
        .address(&settings.address)
        .token(token)
        .timeout(Some(settings.timeout))
        .build()
        .map_err(|e| KeysError::BackendRefused(format!("vault client settings: {e}")))?;
    VaultClient::new(built).map_err(|e| KeysError::BackendRefused(format!("vault client: {e}")))
}

/// Maps a Vault failure; `errors` text is logged by the caller's mapping, never returned.
fn map_client_error(err: ClientError) -> KeysError {
    match err {
        ClientError::APIError { code, errors } => {
            let text = errors.join("; ");
            match code {
                404 => KeysError::KeyNotFound,
                403 => KeysError::BackendRefused(format!("vault 403: {text}")),
                500..=599 => KeysError::BackendUnavailable(format!("vault {code}: {text}")),
                400 if text.contains("not found") => KeysError::KeyNotFound,
                400 if text.contains("deletion is not allowed") => KeysError::DeletionNotAllowed,
                _ => map_item_error(&text),
            }
        }
        ClientError::RestClientError { source } => {
            // rustify reports non-2xx responses here too.
            match source {
                rustify::errors::ClientError::ServerResponseError { code, content } => {
                    let errors = content
                        .as_deref()
                        .and_then(|c| serde_json::from_str::<VaultErrors>(c).ok())
                        .map(|e| e.errors)
                        .unwrap_or_default();
                    map_client_error(ClientError::APIError { code, errors })
                }
                other => KeysError::BackendUnavailable(format!("vault request: {other}")),
            }
        }
        ClientError::ResponseEmptyError | ClientError::ResponseDataEmptyError => {
            KeysError::KeyNotFound
        }
        other => KeysError::BackendUnavailable(format!("vault: {other}")),
    }
}

/// Maps the error text of one batch item (Vault reports them as strings).
fn map_item_error(text: &str) -> KeysError {
    let lower = text.to_ascii_lowercase();
    if lower.contains("disallowed by policy") || lower.contains("too old") {
        KeysError::VersionBelowMinimum(0)
    } else if lower.contains("invalid key version") || lower.contains("version is too new") {
        KeysError::VersionNotFound(0)
    } else if lower.contains("authentication failed") || lower.contains("invalid ciphertext") {
        KeysError::DecryptionFailed
    } else if lower.contains("not found") {
        KeysError::KeyNotFound
    } else {
        KeysError::BackendRefused(format!("vault item: {text}"))
    }
}

#[derive(Debug, Deserialize)]
struct VaultErrors {
    #[serde(default)]
    errors: Vec<String>,
}

/// Vault's response code for a batch in which some items failed: 200, so the per-item
/// results come back instead of a bare 400.
const PARTIAL_FAILURE_CODE: u16 = 200;

#[derive(Debug, Serialize)]
struct EncryptInput {
    plaintext: String,
    context: String,
}

#[derive(Debug, Serialize)]
struct CiphertextInput {
    ciphertext: String,
    context: String,
}

#[derive(Debug, Deserialize)]
struct BatchSealed {
    #[serde(default)]
    ciphertext: Option<String>,
    #[serde(default)]
    key_version: Option<u32>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct BatchOpened {
    #[serde(default)]
    plaintext: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct BatchSealedResponse {
    batch_results: Vec<BatchSealed>,
}

#[derive(Debug, Deserialize)]
struct BatchOpenedResponse {
    batch_results: Vec<BatchOpened>,
}

/// `POST {mount}/encrypt/{name}` with `batch_input`.
#[derive(Debug, Endpoint, Serialize)]
#[endpoint(
    path = "{self.mount}/encrypt/{self.name}",
    method = "POST",
    response = "BatchSealedResponse"
)]
struct BatchEncryptRequest {
    #[endpoint(skip)]
    #[serde(skip)]
    mount: String,
    #[endpoint(skip)]
    #[serde(skip)]
    name: String,
    batch_input: Vec<EncryptInput>,
    partial_failure_response_code: u16,
}

/// `POST {mount}/decrypt/{name}` with `batch_input`.
#[derive(Debug, Endpoint, Serialize)]
#[endpoint(
    path = "{self.mount}/decrypt/{self.name}",
    method = "POST",
    response = "BatchOpenedResponse"
)]
struct BatchDecryptRequest {
    #[endpoint(skip)]
    #[serde(skip)]
    mount: String,
    #[endpoint(skip)]
    #[serde(skip)]
    name: String,
    batch_input: Vec<CiphertextInput>,
    partial_failure_response_code: u16,
}

/// `POST {mount}/rewrap/{name}` with `batch_input`.
#[derive(Debug, Endpoint, Serialize)]
#[endpoint(
    path = "{self.mount}/rewrap/{self.name}",
    method = "POST",
    response = "BatchSealedResponse"
)]
struct BatchRewrapRequest {
    #[endpoint(skip)]
    #[serde(skip)]
    mount: String,
    #[endpoint(skip)]
    #[serde(skip)]
    name: String,
    batch_input: Vec<CiphertextInput>,
    partial_failure_response_code: u16,
}

fn context_b64(context: &EncryptionContext) -> String {
    STANDARD.encode(context.encode())
}

fn sealed_item(item: BatchSealed) -> ItemResult<Sealed> {
    if let Some(error) = item.error.filter(|e| !e.is_empty()) {
        return Err(map_item_error(&error));
    }
    let ciphertext = item
        .ciphertext
        .ok_or_else(|| KeysError::BackendRefused("vault returned no ciphertext".into()))?;
    let version = match item.key_version {
        Some(v) => v,
        None => Ciphertext::parse(&ciphertext)?.version,
    };
    Ok(Sealed {
        ciphertext,
        version,
    })
}

fn opened_item(item: BatchOpened) -> ItemResult<Zeroizing<Vec<u8>>> {
    if let Some(error) = item.error.filter(|e| !e.is_empty()) {
        return Err(map_item_error(&error));
    }
    let plaintext = Zeroizing::new(item.plaintext.unwrap_or_default());
    STANDARD
        .decode(plaintext.as_bytes())
        .map(Zeroizing::new)
        .map_err(|_| KeysError::BackendRefused("vault returned a malformed plaintext".into()))
}

/// When every item of a batch failed, Vault answers 400 with the errors only: each item
/// gets the error at its index, or the first one.
fn spread<T>(err: ClientError, count: usize) -> Result<Vec<ItemResult<T>>, KeysError> {
    match err {
        ClientError::APIError { code: 400, errors } if !errors.is_empty() => Ok((0..count)
            .map(|i| Err(map_item_error(errors.get(i).unwrap_or(&errors[0]))))
            .collect()),
        other => Err(map_client_error(other)),
    }
}

impl VaultBackend {
    /// Connects (and logs in, for Kubernetes auth).
    pub async fn connect(settings: VaultSettings, store: Store) -> Result<Self, KeysError> {
        let token = login(&settings).await?;
        let client = build_client(&settings, &token)?;
        Ok(Self {
            client: RwLock::new(Arc::new(client)),
            settings,
            store,
            known: RwLock::new(HashMap::new()),
            refused: AtomicBool::new(false),
        })
    }

    /// Records a failure that an operator (or a fresh login) must fix.
    fn note<T>(&self, result: Result<T, KeysError>) -> Result<T, KeysError> {
        match &result {
            Err(KeysError::BackendRefused(_)) => self.refused.store(true, Ordering::Release),
            Ok(_) => self.refused.store(false, Ordering::Release),
            Err(_) => {}
        }
        result
    }

    /// Logs in again (Kubernetes auth) and swaps the client in.
    async fn relogin(&self) -> Result<(), KeysError> {
        let token = login(&self.settings).await?;
        let client = build_client(&self.settings, &token)?;
        if let Ok(mut guard) = self.client.write() {
            *guard = Arc::new(client);
        }
        Ok(())
    }

    fn client(&self) -> Result<Arc<VaultClient>, KeysError> {
        self.client
            .read()
            .map(|c| c.clone())
            .map_err(|_| KeysError::Internal("vault client lock".into()))
    }

    fn mount(&self) -> &str {
        &self.settings.mount
    }

    fn remember(&self, tenant: TenantId, exists: bool) {
        if let Ok(mut known) = self.known.write() {
            if exists {
                known.insert(tenant, Instant::now());
            } else {
                known.remove(&tenant);
            }
        }
    }

    /// Fails with KEY_NOT_FOUND unless the tenant's transit key exists, so no call can
    /// upsert a key Vault would create with defaults.
    async fn ensure_exists(&self, tenant: TenantId) -> Result<(), KeysError> {
        let fresh = self.known.read().is_ok_and(|k| {
            k.get(&tenant)
                .is_some_and(|seen| seen.elapsed() < KNOWN_TTL)
        });
        if fresh {
            return Ok(());
        }
        self.read_key(tenant).await.map(drop)
    }

    async fn read_key(&self, tenant: TenantId) -> Result<KeyInfo, KeysError> {
        let client = self.client()?;
        let read = self.note(
            vaultrs::transit::key::read(client.as_ref(), self.mount(), &tenant.key_name())
                .await
                .map_err(map_client_error),
        );
        let read = match read {
            Ok(read) => read,
            Err(err) => {
                if matches!(err, KeysError::KeyNotFound) {
                    self.remember(tenant, false);
                }
                return Err(err);
            }
        };
        let mut versions: Vec<KeyVersionInfo> = match &read.keys {
            ReadKeyData::Symmetric(map) => map
                .iter()
                .filter_map(|(version, created)| {
                    Some(KeyVersionInfo {
                        version: version.parse().ok()?,
                        created_at: OffsetDateTime::from_unix_timestamp(
                            i64::try_from(*created).ok()?,
                        )
                        .ok()?,
                    })
                })
                .collect(),
            ReadKeyData::Asymmetric(_) => {
                return Err(KeysError::BackendRefused(
                    "transit key is asymmetric, not aes256-gcm96".into(),
                ));
            }
        };
        versions.sort_by_key(|v| v.version);
        let latest_version = versions.last().map_or(0, |v| v.version);
        let created_at = versions
            .first()
            .map_or_else(OffsetDateTime::now_utc, |v| v.created_at);
        let info = KeyInfo {
            tenant_id: tenant,
            latest_version,
            min_decryption_version: u32::try_from(read.min_decryption_version).unwrap_or(u32::MAX),
            min_encryption_version: u32::try_from(read.min_encryption_version).unwrap_or(u32::MAX),
            deletion_allowed: read.deletion_allowed,
            backend: BackendKind::Vault,
            versions,
            created_at,
        };
        self.store.mirror(&info, OffsetDateTime::now_utc()).await?;
        self.remember(tenant, true);
        Ok(info)
    }
}

async fn login(settings: &VaultSettings) -> Result<Zeroizing<String>, KeysError> {
    match &settings.auth {
        VaultAuth::Token(token) => Ok(token.clone()),
        VaultAuth::Kubernetes {
            mount,
            role,
            jwt_path,
        } => {
            let jwt = Zeroizing::new(tokio::fs::read_to_string(jwt_path).await.map_err(|_| {
                KeysError::BackendRefused(format!(
                    "cannot read the service-account token at {}",
                    jwt_path.display()
                ))
            })?);
            let anonymous = build_client(settings, "")?;
            let auth = vaultrs::auth::kubernetes::login(&anonymous, mount, role, jwt.trim())
                .await
                .map_err(map_client_error)?;
            Ok(Zeroizing::new(auth.client_token))
        }
    }
}

#[async_trait]
impl KeyBackend for VaultBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Vault
    }

    async fn ready(&self) -> bool {
        if self.refused.load(Ordering::Acquire) {
            if matches!(self.settings.auth, VaultAuth::Kubernetes { .. })
                && self.relogin().await.is_ok()
            {
                tracing::info!("logged in to vault again after a refusal");
                self.refused.store(false, Ordering::Release);
            } else {
                return false;
            }
        }
        let Ok(client) = self.client() else {
            return false;
        };
        // Active and standby nodes serve transit (standbys forward); sealed, uninitialized
        // or unreachable do not.
        let status = vaultrs::sys::status(client.as_ref()).await;
        matches!(
            status,
            Ok(vaultrs::sys::ServerStatus::OK
                | vaultrs::sys::ServerStatus::STANDBY
                | vaultrs::sys::ServerStatus::PERFSTANDBY)
        ) && penny_platform::db::ping(self.store.connection()).await
    }

    async fn create_key(&self, tenant: TenantId) -> Result<(KeyInfo, bool), KeysError> {
        match self.read_key(tenant).await {
            Ok(info) => return Ok((info, false)),
            Err(KeysError::KeyNotFound) => {}
            Err(other) => return Err(other),
        }
        let client = self.client()?;
        vaultrs::transit::key::create(
            client.as_ref(),
            self.mount(),
            &tenant.key_name(),
            Some(
                CreateKeyRequest::builder()
                    .key_type(KeyType::Aes256Gcm96)
                    .derived(true),
            ),
        )
        .await
        .map_err(map_client_error)?;
        Ok((self.read_key(tenant).await?, true))
    }

    async fn get_key(&self, tenant: TenantId) -> Result<KeyInfo, KeysError> {
        self.read_key(tenant).await
    }

    async fn list_keys(
        &self,
        after: Option<TenantId>,
        limit: u32,
    ) -> Result<Vec<KeyInfo>, KeysError> {
        // The mirror, refreshed by every read: Vault's LIST neither pages nor filters.
        Ok(self
            .store
            .list(after.map(|t| t.0), u64::from(limit))
            .await?)
    }

    async fn rotate_key(&self, tenant: TenantId) -> Result<KeyInfo, KeysError> {
        self.ensure_exists(tenant).await?;
        let client = self.client()?;
        vaultrs::transit::key::rotate(client.as_ref(), self.mount(), &tenant.key_name())
            .await
            .map_err(map_client_error)?;
        self.read_key(tenant).await
    }

    async fn update_key_config(
        &self,
        tenant: TenantId,
        change: KeyConfigChange,
    ) -> Result<KeyInfo, KeysError> {
        let info = self.read_key(tenant).await?;
        check_config_change(&info, &change)?;
        let mut request = UpdateKeyConfigurationRequest::builder();
        if let Some(min) = change.min_decryption_version {
            request.min_decryption_version(u64::from(min));
        }
        if let Some(allowed) = change.deletion_allowed {
            request.deletion_allowed(allowed);
        }
        let client = self.client()?;
        vaultrs::transit::key::update(
            client.as_ref(),
            self.mount(),
            &tenant.key_name(),
            Some(&mut request),
        )
        .await
        .map_err(map_client_error)?;
        self.read_key(tenant).await
    }

    async fn delete_key(&self, tenant: TenantId) -> Result<(), KeysError> {
        let info = self.read_key(tenant).await?;
        if !info.deletion_allowed {
            return Err(KeysError::DeletionNotAllowed);
        }
        let client = self.client()?;
        vaultrs::transit::key::delete(client.as_ref(), self.mount(), &tenant.key_name())
            .await
            .map_err(map_client_error)?;
        self.remember(tenant, false);
        self.store.delete(tenant).await?;
        Ok(())
    }

    async fn generate_data_key(
        &self,
        context: &EncryptionContext,
        bits: u32,
    ) -> Result<DataKey, KeysError> {
        self.ensure_exists(context.tenant_id).await?;
        let client = self.client()?;
        let bits = u16::try_from(bits).map_err(|_| KeysError::Internal("bits".into()))?;
        let response = vaultrs::transit::generate::data_key(
            client.as_ref(),
            self.mount(),
            &context.tenant_id.key_name(),
            DataKeyType::Plaintext,
            Some(
                GenerateDataKeyRequest::builder()
                    .context(context_b64(context))
                    .bits(bits),
            ),
        )
        .await
        .map_err(map_client_error)?;
        let encoded = Zeroizing::new(response.plaintext.unwrap_or_default());
        let plaintext = Zeroizing::new(STANDARD.decode(encoded.as_bytes()).map_err(|_| {
            KeysError::BackendRefused("vault returned a malformed data key".into())
        })?);
        let version = Ciphertext::parse(&response.ciphertext)?.version;
        Ok(DataKey {
            plaintext,
            wrapped: response.ciphertext,
            version,
        })
    }

    async fn encrypt(
        &self,
        tenant: TenantId,
        items: Vec<(Zeroizing<Vec<u8>>, EncryptionContext)>,
    ) -> Result<Vec<ItemResult<Sealed>>, KeysError> {
        self.ensure_exists(tenant).await?;
        let count = items.len();
        let request = BatchEncryptRequest {
            mount: self.mount().to_owned(),
            name: tenant.key_name(),
            batch_input: items
                .iter()
                .map(|(plaintext, context)| EncryptInput {
                    plaintext: STANDARD.encode(plaintext.as_slice()),
                    context: context_b64(context),
                })
                .collect(),
            partial_failure_response_code: PARTIAL_FAILURE_CODE,
        };
        let client = self.client()?;
        match vaultrs::api::exec_with_result(client.as_ref(), request).await {
            Ok(response) => Ok(response
                .batch_results
                .into_iter()
                .map(sealed_item)
                .collect()),
            Err(err) => spread(err, count),
        }
    }

    async fn decrypt(
        &self,
        tenant: TenantId,
        items: Vec<(String, EncryptionContext)>,
    ) -> Result<Vec<ItemResult<Zeroizing<Vec<u8>>>>, KeysError> {
        self.ensure_exists(tenant).await?;
        let count = items.len();
        let request = BatchDecryptRequest {
            mount: self.mount().to_owned(),
            name: tenant.key_name(),
            batch_input: items
                .into_iter()
                .map(|(ciphertext, context)| CiphertextInput {
                    context: context_b64(&context),
                    ciphertext,
                })
                .collect(),
            partial_failure_response_code: PARTIAL_FAILURE_CODE,
        };
        let client = self.client()?;
        match vaultrs::api::exec_with_result(client.as_ref(), request).await {
            Ok(response) => Ok(response
                .batch_results
                .into_iter()
                .map(opened_item)
                .collect()),
            Err(err) => spread(err, count),
        }
    }

    async fn rewrap(
        &self,
        tenant: TenantId,
        items: Vec<(String, EncryptionContext)>,
    ) -> Result<Vec<ItemResult<Sealed>>, KeysError> {
        self.ensure_exists(tenant).await?;
        let count = items.len();
        let request = BatchRewrapRequest {
            mount: self.mount().to_owned(),
            name: tenant.key_name(),
            batch_input: items
                .into_iter()
                .map(|(ciphertext, context)| CiphertextInput {
                    context: context_b64(&context),
                    ciphertext,
                })
                .collect(),
            partial_failure_response_code: PARTIAL_FAILURE_CODE,
        };
        let client = self.client()?;
        match vaultrs::api::exec_with_result(client.as_ref(), request).await {
            Ok(response) => Ok(response
                .batch_results
                .into_iter()
                .map(sealed_item)
                .collect()),
            Err(err) => spread(err, count),
        }
    }
}
