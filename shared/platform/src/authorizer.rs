//! Permission checks for the standard stack: the authz service decides, a local cache
//! remembers, and the authz change feed keeps the cache exact.
//!
//! A cached decision is used only while the feed is connected: every change to a tenant's
//! roles or bindings drops that tenant's decisions, a reset drops all, and while the feed
//! is down every check goes to authz (and fails closed with UNAVAILABLE when authz cannot
//! answer). A decision fetched while a change was being applied is not cached (a
//! generation counter tells), so a revocation cannot be undone by a racing lookup.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use penny_proto::authz::v1 as pb;
use penny_proto::authz::v1::authz_service_client::AuthzServiceClient;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::credential::ServiceCredential;
use crate::error::{ApiError, Reason};
use crate::principal::{Principal, PrincipalKind};

/// Most decisions cached at once; past it the cache starts over.
const MAX_CACHED_DECISIONS: usize = 100_000;

/// How long to wait before reconnecting a broken change feed.
const RECONNECT_DELAY: Duration = Duration::from_millis(250);

type SubjectKey = (PrincipalKind, String, &'static str);

#[derive(Default)]
struct Decisions {
    tenants: HashMap<Uuid, HashMap<SubjectKey, bool>>,
}

struct Shared {
    decisions: RwLock<Decisions>,
    /// Bumped by every invalidation.
    generation: AtomicU64,
    /// The newest feed revision seen: an answer from a replica behind it is not cached.
    feed_revision: AtomicU64,
    /// Whether the change feed is connected (cached decisions are trusted only then).
    live: AtomicBool,
    stopped: AtomicBool,
}

impl Shared {
    fn invalidate_tenant(&self, tenant: Uuid) {
        if let Ok(mut decisions) = self.decisions.write() {
            decisions.tenants.remove(&tenant);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn invalidate_all(&self) {
        if let Ok(mut decisions) = self.decisions.write() {
            decisions.tenants.clear();
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// Asks authz whether a principal holds a permission. Cheap to clone.
#[derive(Clone)]
pub struct Authorizer {
    client: AuthzServiceClient<Channel>,
    credential: ServiceCredential,
    shared: Arc<Shared>,
    _feed: Arc<FeedGuard>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("live", &self.shared.live.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

struct FeedGuard(Arc<Shared>);

impl Drop for FeedGuard {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Release);
    }
}

impl Authorizer {
    /// Checks through the authz service at `channel`, calling it with `credential`.
    /// Starts following the change feed; it stops when the last clone is dropped.
    pub fn new(channel: Channel, credential: ServiceCredential) -> Self {
        let shared = Arc::new(Shared {
            decisions: RwLock::new(Decisions::default()),
            generation: AtomicU64::new(0),
            feed_revision: AtomicU64::new(0),
            live: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        });
        let client = AuthzServiceClient::new(channel);
        tokio::spawn(follow(client.clone(), credential.clone(), shared.clone()));
        Self {
            client,
            credential,
            shared: shared.clone(),
            _feed: Arc::new(FeedGuard(shared)),
        }
    }

    /// A client of the authz service this authorizer asks, for services that also manage
    /// roles (tenants binding a new tenant's owner).
    pub fn authz_client(&self) -> AuthzServiceClient<Channel> {
        self.client.clone()
    }

    /// `message` as a request carrying this service's own token, for calls a service makes
    /// on its own behalf rather than its caller's.
    /// UNAVAILABLE when the service has no usable credential.
    pub async fn service_request<T>(&self, message: T) -> Result<tonic::Request<T>, ApiError> {
        self.credential.request(message).await
    }

    /// This service's own credential, for the platform's other streams to auth.
    pub(crate) fn credential(&self) -> ServiceCredential {
        self.credential.clone()
    }

    /// Whether `principal` holds `permission` in its own tenant.
    pub async fn allows(
        &self,
        principal: &Principal,
        permission: &'static str,
    ) -> Result<bool, ApiError> {
        let key: SubjectKey = (principal.kind, principal.id.clone(), permission);
        let tenant = principal.tenant_id;
        let live = self.shared.live.load(Ordering::Acquire);
        if live
            && let Ok(decisions) = self.shared.decisions.read()
            && let Some(allowed) = decisions.tenants.get(&tenant).and_then(|t| t.get(&key))
        {
            return Ok(*allowed);
        }
        let generation = self.shared.generation.load(Ordering::Acquire);
        let seen = self.shared.feed_revision.load(Ordering::Acquire);
        let request = pb::CheckRequest {
            tenant_id: tenant.to_string(),
            subject: Some(pb::Subject {
                kind: principal.kind.proto() as i32,
                id: principal.id.clone(),
                tenant_id: tenant.to_string(),
            }),
            permission: permission.to_owned(),
            workspace_id: String::new(),
            // Never an answer from before a change this authorizer already heard of.
            min_revision: seen,
        };
        let reply = self
            .client
            .clone()
            .check(self.credential.request(request).await?)
            .await
            .map_err(|status| {
                tracing::warn!(code = ?status.code(), "authz unreachable; refusing");
                ApiError::unavailable(
                    Reason::DependencyUnavailable,
                    "authorization is unavailable; retry later",
                    Duration::from_secs(1),
                )
            })?
            .into_inner();
        // Cache only an answer that nothing has invalidated since it was asked for, from a
        // replica that had applied every change the feed had announced by then.
        if self.shared.live.load(Ordering::Acquire)
            && reply.revision >= seen
            && self.shared.generation.load(Ordering::Acquire) == generation
            && let Ok(mut decisions) = self.shared.decisions.write()
        {
            let entries: usize = decisions.tenants.values().map(HashMap::len).sum();
            if entries >= MAX_CACHED_DECISIONS {
                decisions.tenants.clear();
            }
            decisions
                .tenants
                .entry(tenant)
                .or_default()
                .insert(key, reply.allowed);
        }
        Ok(reply.allowed)
    }
}

/// Follows the authz change feed for as long as the authorizer lives.
async fn follow(
    mut client: AuthzServiceClient<Channel>,
    credential: ServiceCredential,
    shared: Arc<Shared>,
) {
    while !shared.stopped.load(Ordering::Acquire) {
        let stream = match credential
            .request(pb::WatchChangesRequest { after_revision: 0 })
            .await
        {
            Ok(request) => client.watch_changes(request).await,
            Err(_) => Err(tonic::Status::unavailable("no service credential")),
        };
        match stream {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    if shared.stopped.load(Ordering::Acquire) {
                        return;
                    }
                    match tokio::time::timeout(Duration::from_secs(15), stream.message()).await {
                        Ok(Ok(Some(message))) => {
                            shared
                                .feed_revision
                                .fetch_max(message.revision, Ordering::AcqRel);
                            if message.reset {
                                shared.invalidate_all();
                                shared.live.store(true, Ordering::Release);
                            }
                            for change in &message.changes {
                                match Uuid::try_parse(&change.tenant_id) {
                                    Ok(tenant) => shared.invalidate_tenant(tenant),
                                    Err(_) => shared.invalidate_all(),
                                }
                            }
                        }
                        // Ended, failed, or silent past three heartbeats: stop trusting.
                        _ => break,
                    }
                }
            }
            Err(status) => tracing::debug!(code = ?status.code(), "authz change feed unavailable"),
        }
        shared.live.store(false, Ordering::Release);
        shared.invalidate_all();
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}
