//! Sessions: listing, ending (logout, revocation, suspension) and the revocation stream
//! every service's verifier follows.

use penny_platform::stack::tenant_scope;
use penny_platform::{ApiError, Principal, PrincipalKind};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::AuthError;
use crate::service::Auth;
use crate::store::{Revocation, SessionRecord, SessionScope};

/// Permission to list another user's sessions.
pub const READ_SESSIONS: &str = "user:read";
/// Permission to end another user's sessions (a lesser form of suspension).
pub const END_SESSIONS: &str = "user:suspend";

/// What `RevokeSession` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeTarget {
    /// One session.
    Session(Uuid),
    /// Every session of a user.
    User(Uuid),
}

fn is_self(caller: &Principal, tenant: Uuid, user: Uuid) -> bool {
    caller.kind == PrincipalKind::User
        && caller.tenant_id == tenant
        && Uuid::try_parse(&caller.id).is_ok_and(|id| id == user)
}

impl Auth {
    /// Refuses unless `caller` may act on `user`'s sessions in `tenant`: the user
    /// themselves, a fleet service, platform staff, or a holder of `permission` in the
    /// tenant. Another tenant is NOT_FOUND.
    async fn may_act_on(
        &self,
        caller: &Principal,
        tenant: Uuid,
        user: Uuid,
        permission: &'static str,
    ) -> Result<(), AuthError> {
        tenant_scope(caller, tenant)?;
        if is_self(caller, tenant, user) || caller.is_service() || caller.is_platform_admin() {
            return Ok(());
        }
        if self.authorizer.allows(caller, permission).await? {
            Ok(())
        } else {
            Err(ApiError::permission_denied("the caller may not perform this operation").into())
        }
    }

    /// Ends the caller's own current session.
    pub async fn logout(&self, caller: &Principal) -> Result<(), AuthError> {
        let (PrincipalKind::User, Some(sid)) = (caller.kind, caller.session_id.as_deref()) else {
            return Err(ApiError::failed_precondition(
                penny_platform::Reason::FailedPrecondition,
                "only a user's session token can log out",
            )
            .into());
        };
        let (Ok(user), Ok(sid)) = (Uuid::try_parse(&caller.id), Uuid::try_parse(sid)) else {
            return Err(ApiError::failed_precondition(
                penny_platform::Reason::FailedPrecondition,
                "the token names no session",
            )
            .into());
        };
        self.store
            .end_sessions(
                caller.tenant_id,
                user,
                SessionScope::One(sid),
                OffsetDateTime::now_utc(),
            )
            .await?;
        Ok(())
    }

    /// A page of a user's live sessions, newest first.
    pub async fn list_sessions(
        &self,
        caller: &Principal,
        tenant: Uuid,
        user: Uuid,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<SessionRecord>, AuthError> {
        self.may_act_on(caller, tenant, user, READ_SESSIONS).await?;
        Ok(self
            .store
            .live_sessions(tenant, user, OffsetDateTime::now_utc(), after, limit)
            .await?)
    }

    /// Ends one session or all of a user's. Ending another user's sessions revokes the
    /// user outright, so a sign-in racing the revocation does not survive it either.
    /// Returns how many sessions ended; an unknown session is NOT_FOUND.
    pub async fn revoke(
        &self,
        caller: &Principal,
        tenant: Uuid,
        target: RevokeTarget,
    ) -> Result<u32, AuthError> {
        let now = OffsetDateTime::now_utc();
        match target {
            RevokeTarget::Session(id) => {
                tenant_scope(caller, tenant)?;
                let Some((session, _live)) = self.store.session(tenant, id, now).await? else {
                    return Err(not_found());
                };
                // Someone else's session is hidden from a caller who may not end it.
                if self
                    .may_act_on(caller, tenant, session.user_id, END_SESSIONS)
                    .await
                    .is_err()
                {
                    return Err(not_found());
                }
                Ok(self
                    .store
                    .end_sessions(tenant, session.user_id, SessionScope::One(id), now)
                    .await?)
            }
            RevokeTarget::User(user) => {
                self.may_act_on(caller, tenant, user, END_SESSIONS).await?;
                // Only a user of this tenant (a revocation names its tenant, and ids of
                // other tenants' users, or made-up ones, must not fill the log).
                self.existing_user(tenant, user)
                    .await
                    .map_err(|err| match err {
                        AuthError::UserNotFound => not_found(),
                        other => other,
                    })?;
                if is_self(caller, tenant, user) {
                    Ok(self
                        .store
                        .end_sessions(tenant, user, SessionScope::All, now)
                        .await?)
                } else {
                    Ok(self.store.revoke_user(tenant, user, now).await?)
                }
            }
        }
    }

    /// The newest revocation's sequence number.
    pub async fn latest_revocation(&self) -> Result<u64, AuthError> {
        Ok(self.store.latest_revocation().await?)
    }

    /// Up to `limit` revocations after `after`; with `live_only`, only those that still
    /// refuse something.
    pub async fn revocations_after(
        &self,
        after: u64,
        limit: u64,
        live_only: bool,
    ) -> Result<Vec<Revocation>, AuthError> {
        let live_at = live_only.then(OffsetDateTime::now_utc);
        Ok(self.store.revocations_after(after, limit, live_at).await?)
    }

    /// Resolves after the next revocation committed through this replica.
    pub async fn revoked(&self) {
        self.store.revoked().await;
    }
}

fn not_found() -> AuthError {
    ApiError::not_found(penny_platform::Reason::NotFound, "session not found").into()
}
