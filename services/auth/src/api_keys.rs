//! API keys: `pk_live_` secrets stored only as SHA-256, each key a principal of its tenant
//! whose roles authz binds (granted as the creator, so no key is wider than its creator).
//!
//! Services resolve a presented secret with `ValidateApiKey` and cache the answer; a
//! revoked key reaches their verifiers on the revocation stream. When a key was last used
//! is collected in memory and written in batches, never once per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use penny_platform::stack::{CallerCredential, tenant_scope};
use penny_platform::{ApiError, Principal, Reason};
use penny_proto::authz::v1 as authz_pb;
use penny_proto::common::v1::PrincipalKind as PbKind;
use time::OffsetDateTime;
use tonic::Code;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::AuthError;
use crate::service::{Auth, token_hash};
use crate::store::{ApiKeyRecord, Store};

/// Every API key secret starts with this.
pub const SECRET_PREFIX: &str = "pk_live_";
/// Characters of the secret after the prefix (base64url of 32 bytes, unpadded).
const SECRET_BODY_LEN: usize = 43;
/// How many characters of the secret the visible prefix shows after `pk_live_`.
const VISIBLE_CHARS: usize = 8;
/// How often last-use times are written.
pub const LAST_USED_FLUSH: Duration = Duration::from_secs(30);

/// A fresh secret: `pk_live_` and base64url of 32 random bytes.
pub fn generate_secret() -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::fill(&mut bytes[..]);
    Zeroizing::new(format!(
        "{SECRET_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(&bytes[..])
    ))
}

/// Whether `secret` has the shape of an API key secret (checked before any lookup).
pub fn well_formed(secret: &str) -> bool {
    secret.strip_prefix(SECRET_PREFIX).is_some_and(|body| {
        body.len() == SECRET_BODY_LEN
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// What `CreateApiKey` asks for.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    /// The tenant.
    pub tenant: Uuid,
    /// Display name.
    pub name: String,
    /// Roles to bind at tenant scope.
    pub roles: Vec<String>,
    /// Optional expiry.
    pub expires_at: Option<OffsetDateTime>,
}

/// Last-use times waiting to be written.
#[derive(Debug, Default, Clone)]
pub struct LastUsed {
    pending: Arc<Mutex<HashMap<(Uuid, Uuid), OffsetDateTime>>>,
}

impl LastUsed {
    fn record(&self, tenant: Uuid, id: Uuid, at: OffsetDateTime) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert((tenant, id), at);
        }
    }

    /// Writes what has collected; what fails to write is kept for the next round.
    pub async fn flush(&self, store: &Store) {
        let batch: Vec<_> = match self.pending.lock() {
            Ok(mut pending) => pending.drain().map(|((t, i), at)| (t, i, at)).collect(),
            Err(_) => return,
        };
        if batch.is_empty() {
            return;
        }
        if let Err(err) = store.touch_api_keys(&batch).await {
            tracing::warn!(error = %err, keys = batch.len(), "could not record API key use; retrying later");
            if let Ok(mut pending) = self.pending.lock() {
                for (tenant, id, at) in batch {
                    pending.entry((tenant, id)).or_insert(at);
                }
            }
        }
    }
}

fn subject(key: Uuid, tenant: Uuid) -> authz_pb::Subject {
    authz_pb::Subject {
        kind: PbKind::ApiKey as i32,
        id: key.to_string(),
        tenant_id: tenant.to_string(),
    }
}

impl Auth {
    /// Creates a key and returns it with its secret (shown once). Each role is bound by
    /// authz *as the caller*, so authz's no-escalation rule judges the creator; if any
    /// grant is refused, nothing of the key remains.
    pub async fn create_api_key(
        &self,
        caller: &Principal,
        credential: &CallerCredential,
        new: NewApiKey,
    ) -> Result<(ApiKeyRecord, Zeroizing<String>), AuthError> {
        tenant_scope(caller, new.tenant)?;
        let secret = generate_secret();
        let key = ApiKeyRecord {
            id: Uuid::now_v7(),
            tenant_id: new.tenant,
            name: new.name,
            prefix: secret[..SECRET_PREFIX.len() + VISIBLE_CHARS].to_owned(),
            secret_hash: token_hash(&secret),
            roles: new.roles,
            creator_id: caller.id.clone(),
            created_at: OffsetDateTime::now_utc(),
            expires_at: new.expires_at,
            last_used_at: None,
            revoked_at: None,
        };
        self.store.insert_api_key(&key).await?;
        let mut authz = self.authorizer.authz_client();
        let mut granted = Vec::new();
        for role in &key.roles {
            let request = credential.request(authz_pb::GrantRoleRequest {
                tenant_id: key.tenant_id.to_string(),
                subject: Some(subject(key.id, key.tenant_id)),
                role: role.clone(),
                workspace_id: String::new(),
            });
            match authz.grant_role(request).await {
                Ok(_) => granted.push(role.clone()),
                Err(status) => {
                    self.unbind(key.id, key.tenant_id, &granted).await;
                    self.store.delete_api_key(key.tenant_id, key.id).await?;
                    return Err(if penny_platform::error::is_transient(&status) {
                        AuthError::Dependency("authz")
                    } else {
                        ApiError::relayed(&status).into()
                    });
                }
            }
        }
        Ok((key, secret))
    }

    /// Removes a key's bindings with this service's own token. Best effort: a revoked or
    /// never-usable key cannot authenticate, so a binding left behind grants nothing.
    async fn unbind(&self, key: Uuid, tenant: Uuid, roles: &[String]) {
        let mut authz = self.authorizer.authz_client();
        for role in roles {
            let Ok(request) = self
                .authorizer
                .service_request(authz_pb::RevokeRoleRequest {
                    tenant_id: tenant.to_string(),
                    subject: Some(subject(key, tenant)),
                    role: role.clone(),
                    workspace_id: String::new(),
                })
                .await
            else {
                continue;
            };
            match authz.revoke_role(request).await {
                Ok(_) => {}
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => {
                    tracing::warn!(code = ?status.code(), key = %key, "an API key binding could not be removed");
                }
            }
        }
    }

    /// A page of the tenant's keys, newest first.
    pub async fn list_api_keys(
        &self,
        caller: &Principal,
        tenant: Uuid,
        after: Option<Uuid>,
        limit: u64,
        show_inactive: bool,
    ) -> Result<Vec<ApiKeyRecord>, AuthError> {
        tenant_scope(caller, tenant)?;
        let active_at = (!show_inactive).then(OffsetDateTime::now_utc);
        Ok(self
            .store
            .list_api_keys(tenant, after, limit, active_at)
            .await?)
    }

    /// Revokes a key: every service refuses it within the revocation stream's delay.
    /// Idempotent.
    pub async fn revoke_api_key(
        &self,
        caller: &Principal,
        tenant: Uuid,
        id: Uuid,
    ) -> Result<ApiKeyRecord, AuthError> {
        tenant_scope(caller, tenant)?;
        let key = self
            .store
            .revoke_api_key(tenant, id, OffsetDateTime::now_utc())
            .await?
            .ok_or_else(|| ApiError::not_found(Reason::NotFound, "API key not found"))?;
        self.unbind(key.id, key.tenant_id, &key.roles).await;
        Ok(key)
    }

    /// Resolves a presented secret to its active key, or refuses it (unknown, revoked and
    /// expired alike).
    pub async fn validate_api_key(&self, secret: &str) -> Result<ApiKeyRecord, AuthError> {
        if !well_formed(secret) {
            return Err(AuthError::ApiKeyInvalid);
        }
        let now = OffsetDateTime::now_utc();
        let key = self
            .store
            .api_key_by_hash(&token_hash(secret))
            .await?
            .filter(|key| key.active(now))
            .ok_or(AuthError::ApiKeyInvalid)?;
        // A key acts for its tenant: none once the tenant is gone or not active.
        let tenant_active = self
            .tenant(key.tenant_id)
            .await?
            .is_some_and(|t| t.state == penny_proto::tenants::v1::TenantState::Active as i32);
        if !tenant_active {
            return Err(AuthError::ApiKeyInvalid);
        }
        self.last_used.record(key.tenant_id, key.id, now);
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_have_their_documented_shape() {
        let secret = generate_secret();
        assert!(well_formed(&secret), "{}", secret.as_str());
        assert_eq!(secret.len(), SECRET_PREFIX.len() + SECRET_BODY_LEN);
        for bad in [
            "",
            "pk_live_",
            "pk_test_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "pk_live_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "pk_live_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "pk_live_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/",
        ] {
            assert!(!well_formed(bad), "{bad}");
        }
    }
}
