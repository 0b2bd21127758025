//! API keys presented to any service (`x-api-key: pk_live_…`), resolved through auth's
//! `ValidateApiKey` and cached.
//!
//! A resolved key is remembered by the SHA-256 of its secret for [`CACHE_TTL`], so a busy
//! key costs auth one call per server every few minutes. The cache never decides alone:
//! the key's expiry is checked on every use, and a revoked key is refused by the verifier's
//! revocation set (fed by auth's stream) the moment it is announced, cached or not.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use penny_proto::auth::v1 as pb;
use penny_proto::auth::v1::auth_service_client::AuthServiceClient;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::credential::ServiceCredential;
use crate::error::{ApiError, Reason};
use crate::principal::{Principal, PrincipalKind, now_secs};

/// The header that carries an API key.
pub const API_KEY_HEADER: &str = "x-api-key";
/// The prefix every API key secret has.
pub const API_KEY_PREFIX: &str = "pk_live_";
/// How long a resolved key is remembered.
pub const CACHE_TTL: Duration = Duration::from_secs(300);
/// Longest secret looked at.
const MAX_SECRET_LEN: usize = 128;
/// Most keys remembered before the cache starts over.
const CACHE_CAPACITY: usize = 100_000;

#[derive(Clone)]
struct Cached {
    principal: Principal,
    expires: Option<u64>,
    fetched: Instant,
}

/// Resolves API keys through auth. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct ApiKeyResolver {
    client: AuthServiceClient<Channel>,
    credential: ServiceCredential,
    cache: Arc<RwLock<HashMap<[u8; 32], Cached>>>,
}

impl std::fmt::Debug for ApiKeyResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyResolver").finish_non_exhaustive()
    }
}

fn refused() -> ApiError {
    ApiError::unauthenticated(Reason::Unauthenticated)
}

impl ApiKeyResolver {
    /// Resolves through the auth service at `auth`, calling it with `credential`.
    pub fn new(auth: Channel, credential: ServiceCredential) -> Self {
        Self {
            client: AuthServiceClient::new(auth),
            credential,
            cache: Arc::new(RwLock::new(HashMap::new())),
        }
    }

    /// The principal of an active key, or UNAUTHENTICATED (UNAVAILABLE when auth cannot
    /// answer). The secret never appears in an error or a log.
    pub async fn resolve(&self, secret: &str) -> Result<Principal, ApiError> {
        if secret.len() > MAX_SECRET_LEN || !secret.starts_with(API_KEY_PREFIX) {
            return Err(refused());
        }
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let now = now_secs();
        if let Ok(cache) = self.cache.read()
            && let Some(hit) = cache.get(&digest)
            && hit.fetched.elapsed() < CACHE_TTL
        {
            if hit.expires.is_some_and(|t| now >= t) {
                return Err(refused());
            }
            return Ok(hit.principal.clone());
        }
        let request = self
            .credential
            .request(pb::ValidateApiKeyRequest {
                secret: secret.to_owned(),
            })
            .await?;
        let reply = match self.client.clone().validate_api_key(request).await {
            Ok(reply) => reply.into_inner(),
            Err(status) if status.code() == Code::Unauthenticated => return Err(refused()),
            Err(status) => {
                tracing::warn!(code = ?status.code(), "auth could not validate an API key; refusing");
                return Err(ApiError::unavailable(
                    Reason::DependencyUnavailable,
                    "API keys cannot be validated right now; retry later",
                    Duration::from_secs(1),
                ));
            }
        };
        let principal = reply
            .principal
            .and_then(|p| {
                Some(Principal {
                    kind: PrincipalKind::ApiKey,
                    id: p.id,
                    tenant_id: Uuid::try_parse(&p.tenant_id).ok()?,
                    roles: p.roles,
                    session_id: None,
                    scopes: p.scopes,
                })
            })
            .ok_or_else(refused)?;
        let expires = reply
            .expire_time
            .and_then(|t| u64::try_from(t.seconds).ok());
        if let Ok(mut cache) = self.cache.write() {
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(
                digest,
                Cached {
                    principal: principal.clone(),
                    expires,
                    fetched: Instant::now(),
                },
            );
        }
        Ok(principal)
    }
}
