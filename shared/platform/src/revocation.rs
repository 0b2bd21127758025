//! Revoked credentials, followed from the auth service's `WatchRevocations` stream.
//!
//! A verifier that follows revocations keeps the set of revoked sessions, API keys, users
//! (every token issued up to the revocation) and service clients in memory, so a revoked
//! credential is refused by every service without a call per request. The stream starts
//! with a snapshot, then delivers each revocation as auth commits it, with a heartbeat at
//! least every 5 s; a follower that reconnects resumes from its last cursor.
//!
//! Fail closed: until the first snapshot has arrived, and whenever the stream has been
//! silent for [`STALE_AFTER`], user and API key credentials are refused with UNAVAILABLE
//! (revocation state unknown). Service tokens are still judged against the last known set:
//! the fleet's services need them to reach auth itself, so gating them could never recover.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, Weak};
use std::time::Duration;

use penny_proto::auth::v1 as pb;
use penny_proto::auth::v1::auth_service_client::AuthServiceClient;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::principal::{
    Jwk, Jwks, LEEWAY_SECS, Principal, PrincipalKind, TokenVerifier, VerifierInner, now_secs,
};

/// How often auth's JWKS is fetched (a key is published well before it signs).
pub const JWKS_REFRESH: Duration = Duration::from_secs(60);
/// The least time between two JWKS fetches, however often an unknown `kid` asks.
const JWKS_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// A stream silent this long (three heartbeats) no longer vouches for anything.
pub const STALE_AFTER: Duration = Duration::from_secs(15);
/// How long to wait before reconnecting a broken stream.
const RECONNECT_DELAY: Duration = Duration::from_millis(250);

/// What the follower knows, shared with the verifier.
#[derive(Debug, Default)]
pub(crate) struct RevocationState {
    set: RwLock<RevocationSet>,
    caught_up: AtomicBool,
    last_heard: AtomicU64,
}

/// Revoked ids by tenant, each with the time after which it can be forgotten (`u64::MAX`:
/// never). Keyed by tenant too, so a revocation announced in one tenant can never refuse a
/// principal of another.
#[derive(Debug, Default)]
struct RevocationSet {
    sessions: HashMap<(Uuid, String), u64>,
    api_keys: HashMap<(Uuid, String), u64>,
    /// (tenant, user id) → (revoked at, forget after): tokens issued at or before are refused.
    users: HashMap<(Uuid, String), (u64, u64)>,
    /// (tenant, service client id) → (revoked at, forget after).
    clients: HashMap<(Uuid, String), (u64, u64)>,
}

/// Why [`RevocationState::check`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The credential is revoked.
    Revoked,
    /// The follower has not caught up, or the stream went silent.
    Unknown,
}

impl RevocationState {
    /// Whether the state vouches for the present: caught up and heard from recently.
    pub(crate) fn fresh(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
            && now_secs().saturating_sub(self.last_heard.load(Ordering::Acquire))
                <= STALE_AFTER.as_secs()
    }

    /// Refuses a revoked credential, or any user or API key credential while the state is
    /// not fresh. `issued_at` is the token's `iat`.
    pub(crate) fn check(&self, principal: &Principal, issued_at: u64) -> Result<(), Refusal> {
        if principal.kind != PrincipalKind::Service && !self.fresh() {
            return Err(Refusal::Unknown);
        }
        let Ok(set) = self.set.read() else {
            return Err(Refusal::Unknown);
        };
        let tenant = principal.tenant_id;
        let key = (tenant, principal.id.clone());
        let revoked = match principal.kind {
            PrincipalKind::User => {
                principal
                    .session_id
                    .as_ref()
                    .is_some_and(|sid| set.sessions.contains_key(&(tenant, sid.clone())))
                    || set.users.get(&key).is_some_and(|(at, _)| issued_at <= *at)
            }
            PrincipalKind::ApiKey => set.api_keys.contains_key(&key),
            PrincipalKind::Service => set
                .clients
                .get(&key)
                .is_some_and(|(at, _)| issued_at <= *at),
        };
        if revoked {
            Err(Refusal::Revoked)
        } else {
            Ok(())
        }
    }

    fn apply(&self, message: &pb::WatchRevocationsResponse) {
        let now = now_secs();
        if message.reset {
            // Everything known is discarded: nothing is vouched for until the snapshot that
            // follows is complete.
            self.caught_up.store(false, Ordering::Release);
        }
        if let Ok(mut set) = self.set.write() {
            if message.reset {
                *set = RevocationSet::default();
            }
            for revocation in &message.revocations {
                let at = revocation
                    .revoke_time
                    .as_ref()
                    .and_then(|t| u64::try_from(t.seconds).ok())
                    .unwrap_or(now);
                let forget_after = revocation
                    .expire_time
                    .as_ref()
                    .and_then(|t| u64::try_from(t.seconds).ok())
                    .map_or(u64::MAX, |t| t.saturating_add(LEEWAY_SECS));
                let Ok(tenant) = Uuid::try_parse(&revocation.tenant_id) else {
                    tracing::warn!("a revocation without a valid tenant ignored");
                    continue;
                };
                let id = (tenant, revocation.id.clone());
                match pb::RevocationKind::try_from(revocation.kind) {
                    Ok(pb::RevocationKind::Session) => {
                        set.sessions.insert(id, forget_after);
                    }
                    Ok(pb::RevocationKind::ApiKey) => {
                        set.api_keys.insert(id, forget_after);
                    }
                    Ok(pb::RevocationKind::User) => {
                        let entry = set.users.entry(id).or_insert((at, forget_after));
                        *entry = (entry.0.max(at), entry.1.max(forget_after));
                    }
                    Ok(pb::RevocationKind::ServiceClient) => {
                        let entry = set.clients.entry(id).or_insert((at, forget_after));
                        *entry = (entry.0.max(at), entry.1.max(forget_after));
                    }
                    Ok(pb::RevocationKind::Unspecified) | Err(_) => {
                        tracing::warn!(kind = revocation.kind, "unknown revocation kind ignored");
                    }
                }
            }
            set.sessions.retain(|_, forget| *forget >= now);
            set.api_keys.retain(|_, forget| *forget >= now);
            set.users.retain(|_, (_, forget)| *forget >= now);
            set.clients.retain(|_, (_, forget)| *forget >= now);
        }
        if message.caught_up {
            self.caught_up.store(true, Ordering::Release);
        }
        self.last_heard.store(now, Ordering::Release);
    }

    /// How many revocations are held (for tests and metrics).
    pub(crate) fn len(&self) -> usize {
        self.set.read().map_or(0, |set| {
            set.sessions.len() + set.api_keys.len() + set.users.len() + set.clients.len()
        })
    }
}

/// Follows the stream for as long as the verifier that owns `state` lives.
pub(crate) async fn follow(
    state: Weak<RevocationState>,
    channel: Channel,
    credential: crate::credential::ServiceCredential,
) {
    let mut client = AuthServiceClient::new(channel);
    let mut resume_token = String::new();
    loop {
        if state.strong_count() == 0 {
            return;
        }
        let stream = match credential
            .request(pb::WatchRevocationsRequest {
                resume_token: resume_token.clone(),
            })
            .await
        {
            Ok(request) => client.watch_revocations(request).await,
            Err(_) => Err(tonic::Status::unavailable("no service credential")),
        };
        match stream {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                // Until it ends, fails, or stays silent past three heartbeats: then
                // reconnect. The state goes stale by itself if that lasts.
                while let Ok(Ok(Some(message))) =
                    tokio::time::timeout(STALE_AFTER, stream.message()).await
                {
                    let Some(state) = state.upgrade() else {
                        return;
                    };
                    state.apply(&message);
                    if !message.resume_token.is_empty() {
                        resume_token = message.resume_token;
                    }
                }
            }
            Err(status) => {
                tracing::debug!(code = ?status.code(), "revocation stream unavailable");
            }
        }
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

/// Calls that may wait for an early JWKS fetch at once; the rest are refused at once, so
/// tokens with made-up `kid`s cannot hold a server's concurrency slots.
const MAX_JWKS_WAITERS: usize = 32;

/// Coalesces requests for an early JWKS fetch.
#[derive(Debug)]
pub(crate) struct JwksSource {
    wake: tokio::sync::Notify,
    /// Bumped by every successful fetch.
    fetched: AtomicU64,
    waiters: tokio::sync::Semaphore,
}

impl Default for JwksSource {
    fn default() -> Self {
        Self {
            wake: tokio::sync::Notify::new(),
            fetched: AtomicU64::new(0),
            waiters: tokio::sync::Semaphore::new(MAX_JWKS_WAITERS),
        }
    }
}

impl JwksSource {
    /// Asks for a fetch and waits up to `limit` for one to complete; `false` at once when
    /// too many calls are waiting already.
    pub(crate) async fn refresh(&self, limit: Duration) -> bool {
        let Ok(_permit) = self.waiters.try_acquire() else {
            return false;
        };
        let before = self.fetched.load(Ordering::Acquire);
        self.wake.notify_one();
        let deadline = tokio::time::Instant::now() + limit;
        while self.fetched.load(Ordering::Acquire) == before {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// Keeps the verifier's published keys equal to auth's JWKS for as long as it lives:
/// fetched at once, every [`JWKS_REFRESH`], and early when asked (at most once per
/// [`JWKS_MIN_INTERVAL`]). GetJwks is public, so no token is needed.
pub(crate) async fn follow_jwks(
    verifier: Weak<VerifierInner>,
    source: std::sync::Arc<JwksSource>,
    channel: Channel,
) {
    let mut client = AuthServiceClient::new(channel);
    loop {
        let Some(inner) = verifier.upgrade() else {
            return;
        };
        let fetched = match client.get_jwks(pb::GetJwksRequest {}).await {
            Ok(reply) => {
                let jwks = Jwks {
                    keys: reply
                        .into_inner()
                        .keys
                        .into_iter()
                        .map(|k| Jwk {
                            kty: k.kty,
                            crv: k.crv,
                            x: k.x,
                            kid: k.kid,
                            alg: k.alg,
                            use_: k.r#use,
                        })
                        .collect(),
                };
                if jwks.keys.is_empty() {
                    // Never trade known keys for none: an empty set is a replica without
                    // keys, not a decision to trust nothing.
                    tracing::warn!("auth published an empty JWKS; keeping the last one");
                    false
                } else {
                    match TokenVerifier::from_inner(inner).replace_published_keys(&jwks) {
                        Ok(()) => true,
                        Err(err) => {
                            tracing::warn!(error = %err, "auth published an unusable JWKS; keeping the last one");
                            false
                        }
                    }
                }
            }
            Err(status) => {
                drop(inner);
                tracing::debug!(code = ?status.code(), "auth's JWKS unavailable");
                false
            }
        };
        if fetched {
            source.fetched.fetch_add(1, Ordering::AcqRel);
        }
        tokio::time::sleep(JWKS_MIN_INTERVAL).await;
        if fetched {
            tokio::select! {
                () = tokio::time::sleep(JWKS_REFRESH) => {}
                () = source.wake.notified() => {}
            }
        }
    }
}

impl TokenVerifier {
    /// Whether this verifier follows revocations and its state is fresh (always true for a
    /// verifier that does not follow them).
    pub fn revocations_fresh(&self) -> bool {
        self.revocation_state().is_none_or(RevocationState::fresh)
    }

    /// How many revoked credentials this verifier holds.
    pub fn revocation_count(&self) -> usize {
        self.revocation_state().map_or(0, RevocationState::len)
    }

    /// Waits until the revocation state is fresh, at most `limit`; whether it is.
    pub async fn wait_for_revocations(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.revocations_fresh() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, sid: &str) -> Principal {
        Principal {
            kind: PrincipalKind::User,
            id: id.into(),
            tenant_id: Uuid::nil(),
            roles: vec![],
            session_id: Some(sid.into()),
            scopes: vec![],
        }
    }

    fn revocation(kind: pb::RevocationKind, id: &str, at: u64) -> pb::Revocation {
        pb::Revocation {
            kind: kind as i32,
            id: id.into(),
            tenant_id: Uuid::nil().to_string(),
            revoke_time: Some(prost_types::Timestamp {
                seconds: i64::try_from(at).unwrap(),
                nanos: 0,
            }),
            expire_time: None,
        }
    }

    #[test]
    fn users_and_api_keys_are_refused_until_caught_up_services_are_not() {
        let state = RevocationState::default();
        assert_eq!(state.check(&user("u", "s"), 1), Err(Refusal::Unknown));
        let mut service = user("svc", "");
        service.kind = PrincipalKind::Service;
        service.session_id = None;
        assert_eq!(state.check(&service, 1), Ok(()));
        state.apply(&pb::WatchRevocationsResponse {
            caught_up: true,
            ..Default::default()
        });
        assert_eq!(state.check(&user("u", "s"), 1), Ok(()));
    }

    #[test]
    fn sessions_users_and_keys_are_refused_once_revoked() {
        let state = RevocationState::default();
        let now = now_secs();
        state.apply(&pb::WatchRevocationsResponse {
            revocations: vec![
                revocation(pb::RevocationKind::Session, "s1", now),
                revocation(pb::RevocationKind::User, "u2", now),
                revocation(pb::RevocationKind::ApiKey, "k1", now),
            ],
            caught_up: true,
            ..Default::default()
        });
        assert_eq!(state.check(&user("u1", "s1"), now), Err(Refusal::Revoked));
        assert_eq!(state.check(&user("u1", "s2"), now), Ok(()));
        // Every token of u2 issued up to the revocation, none after.
        assert_eq!(state.check(&user("u2", "s3"), now), Err(Refusal::Revoked));
        assert_eq!(state.check(&user("u2", "s3"), now + 1), Ok(()));
        let mut key = user("k1", "");
        key.kind = PrincipalKind::ApiKey;
        key.session_id = None;
        assert_eq!(state.check(&key, now), Err(Refusal::Revoked));
        // The same ids in another tenant are not revoked.
        let mut elsewhere = user("u2", "s1");
        elsewhere.tenant_id = Uuid::from_u128(7);
        assert_eq!(state.check(&elsewhere, now), Ok(()));
        // A reset forgets everything, and vouches for nothing until the snapshot is whole.
        state.apply(&pb::WatchRevocationsResponse {
            reset: true,
            ..Default::default()
        });
        assert_eq!(state.len(), 0);
        assert_eq!(state.check(&user("u1", "s1"), now), Err(Refusal::Unknown));
        state.apply(&pb::WatchRevocationsResponse {
            caught_up: true,
            ..Default::default()
        });
        assert_eq!(state.check(&user("u1", "s1"), now), Ok(()));
    }

    #[test]
    fn expired_revocations_are_forgotten() {
        let state = RevocationState::default();
        let mut old = revocation(pb::RevocationKind::Session, "s1", 10);
        old.expire_time = Some(prost_types::Timestamp {
            seconds: 20,
            nanos: 0,
        });
        state.apply(&pb::WatchRevocationsResponse {
            revocations: vec![old],
            caught_up: true,
            ..Default::default()
        });
        assert_eq!(state.len(), 0);
    }
}
