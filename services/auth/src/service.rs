//! Authentication: setting passwords and signing in.
//!
//! Users, their status and their tenant's security policy live in the tenants service;
//! auth keeps only what proves identity (password hashes, set-password tokens), lockout
//! counters and sessions. Sign-in answers every failure (no such tenant or user, wrong
//! password, locked, suspended) with the same status and message after the same work: the
//! lockout reservation and one argon2id verification always happen.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use penny_platform::access::ENROLL_SCOPE;
use penny_platform::principal::{Claims, PrincipalKind};
use penny_platform::signing::TokenGrant;
use penny_platform::{ApiError, Authorizer};
use penny_platform::{Principal, Reason};
use penny_proto::authz::v1 as authz_pb;
use penny_proto::common::v1::PrincipalKind as PbKind;
use penny_proto::keys::v1::key_service_client::KeyServiceClient;
use penny_proto::tenants::v1 as tenants_pb;
use penny_proto::tenants::v1::tenant_service_client::TenantServiceClient;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::domain::lockout::{CounterKey, LockoutPolicy, Verdict};
use crate::domain::password::{PasswordHasherPool, policy_problem};
use crate::error::AuthError;
use crate::store::{RevocationKind, SessionRecord, SessionScope, Store};

/// Access tokens live this long unless the tenant's session lifetime is shorter.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A minted set-password token lives this long unless asked otherwise.
pub const DEFAULT_RESET_TTL: Duration = Duration::from_secs(72 * 3600);
/// The longest a set-password token may live.
pub const MAX_RESET_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// The prefix of set-password tokens.
const RESET_PREFIX: &str = "pst_";

/// What `Login` carries.
#[derive(Clone)]
pub struct LoginAttempt {
    /// The tenant.
    pub tenant: Uuid,
    /// The email as typed.
    pub email: String,
    /// The password.
    pub password: zeroize::Zeroizing<String>,
    /// The end user's IP.
    pub ip: IpAddr,
    /// The end user's user agent.
    pub user_agent: String,
}

impl std::fmt::Debug for LoginAttempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password; the email and IP are personal data and stay out too.
        f.debug_struct("LoginAttempt")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

/// How a sign-in with the right password ends.
#[derive(Debug, Clone)]
pub enum SignInOutcome {
    /// Tokens for a new session.
    SignedIn(SignedIn),
    /// The user has MFA: the second step needs this challenge.
    Challenge {
        /// The single-use challenge token.
        challenge: String,
        /// When it lapses.
        expires_at: OffsetDateTime,
    },
    /// The tenant requires MFA and the user has none: a session whose token only allows
    /// enrolment.
    MustEnroll(SignedIn),
}

/// A successful sign-in.
#[derive(Debug, Clone)]
pub struct SignedIn {
    /// The session.
    pub session: SessionRecord,
    /// The signed access token.
    pub access_token: String,
}

/// The auth service.
#[derive(Clone)]
pub struct Auth {
    pub(crate) store: Store,
    hasher: PasswordHasherPool,
    tenants: TenantServiceClient<Channel>,
    pub(crate) keys: KeyServiceClient<Channel>,
    pub(crate) authorizer: Authorizer,
    /// The keys tokens are signed with.
    pub(crate) keyring: crate::keyring::KeyRing,
    /// How often the signing key is replaced.
    pub(crate) rotation: Duration,
    /// How long an issued service token lives.
    pub(crate) service_token_lifetime: Duration,
    /// Where sign-in outcomes are recorded (fail closed); `None` without an audit service.
    pub(crate) audit: Option<penny_platform::AuditClient>,
    pub(crate) last_used: crate::api_keys::LastUsed,
    pub(crate) blocks: crate::ip_blocks::BlockCache,
    /// Tenants as tenants last answered, for at most [`TENANT_CACHE_TTL`].
    tenant_cache: TenantCache,
    /// Held by the service's clones, not by its background tasks: they end when it is gone.
    lifetime: Arc<()>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").finish_non_exhaustive()
    }
}

/// How long a tenant (its state and security policy) is taken as tenants last answered:
/// a policy change or deletion binds sign-in within this.
pub const TENANT_CACHE_TTL: Duration = Duration::from_secs(1);

type CachedTenant = (std::time::Instant, Option<tenants_pb::Tenant>);

/// Tenants by id, briefly: every sign-in needs its tenant's policy, and asking tenants
/// each time costs a call per attempt.
#[derive(Debug, Clone, Default)]
struct TenantCache {
    entries: Arc<std::sync::Mutex<std::collections::HashMap<Uuid, CachedTenant>>>,
}

impl TenantCache {
    fn get(&self, tenant: Uuid) -> Option<Option<tenants_pb::Tenant>> {
        let entries = self.entries.lock().ok()?;
        let (at, found) = entries.get(&tenant)?;
        (at.elapsed() < TENANT_CACHE_TTL).then(|| found.clone())
    }

    fn put(&self, tenant: Uuid, found: Option<tenants_pb::Tenant>) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= 10_000 {
                entries.clear();
            }
            entries.insert(tenant, (std::time::Instant::now(), found));
        }
    }
}

/// The SHA-256 of a token, hex: what is stored instead of the token.
pub(crate) fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A one-time token: `prefix`, the tenant (so its lookup runs inside that tenant's row
/// level security scope), and 32 random bytes. Only its hash is stored.
pub(crate) fn new_prefixed_token(prefix: &str, tenant: Uuid) -> String {
    let mut secret = zeroize::Zeroizing::new([0u8; 32]);
    rand::fill(&mut secret[..]);
    format!(
        "{prefix}{}_{}",
        tenant.simple(),
        URL_SAFE_NO_PAD.encode(&secret[..])
    )
}

/// The tenant a set-password token belongs to.
fn reset_token_tenant(token: &str) -> Option<Uuid> {
    prefixed_token_tenant(token, RESET_PREFIX)
}

/// The tenant a token made by [`new_prefixed_token`] with `prefix` names.
pub(crate) fn prefixed_token_tenant(token: &str, prefix: &str) -> Option<Uuid> {
    let rest = token.strip_prefix(prefix)?;
    let (tenant, secret) = rest.split_once('_')?;
    if secret.len() != 43 {
        return None;
    }
    Uuid::try_parse(tenant).ok()
}

fn lockout_policy(tenant: &tenants_pb::Tenant) -> LockoutPolicy {
    let defaults = LockoutPolicy::default();
    let Some(policy) = &tenant.security_policy else {
        return defaults;
    };
    let secs = |d: Option<&prost_types::Duration>, default: Duration| {
        d.and_then(|d| u64::try_from(d.seconds).ok())
            .filter(|s| *s > 0)
            .map_or(default, Duration::from_secs)
    };
    LockoutPolicy {
        threshold: if policy.lockout_threshold == 0 {
            defaults.threshold
        } else {
            policy.lockout_threshold
        },
        window: secs(policy.lockout_window.as_ref(), defaults.window),
        duration: secs(policy.lockout_duration.as_ref(), defaults.duration),
    }
}

fn token_lifetime(tenant: &tenants_pb::Tenant) -> Duration {
    tenant
        .security_policy
        .as_ref()
        .and_then(|p| p.session_lifetime.as_ref())
        .and_then(|d| u64::try_from(d.seconds).ok())
        .filter(|s| *s > 0)
        .map_or(DEFAULT_TOKEN_LIFETIME, |s| {
            Duration::from_secs(s).min(DEFAULT_TOKEN_LIFETIME)
        })
}

pub(crate) fn dependency(service: &'static str, status: &tonic::Status) -> AuthError {
    if penny_platform::error::is_transient(status) {
        AuthError::Dependency(service)
    } else {
        AuthError::Internal(format!("{service} answered {:?}", status.code()))
    }
}

fn not_a_session() -> AuthError {
    ApiError::failed_precondition(
        Reason::FailedPrecondition,
        "only a signed-in user's session token can change its password",
    )
    .into()
}

impl Auth {
    /// The service over a migrated store.
    pub fn new(
        store: Store,
        hasher: PasswordHasherPool,
        tenants: Channel,
        keys: Channel,
        authorizer: Authorizer,
        rotation: Duration,
    ) -> Self {
        Self {
            store,
            hasher,
            tenants: TenantServiceClient::new(tenants),
            keys: KeyServiceClient::new(keys),
            authorizer,
            keyring: crate::keyring::KeyRing::default(),
            rotation,
            service_token_lifetime: crate::service_tokens::SERVICE_TOKEN_LIFETIME,
            audit: None,
            last_used: crate::api_keys::LastUsed::default(),
            blocks: crate::ip_blocks::BlockCache::default(),
            tenant_cache: TenantCache::default(),
            lifetime: Arc::new(()),
        }
    }

    /// Issues service tokens that live `lifetime` instead of
    /// [`crate::service_tokens::SERVICE_TOKEN_LIFETIME`].
    #[must_use]
    pub fn with_service_token_lifetime(mut self, lifetime: Duration) -> Self {
        self.service_token_lifetime = lifetime;
        self
    }

    /// Records every sign-in outcome in `audit`, failing the sign-in when it cannot.
    #[must_use]
    pub fn with_audit(mut self, audit: Option<penny_platform::AuditClient>) -> Self {
        self.audit = audit;
        self
    }

    /// A clone for a background task, with a handle that tells the task when the service
    /// itself (every clone but the task's) is gone.
    pub(crate) fn for_background(&self) -> (Self, std::sync::Weak<()>) {
        let mut task = self.clone();
        task.lifetime = Arc::new(());
        (task, Arc::downgrade(&self.lifetime))
    }

    /// Starts the background work: the signing key ring's upkeep, and writing API key
    /// last-use times every [`crate::api_keys::LAST_USED_FLUSH`]. Both end when the last
    /// clone of the service is gone.
    pub fn spawn_background(&self) {
        self.spawn_key_maintenance();
        let (auth, alive) = self.for_background();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::api_keys::LAST_USED_FLUSH).await;
                auth.flush_last_used().await;
                if alive.strong_count() == 0 {
                    return;
                }
            }
        });
    }

    /// Writes collected API key last-use times now (tests, shutdown).
    pub async fn flush_last_used(&self) {
        self.last_used.flush(&self.store).await;
    }

    /// Whether the database answers and a signing key is loaded.
    pub async fn ready(&self) -> bool {
        self.keyring.loaded() && penny_platform::db::ping(self.store.connection()).await
    }

    /// Whether the signing keys are loaded.
    pub fn keys_loaded(&self) -> bool {
        self.keyring.loaded()
    }

    /// The public keys that verify this service's tokens: the signing key and those about
    /// to sign or whose tokens may still be valid.
    pub fn jwks(&self) -> penny_platform::principal::Jwks {
        self.keyring.jwks()
    }

    /// The tenant, or `None` when there is no such tenant.
    pub(crate) async fn tenant(
        &self,
        tenant: Uuid,
    ) -> Result<Option<tenants_pb::Tenant>, AuthError> {
        if let Some(found) = self.tenant_cache.get(tenant) {
            return Ok(found);
        }
        let request = self
            .authorizer
            .service_request(tenants_pb::GetTenantRequest {
                tenant_id: tenant.to_string(),
            })
            .await?;
        let found = match self.tenants.clone().get_tenant(request).await {
            Ok(response) => response.into_inner().tenant,
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => return Err(dependency("tenants", &status)),
        };
        self.tenant_cache.put(tenant, found.clone());
        Ok(found)
    }

    /// The active or suspended user with this email, if any.
    async fn user_by_email(
        &self,
        tenant: Uuid,
        email: &str,
    ) -> Result<Option<tenants_pb::User>, AuthError> {
        let request = self
            .authorizer
            .service_request(tenants_pb::ListUsersRequest {
                tenant_id: tenant.to_string(),
                email: email.to_owned(),
                page_size: 1,
                ..Default::default()
            })
            .await?;
        match self.tenants.clone().list_users(request).await {
            Ok(response) => Ok(response.into_inner().users.into_iter().next()),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(dependency("tenants", &status)),
        }
    }

    /// A user by id, if any.
    async fn user(&self, tenant: Uuid, user: Uuid) -> Result<Option<tenants_pb::User>, AuthError> {
        let request = self
            .authorizer
            .service_request(tenants_pb::GetUserRequest {
                tenant_id: tenant.to_string(),
                user_id: user.to_string(),
            })
            .await?;
        match self.tenants.clone().get_user(request).await {
            Ok(response) => Ok(response.into_inner().user),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(dependency("tenants", &status)),
        }
    }

    /// The names of the roles bound to the user at tenant scope (the token's `roles`
    /// claim; authz's bindings stay the source of truth).
    async fn roles(&self, tenant: Uuid, user: Uuid) -> Result<Vec<String>, AuthError> {
        let request = self
            .authorizer
            .service_request(authz_pb::ListRoleBindingsRequest {
                tenant_id: tenant.to_string(),
                subject: Some(authz_pb::Subject {
                    kind: PbKind::User as i32,
                    id: user.to_string(),
                    tenant_id: tenant.to_string(),
                }),
                page_size: 100,
                ..Default::default()
            })
            .await?;
        let bindings = self
            .authorizer
            .authz_client()
            .list_role_bindings(request)
            .await
            .map_err(|status| dependency("authz", &status))?
            .into_inner()
            .role_bindings;
        let mut roles: Vec<String> = bindings
            .into_iter()
            .filter(|b| b.workspace_id.is_empty())
            .map(|b| b.role)
            .collect();
        roles.sort();
        roles.dedup();
        Ok(roles)
    }

    /// Signs in: tokens for a new session, or `InvalidCredentials` for every kind of
    /// failure alike.
    pub async fn login(&self, attempt: LoginAttempt) -> Result<SignInOutcome, AuthError> {
        // Run to the end even if the caller goes away: an admitted attempt must always be
        // recorded or released, or it would hold its account's in-flight count.
        let this = self.clone();
        tokio::spawn(async move { this.login_to_the_end(attempt).await })
            .await
            .map_err(|_| AuthError::Internal("the sign-in task was lost".into()))?
    }

    async fn login_to_the_end(&self, attempt: LoginAttempt) -> Result<SignInOutcome, AuthError> {
        let now = OffsetDateTime::now_utc();
        // A blocked address is refused before anything is counted or hashed.
        if self.ip_blocked(attempt.tenant, attempt.ip).await? {
            tracing::warn!(tenant = %attempt.tenant, "sign-in refused: the address is blocked");
            return Err(AuthError::IpBlocked);
        }
        let tenant = self.tenant(attempt.tenant).await?;
        let active_tenant = tenant
            .as_ref()
            .filter(|t| t.state == tenants_pb::TenantState::Active as i32);
        let policy = active_tenant.map(lockout_policy).unwrap_or_default();
        let keys = CounterKey::for_attempt(&attempt.email, &attempt.ip.to_string());
        let verdict = self
            .store
            .begin_attempt(attempt.tenant, &keys, &policy, now)
            .await?;
        let checked = self.check_password(&attempt).await;
        let (user, matched, mfa_active) = match checked {
            Ok(checked) => checked,
            Err(err) => {
                if verdict == Verdict::Proceed {
                    // Nothing was decided: release the attempt, count nothing.
                    self.store
                        .attempt_abandoned(attempt.tenant, &keys, now)
                        .await?;
                }
                return Err(err);
            }
        };
        let user_id = user.as_ref().and_then(|u| Uuid::try_parse(&u.id).ok());
        let active_user = user
            .as_ref()
            .is_some_and(|u| u.status == tenants_pb::UserStatus::Active as i32);
        match verdict {
            Verdict::Proceed => {}
            Verdict::Locked(until) => {
                // No email, IP or password in logs: the tenant and when the lock ends.
                tracing::warn!(tenant = %attempt.tenant, locked_until = %until, "sign-in refused by a lockout");
                return Err(AuthError::InvalidCredentials);
            }
            Verdict::Busy => {
                tracing::warn!(tenant = %attempt.tenant, "sign-in refused: too many attempts in flight for one account");
                return Err(AuthError::InvalidCredentials);
            }
        }
        let (Some(tenant), Some(user_id), true, true) =
            (active_tenant, user_id, matched, active_user)
        else {
            self.store
                .attempt_failed(attempt.tenant, &keys, &policy, now)
                .await?;
            return Err(AuthError::InvalidCredentials);
        };
        self.store
            .attempt_succeeded(attempt.tenant, &keys, now)
            .await?;
        // The password was right: a second factor if the user has one, enrolment if the
        // tenant demands one, tokens otherwise.
        if mfa_active {
            let (challenge, expires_at) = self
                .open_challenge(attempt.tenant, user_id, attempt.ip)
                .await?;
            return Ok(SignInOutcome::Challenge {
                challenge,
                expires_at,
            });
        }
        if tenant
            .security_policy
            .as_ref()
            .is_some_and(|p| p.mfa_required)
        {
            let signed_in = self
                .start_session(
                    tenant,
                    user_id,
                    attempt.ip,
                    attempt.user_agent,
                    false,
                    &[ENROLL_SCOPE],
                    now,
                )
                .await?;
            return Ok(SignInOutcome::MustEnroll(signed_in));
        }
        let signed_in = self
            .start_session(
                tenant,
                user_id,
                attempt.ip,
                attempt.user_agent,
                false,
                &[],
                now,
            )
            .await?;
        Ok(SignInOutcome::SignedIn(signed_in))
    }

    /// Records a new session and mints its token. In the platform tenant the token carries
    /// roles only when a second factor was verified (though a staff account that has not
    /// enrolled yet can enrol with its password alone).
    ///
    /// `checked_at` is when the user's status was read: the session starts, and the token
    /// is issued (`iat`), then, so a suspension committed after that read refuses the token
    /// even when it is signed later.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn start_session(
        &self,
        tenant: &tenants_pb::Tenant,
        user: Uuid,
        ip: IpAddr,
        user_agent: String,
        mfa_verified: bool,
        scopes: &[&str],
        checked_at: OffsetDateTime,
    ) -> Result<SignedIn, AuthError> {
        let tenant_id = Uuid::try_parse(&tenant.id)
            .map_err(|_| AuthError::Internal("tenants answered a malformed tenant id".into()))?;
        // No session row for a token that cannot be signed.
        self.keyring.current()?;
        let now = checked_at;
        let lifetime = token_lifetime(tenant);
        let session = SessionRecord {
            id: Uuid::now_v7(),
            tenant_id,
            user_id: user,
            ip_address: ip.to_string(),
            user_agent,
            created_at: now,
            expires_at: now + lifetime,
            mfa_verified,
        };
        let roles = self
            .token_roles(tenant_id, user, mfa_verified, scopes)
            .await?;
        self.store.insert_session(&session).await?;
        let access_token = self.mint_for(&session, roles, lifetime, scopes, now)?;
        Ok(SignedIn {
            session,
            access_token,
        })
    }

    /// Full tokens for an existing session (after MFA enrolment upgraded it), living no
    /// longer than the session.
    pub(crate) async fn reissue(
        &self,
        caller: &Principal,
        session: Uuid,
    ) -> Result<SignedIn, AuthError> {
        let now = OffsetDateTime::now_utc();
        let Some((mut record, true)) = self.store.session(caller.tenant_id, session, now).await?
        else {
            return Err(ApiError::unauthenticated(Reason::TokenRevoked).into());
        };
        record.mfa_verified = true;
        let lifetime = Duration::from_secs(
            u64::try_from((record.expires_at - now).whole_seconds()).unwrap_or(0),
        );
        let roles = self
            .token_roles(record.tenant_id, record.user_id, true, &[])
            .await?;
        let access_token = self.mint_for(&record, roles, lifetime, &[], now)?;
        Ok(SignedIn {
            session: record,
            access_token,
        })
    }

    /// The roles a new token carries: none for an enrolment-only token, none in the
    /// platform tenant without a verified second factor.
    async fn token_roles(
        &self,
        tenant: Uuid,
        user: Uuid,
        mfa_verified: bool,
        scopes: &[&str],
    ) -> Result<Vec<String>, AuthError> {
        if !scopes.is_empty()
            || (tenant == penny_platform::principal::PLATFORM_TENANT_ID && !mfa_verified)
        {
            return Ok(Vec::new());
        }
        self.roles(tenant, user).await
    }

    fn mint_for(
        &self,
        session: &SessionRecord,
        roles: Vec<String>,
        lifetime: Duration,
        scopes: &[&str],
        issued_at: OffsetDateTime,
    ) -> Result<String, AuthError> {
        self.keyring
            .current()?
            .mint_issued_at(
                &TokenGrant {
                    subject: session.user_id.to_string(),
                    tenant_id: session.tenant_id,
                    roles,
                    kind: PrincipalKind::User,
                    session_id: Some(session.id.to_string()),
                    lifetime,
                },
                scopes,
                u64::try_from(issued_at.unix_timestamp()).unwrap_or(0),
            )
            .map_err(|e| AuthError::Internal(e.to_string()))
    }

    /// Whether `password` is the user's, counted against the account's lockout like a
    /// sign-in (a wrong one is a failure; a locked account never matches).
    pub(crate) async fn password_matches(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        password: &str,
    ) -> Result<bool, AuthError> {
        let now = OffsetDateTime::now_utc();
        let user = self.existing_user(tenant_id, user_id).await?;
        let policy = self
            .tenant(tenant_id)
            .await?
            .as_ref()
            .map(lockout_policy)
            .unwrap_or_default();
        let keys = [CounterKey::Account(user.email.to_lowercase())];
        let verdict = self
            .store
            .begin_attempt(tenant_id, &keys, &policy, now)
            .await?;
        let stored = self.store.password_hash(tenant_id, user_id).await?;
        let matched = match self.hasher.verify(password, stored.as_deref()).await {
            Ok(matched) => matched,
            Err(err) => {
                if verdict == Verdict::Proceed {
                    self.store.attempt_abandoned(tenant_id, &keys, now).await?;
                }
                return Err(err.into());
            }
        };
        if verdict != Verdict::Proceed {
            return Ok(false);
        }
        if matched {
            self.store.attempt_succeeded(tenant_id, &keys, now).await?;
        } else {
            self.store
                .attempt_failed(tenant_id, &keys, &policy, now)
                .await?;
        }
        Ok(matched)
    }

    /// The same work for every attempt: the user by email (none when the tenant or user
    /// does not exist), a credential lookup (password hash and whether MFA is active, with a
    /// random id when there is no user), and one verification, against the stored hash or
    /// the dummy.
    async fn check_password(
        &self,
        attempt: &LoginAttempt,
    ) -> Result<(Option<tenants_pb::User>, bool, bool), AuthError> {
        let user = self.user_by_email(attempt.tenant, &attempt.email).await?;
        let user_id = user
            .as_ref()
            .and_then(|u| Uuid::try_parse(&u.id).ok())
            .unwrap_or_else(Uuid::new_v4);
        let (stored, mfa) = self.store.credential(attempt.tenant, user_id).await?;
        let matched = self
            .hasher
            .verify(&attempt.password, stored.as_deref())
            .await?;
        Ok((user, matched, mfa))
    }

    /// Sets a password with a one-time token; every session of the user ends.
    pub async fn set_password_with_token(
        &self,
        token: &str,
        new_password: &str,
    ) -> Result<(Uuid, Uuid), AuthError> {
        let now = OffsetDateTime::now_utc();
        let tenant = reset_token_tenant(token).ok_or(AuthError::TokenInvalid)?;
        let hash = token_hash(token);
        let user_id = self.store.reset_token_user(tenant, &hash, now).await?;
        let user = self
            .user(tenant, user_id)
            .await?
            .filter(|u| u.status != tenants_pb::UserStatus::Deleted as i32)
            .ok_or(AuthError::TokenInvalid)?;
        if let Some(problem) = policy_problem(new_password, &user.email) {
            return Err(AuthError::PasswordPolicy(problem));
        }
        let phc = self.hasher.hash(new_password).await?;
        self.store
            .consume_reset_token(tenant, &hash, user_id, &phc, now)
            .await?;
        Ok((tenant, user_id))
    }

    /// Sets a user's password directly (administrative path).
    pub async fn set_password_directly(
        &self,
        tenant: Uuid,
        user_id: Uuid,
        new_password: &str,
        revoke_sessions: bool,
    ) -> Result<(), AuthError> {
        let user = self.existing_user(tenant, user_id).await?;
        if let Some(problem) = policy_problem(new_password, &user.email) {
            return Err(AuthError::PasswordPolicy(problem));
        }
        let phc = self.hasher.hash(new_password).await?;
        self.store
            .set_password(
                tenant,
                user_id,
                &phc,
                revoke_sessions.then_some(SessionScope::All),
                OffsetDateTime::now_utc(),
            )
            .await?;
        Ok(())
    }

    /// Changes the caller's own password after checking the current one (a wrong one
    /// counts against the account's lockout, like a failed sign-in), optionally ending
    /// every other session. Returns how many sessions ended.
    pub async fn change_password(
        &self,
        caller: &Principal,
        current: &str,
        new_password: &str,
        revoke_others: bool,
    ) -> Result<u32, AuthError> {
        let (PrincipalKind::User, Some(Ok(session))) = (
            caller.kind,
            caller.session_id.as_deref().map(Uuid::try_parse),
        ) else {
            return Err(not_a_session());
        };
        let Ok(user_id) = Uuid::try_parse(&caller.id) else {
            return Err(not_a_session());
        };
        let tenant_id = caller.tenant_id;
        let now = OffsetDateTime::now_utc();
        if !self.password_matches(tenant_id, user_id, current).await? {
            return Err(AuthError::InvalidCredentials);
        }
        let user = self.existing_user(tenant_id, user_id).await?;
        if let Some(problem) = policy_problem(new_password, &user.email) {
            return Err(AuthError::PasswordPolicy(problem));
        }
        let phc = self.hasher.hash(new_password).await?;
        Ok(self
            .store
            .set_password(
                tenant_id,
                user_id,
                &phc,
                revoke_others.then_some(SessionScope::AllExcept(session)),
                now,
            )
            .await?)
    }

    /// What a token proves, checked against this service's own records (authoritative,
    /// with no stream delay): `None` for a token that is invalid, expired or revoked.
    pub async fn introspect(&self, token: &str) -> Result<Option<Claims>, AuthError> {
        let Some(verifier) = self.keyring.verifier() else {
            return Err(AuthError::Dependency("keys"));
        };
        let Ok(claims) = verifier.verify_uncached(token) else {
            return Ok(None);
        };
        let now = OffsetDateTime::now_utc();
        let issued = OffsetDateTime::from_unix_timestamp(i64::try_from(claims.iat).unwrap_or(0))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let live = match claims.kind {
            PrincipalKind::User => {
                let session_live = match claims.sid.as_deref().map(Uuid::try_parse) {
                    Some(Ok(sid)) => self
                        .store
                        .session(claims.tenant_id, sid, now)
                        .await?
                        .is_some_and(|(s, live)| live && s.user_id.to_string() == claims.sub),
                    // A user token without a session is not one this service issues.
                    _ => false,
                };
                session_live
                    && !self
                        .store
                        .revoked_since(claims.tenant_id, RevocationKind::User, &claims.sub, issued)
                        .await?
            }
            PrincipalKind::Service => {
                !self
                    .store
                    .revoked_since(
                        claims.tenant_id,
                        RevocationKind::ServiceClient,
                        &claims.sub,
                        issued,
                    )
                    .await?
            }
            PrincipalKind::ApiKey => false,
        };
        Ok(live.then_some(claims))
    }

    /// Mints a one-time set-password token for a user (invite or reset). Only its hash is
    /// stored; the token is returned once.
    pub async fn mint_set_password_token(
        &self,
        tenant: Uuid,
        user_id: Uuid,
        ttl: Duration,
    ) -> Result<(String, OffsetDateTime), AuthError> {
        self.existing_user(tenant, user_id).await?;
        let token = new_prefixed_token(RESET_PREFIX, tenant);
        let now = OffsetDateTime::now_utc();
        let expires = now + ttl;
        self.store
            .insert_reset_token(tenant, user_id, &token_hash(&token), expires, now)
            .await?;
        Ok((token, expires))
    }

    pub(crate) async fn existing_user(
        &self,
        tenant: Uuid,
        user_id: Uuid,
    ) -> Result<tenants_pb::User, AuthError> {
        self.user(tenant, user_id)
            .await?
            .filter(|u| u.status != tenants_pb::UserStatus::Deleted as i32)
            .ok_or(AuthError::UserNotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_tokens_carry_their_tenant_and_nothing_else_parses() {
        let tenant = Uuid::new_v4();
        let token = format!("pst_{}_{}", tenant.simple(), "A".repeat(43));
        assert_eq!(reset_token_tenant(&token), Some(tenant));
        for bad in [
            String::new(),
            "pst_".into(),
            format!("pst_{}_{}", tenant.simple(), "A".repeat(42)),
            format!("xyz_{}_{}", tenant.simple(), "A".repeat(43)),
            format!("pst_nope_{}", "A".repeat(43)),
        ] {
            assert_eq!(reset_token_tenant(&bad), None, "{bad}");
        }
        assert_eq!(token_hash("x").len(), 64);
    }
}
