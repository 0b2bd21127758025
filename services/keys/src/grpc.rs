//! The gRPC face of the keys service: decode, validate, call the domain, map errors. Thin.

use penny_platform::page::{decode_page_token, encode_page_token, page_token_error};
use penny_platform::validate::{Violations, page_size};
use penny_platform::wire::timestamp;
use penny_platform::{AccessPolicy, ApiError, Requirement, ServeConfig, ServiceBundle};
use penny_proto::keys::v1 as pb;
use penny_proto::keys::v1::key_service_server::{KeyService, KeyServiceServer};
use tonic::{Request, Response, Status};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::SERVICE_NAME;
use crate::domain::context::{MAX_OBJECT_ID_LEN, MAX_PURPOSE_LEN};
use crate::domain::{
    BackendKind, EncryptionContext, KeyConfigChange, KeyInfo, Keys, MAX_BATCH_ITEMS,
    MAX_CIPHERTEXT_CHARS, MAX_PLAINTEXT_BYTES, TenantId,
};
use crate::error::batch_item_error;

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

/// Who may call what. Listing every tenant's key, rotation, configuration and deletion are
/// for platform staff; the rest for the fleet's services (and staff). Anything not listed
/// is refused.
pub(crate) fn policy() -> AccessPolicy {
    use Requirement::{PlatformAdmin, ServiceOrAdmin};
    [
        ("CreateKey", ServiceOrAdmin),
        ("GetKey", ServiceOrAdmin),
        ("GenerateDataKey", ServiceOrAdmin),
        ("Encrypt", ServiceOrAdmin),
        ("Decrypt", ServiceOrAdmin),
        ("Rewrap", ServiceOrAdmin),
        ("ListKeys", PlatformAdmin),
        ("RotateKey", PlatformAdmin),
        ("UpdateKeyConfig", PlatformAdmin),
        ("DeleteKey", PlatformAdmin),
    ]
    .into_iter()
    .fold(AccessPolicy::new(), |policy, (method, requirement)| {
        policy.rpc(SERVICE_NAME, method, requirement)
    })
}

pub(crate) fn bundle(keys: Keys, serve_config: &ServeConfig) -> ServiceBundle {
    let probe_keys = keys.clone();
    let server = KeyServiceServer::new(KeyGrpc {
        keys,
        audit: serve_config.audit.clone(),
    })
    .max_decoding_message_size(serve_config.max_message_bytes)
    .max_encoding_message_size(serve_config.max_message_bytes);
    ServiceBundle {
        name: "keys",
        routes: tonic::service::Routes::new(server),
        grpc_services: vec![SERVICE_NAME],
        policy: policy(),
        descriptors: vec![penny_proto::FILE_DESCRIPTOR_SET],
        readiness: std::sync::Arc::new(move || {
            let keys = probe_keys.clone();
            Box::pin(async move { keys.ready().await })
        }),
    }
}

struct KeyGrpc {
    keys: Keys,
    /// Where rotations and deletions are audited before they are done.
    audit: Option<penny_platform::AuditClient>,
}

impl KeyGrpc {
    /// Stores the attempt of a security-critical call on `tenant`'s key.
    async fn critical(
        &self,
        principal: &penny_platform::Principal,
        tenant: Uuid,
        method: &str,
    ) -> Result<penny_platform::CriticalAction, ApiError> {
        penny_platform::CriticalAction::begin(
            self.audit.as_ref(),
            "keys",
            method,
            principal,
            tenant,
            ("key", tenant.to_string()),
            &[],
        )
        .await
    }
}

fn key_to_pb(info: KeyInfo) -> pb::Key {
    pb::Key {
        tenant_id: info.tenant_id.to_string(),
        name: info.tenant_id.key_name(),
        latest_version: info.latest_version,
        min_decryption_version: info.min_decryption_version,
        min_encryption_version: info.min_encryption_version,
        versions: info
            .versions
            .into_iter()
            .map(|v| pb::KeyVersion {
                version: v.version,
                create_time: Some(timestamp(v.created_at)),
            })
            .collect(),
        backend: match info.backend {
            BackendKind::Local => pb::KeyBackend::Local,
            BackendKind::Vault => pb::KeyBackend::Vault,
        } as i32,
        deletion_allowed: info.deletion_allowed,
        create_time: Some(timestamp(info.created_at)),
    }
}

/// Validates a context (recording violations under `field`) and binds it to the tenant.
fn context(
    violations: &mut Violations,
    field: &str,
    tenant: TenantId,
    context: Option<&pb::EncryptionContext>,
) -> EncryptionContext {
    let Some(context) = context else {
        violations.add(field, "required: every operation is bound to a context");
        return EncryptionContext {
            tenant_id: tenant,
            purpose: String::new(),
            object_id: String::new(),
        };
    };
    violations.token(
        &format!("{field}.purpose"),
        &context.purpose,
        MAX_PURPOSE_LEN,
    );
    let object_field = format!("{field}.object_id");
    if context.object_id.is_empty() {
        violations.add(object_field, "required");
    } else if context.object_id.len() > MAX_OBJECT_ID_LEN {
        violations.add(
            object_field,
            format!("must be at most {MAX_OBJECT_ID_LEN} bytes"),
        );
    } else if context.object_id.chars().any(char::is_control) {
        violations.add(object_field, "must not contain control characters");
    }
    EncryptionContext {
        tenant_id: tenant,
        purpose: context.purpose.clone(),
        object_id: context.object_id.clone(),
    }
}

fn tenant(violations: &mut Violations, value: &str) -> TenantId {
    TenantId(violations.uuid("tenant_id", value))
}

fn ciphertext_items(
    violations: &mut Violations,
    tenant_id: TenantId,
    items: Vec<(String, Option<pb::EncryptionContext>)>,
) -> Vec<(String, EncryptionContext)> {
    violations.count("items", items.len(), 1, MAX_BATCH_ITEMS);
    if items.len() > MAX_BATCH_ITEMS {
        return Vec::new();
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, (ciphertext, ctx))| {
            if ciphertext.is_empty() {
                violations.add(format!("items[{i}].ciphertext"), "required");
            } else if ciphertext.len() > MAX_CIPHERTEXT_CHARS {
                violations.add(
                    format!("items[{i}].ciphertext"),
                    format!("must be at most {MAX_CIPHERTEXT_CHARS} characters"),
                );
            }
            let ctx = context(
                violations,
                &format!("items[{i}].context"),
                tenant_id,
                ctx.as_ref(),
            );
            (ciphertext, ctx)
        })
        .collect()
}

/// Keys are listed by tenant id: the token carries the last one.
fn decode_tenant_token(token: &str) -> Result<Option<TenantId>, ApiError> {
    decode_page_token(token)?
        .map(|text| {
            Uuid::try_parse(&text)
                .map(TenantId)
                .map_err(|_| page_token_error())
        })
        .transpose()
}

#[tonic::async_trait]
impl KeyService for KeyGrpc {
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = tenant(&mut v, &request.tenant_id);
        v.finish()?;
        let (info, created) = self.keys.create_key(tenant).await?;
        Ok(Response::new(pb::CreateKeyResponse {
            key: Some(key_to_pb(info)),
            created,
        }))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::GetKeyResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = tenant(&mut v, &request.tenant_id);
        v.finish()?;
        let info = self.keys.get_key(tenant).await?;
        Ok(Response::new(pb::GetKeyResponse {
            key: Some(key_to_pb(info)),
        }))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::new();
        let size = page_size(&mut v, request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE);
        v.finish()?;
        let after = decode_tenant_token(&request.page_token)?;
        // One more than asked tells whether another page exists.
        let mut keys = self.keys.list_keys(after, size + 1).await?;
        let next_page_token = if keys.len() > size as usize {
            keys.truncate(size as usize);
            keys.last()
                .map(|k| encode_page_token(&k.tenant_id.0.to_string()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListKeysResponse {
            keys: keys.into_iter().map(key_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let principal = penny_platform::stack::caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = tenant(&mut v, &request.tenant_id);
        v.finish()?;
        // Security-critical: audited before it is done, or not done.
        let audited = self
            .critical(&principal, tenant.0, "/penny.keys.v1.KeyService/RotateKey")
            .await?;
        let rotated = self.keys.rotate_key(tenant).await.map_err(Status::from);
        audited.finish(
            &rotated,
            &rotated
                .as_ref()
                .map(|info| vec![("version", info.latest_version.to_string())])
                .unwrap_or_default(),
        );
        let info = rotated?;
        tracing::info!(tenant = %tenant, version = info.latest_version, "key rotated");
        Ok(Response::new(pb::RotateKeyResponse {
            key: Some(key_to_pb(info)),
        }))
    }

    async fn update_key_config(
        &self,
        request: Request<pb::UpdateKeyConfigRequest>,
    ) -> Result<Response<pb::UpdateKeyConfigResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = tenant(&mut v, &request.tenant_id);
        if request.min_decryption_version.is_none() && request.deletion_allowed.is_none() {
            v.add(
                "min_decryption_version",
                "set min_decryption_version, deletion_allowed, or both",
            );
        }
        if request.min_decryption_version == Some(0) {
            v.add("min_decryption_version", "must be at least 1");
        }
        v.finish()?;
        let info = self
            .keys
            .update_key_config(
                tenant,
                KeyConfigChange {
                    min_decryption_version: request.min_decryption_version,
                    deletion_allowed: request.deletion_allowed,
                },
            )
            .await?;
        tracing::info!(
            tenant = %tenant,
            min_decryption_version = info.min_decryption_version,
            deletion_allowed = info.deletion_allowed,
            "key configuration changed"
        );
        Ok(Response::new(pb::UpdateKeyConfigResponse {
            key: Some(key_to_pb(info)),
        }))
    }

    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = tenant(&mut v, &request.tenant_id);
        let ctx = context(&mut v, "context", tenant, request.context.as_ref());
        let bits = match request.key_bits {
            0 => 256,
            bits @ (128 | 256 | 512) => bits,
            _ => {
                v.add("key_bits", "must be 128, 256 or 512 (0 means 256)");
                256
            }
        };
        v.finish()?;
        let key = self.keys.generate_data_key(&ctx, bits).await?;
        Ok(Response::new(pb::GenerateDataKeyResponse {
            plaintext_key: key.plaintext.to_vec(),
            wrapped_key: key.wrapped,
            key_version: key.version,
        }))
    }

    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = tenant(&mut v, &request.tenant_id);
        v.count("items", request.items.len(), 1, MAX_BATCH_ITEMS);
        let mut items = Vec::new();
        if request.items.len() <= MAX_BATCH_ITEMS {
            for (i, item) in request.items.into_iter().enumerate() {
                if item.plaintext.len() > MAX_PLAINTEXT_BYTES {
                    v.add(
                        format!("items[{i}].plaintext"),
                        format!("must be at most {MAX_PLAINTEXT_BYTES} bytes"),
                    );
                }
                let ctx = context(
                    &mut v,
                    &format!("items[{i}].context"),
                    tenant,
                    item.context.as_ref(),
                );
                items.push((Zeroizing::new(item.plaintext), ctx));
            }
        }
        v.finish()?;
        let results = self.keys.encrypt(tenant, items).await?;
        Ok(Response::new(pb::EncryptResponse {
            results: results
                .into_iter()
                .map(|result| match result {
                    Ok(sealed) => pb::EncryptResult {
                        result: Some(pb::encrypt_result::Result::Ciphertext(sealed.ciphertext)),
                        key_version: sealed.version,
                    },
                    Err(err) => pb::EncryptResult {
                        result: Some(pb::encrypt_result::Result::Error(batch_item_error(&err))),
                        key_version: 0,
                    },
                })
                .collect(),
        }))
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = tenant(&mut v, &request.tenant_id);
        let items = ciphertext_items(
            &mut v,
            tenant,
            request
                .items
                .into_iter()
                .map(|item| (item.ciphertext, item.context))
                .collect(),
        );
        v.finish()?;
        let results = self.keys.decrypt(tenant, items).await?;
        Ok(Response::new(pb::DecryptResponse {
            results: results
                .into_iter()
                .map(|result| pb::DecryptResult {
                    result: Some(match result {
                        Ok(plaintext) => pb::decrypt_result::Result::Plaintext(plaintext.to_vec()),
                        Err(err) => pb::decrypt_result::Result::Error(batch_item_error(&err)),
                    }),
                })
                .collect(),
        }))
    }

    async fn rewrap(
        &self,
        request: Request<pb::RewrapRequest>,
    ) -> Result<Response<pb::RewrapResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = tenant(&mut v, &request.tenant_id);
        let items = ciphertext_items(
            &mut v,
            tenant,
            request
                .items
                .into_iter()
                .map(|item| (item.ciphertext, item.context))
                .collect(),
        );
        v.finish()?;
        let results = self.keys.rewrap(tenant, items).await?;
        Ok(Response::new(pb::RewrapResponse {
            results: results
                .into_iter()
                .map(|result| match result {
                    Ok(sealed) => pb::RewrapResult {
                        result: Some(pb::rewrap_result::Result::Ciphertext(sealed.ciphertext)),
                        key_version: sealed.version,
                    },
                    Err(err) => pb::RewrapResult {
                        result: Some(pb::rewrap_result::Result::Error(batch_item_error(&err))),
                        key_version: 0,
                    },
                })
                .collect(),
        }))
    }

    async fn delete_key(
        &self,
        request: Request<pb::DeleteKeyRequest>,
    ) -> Result<Response<pb::DeleteKeyResponse>, Status> {
        let principal = penny_platform::stack::caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = tenant(&mut v, &request.tenant_id);
        v.finish()?;
        let audited = self
            .critical(&principal, tenant.0, "/penny.keys.v1.KeyService/DeleteKey")
            .await?;
        let deleted = self.keys.delete_key(tenant).await.map_err(Status::from);
        audited.finish(&deleted, &[]);
        deleted?;
        tracing::warn!(tenant = %tenant, "tenant key deleted: its data is crypto-shredded");
        Ok(Response::new(pb::DeleteKeyResponse {}))
    }
}
