//! Sessions and the revocation log.
//!
//! Ending a session marks its row and appends a revocation in the same transaction, so a
//! session is never ended without every follower hearing of it. Revocations take their
//! sequence number from a one-row counter whose row lock is held until commit: numbers
//! commit in order, and a follower that has seen `n` has seen everything before it.

use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbErr, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, Statement,
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::entity::{revocations, sessions};
use super::{SessionRecord, Store};

/// How long a user revocation is kept: every token it refuses has expired by then.
const USER_REVOCATION_TTL: time::Duration = time::Duration::hours(25);

/// What a revocation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationKind {
    /// One session.
    Session,
    /// One API key.
    ApiKey,
    /// Every token of a user issued up to the revocation.
    User,
    /// Every token of a service client issued up to the revocation.
    ServiceClient,
}

impl RevocationKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::ApiKey => "api_key",
            Self::User => "user",
            Self::ServiceClient => "service_client",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "session" => Self::Session,
            "api_key" => Self::ApiKey,
            "user" => Self::User,
            "service_client" => Self::ServiceClient,
            _ => return None,
        })
    }
}

/// One entry of the revocation log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Its place in the log.
    pub seq: u64,
    /// The tenant.
    pub tenant_id: Uuid,
    /// What is revoked.
    pub kind: RevocationKind,
    /// The session, API key, user or service client id.
    pub subject_id: String,
    /// When.
    pub revoked_at: OffsetDateTime,
    /// After this, every affected credential has expired anyway.
    pub expires_at: Option<OffsetDateTime>,
}

/// Which of a user's sessions to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionScope {
    /// Every live session.
    All,
    /// Every live session but this one (the caller's own, on a password change).
    AllExcept(Uuid),
    /// This session only.
    One(Uuid),
}

fn record_from(m: sessions::Model) -> SessionRecord {
    SessionRecord {
        id: m.id,
        tenant_id: m.tenant_id,
        user_id: m.user_id,
        ip_address: m.ip_address,
        user_agent: m.user_agent,
        created_at: m.created_at,
        expires_at: m.expires_at,
        mfa_verified: m.mfa_verified,
    }
}

fn revocation_from(m: revocations::Model) -> Option<Revocation> {
    Some(Revocation {
        seq: u64::try_from(m.seq).ok()?,
        tenant_id: m.tenant_id,
        kind: RevocationKind::parse(&m.kind)?,
        subject_id: m.subject_id,
        revoked_at: m.revoked_at,
        expires_at: m.expires_at,
    })
}

/// Takes the next sequence number inside `txn`, holding the counter's row lock until
/// commit.
async fn next_seq(txn: &DatabaseTransaction) -> Result<i64, DbErr> {
    let backend = txn.get_database_backend();
    txn.execute_raw(Statement::from_string(
        backend,
        "UPDATE auth_revocation_seq SET value = value + 1 WHERE id = 1",
    ))
    .await?;
    txn.query_one_raw(Statement::from_string(
        backend,
        "SELECT value FROM auth_revocation_seq WHERE id = 1",
    ))
    .await?
    .ok_or_else(|| DbErr::RecordNotFound("auth_revocation_seq".into()))?
    .try_get_by_index::<i64>(0)
}

/// Takes the revocation counter's row lock inside `txn` (held until commit).
async fn lock_log(txn: &DatabaseTransaction) -> Result<(), DbErr> {
    txn.execute_raw(Statement::from_string(
        txn.get_database_backend(),
        "UPDATE auth_revocation_seq SET value = value WHERE id = 1",
    ))
    .await?;
    Ok(())
}

impl Store {
    /// Appends one revocation inside `txn`.
    pub(super) async fn append_revocation_in(
        txn: &DatabaseTransaction,
        tenant: Uuid,
        kind: RevocationKind,
        subject: &str,
        now: OffsetDateTime,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<(), DbErr> {
        let seq = next_seq(txn).await?;
        revocations::Entity::insert(revocations::ActiveModel {
            seq: Set(seq),
            tenant_id: Set(tenant),
            kind: Set(kind.as_str().to_owned()),
            subject_id: Set(subject.to_owned()),
            revoked_at: Set(now),
            expires_at: Set(expires_at),
        })
        .exec_without_returning(txn)
        .await?;
        Ok(())
    }

    /// Ends a user's live sessions in `scope` inside `txn`, appending one revocation per
    /// session (kept until the session would have expired). Returns how many ended.
    pub(super) async fn end_sessions_in(
        txn: &DatabaseTransaction,
        tenant: Uuid,
        user: Uuid,
        scope: SessionScope,
        now: OffsetDateTime,
    ) -> Result<u32, DbErr> {
        // The log's counter first: every transaction that ends sessions takes the same
        // lock before any session row, so two of them cannot deadlock on each other.
        lock_log(txn).await?;
        let mut live = sessions::Entity::find()
            .filter(sessions::Column::TenantId.eq(tenant))
            .filter(sessions::Column::UserId.eq(user))
            .filter(sessions::Column::RevokedAt.is_null())
            .filter(sessions::Column::ExpiresAt.gt(now));
        live = match scope {
            SessionScope::All => live,
            SessionScope::AllExcept(keep) => live.filter(sessions::Column::Id.ne(keep)),
            SessionScope::One(id) => live.filter(sessions::Column::Id.eq(id)),
        };
        let live = live.all(txn).await?;
        let mut ended = 0u32;
        for session in live {
            let updated = sessions::Entity::update_many()
                .col_expr(sessions::Column::RevokedAt, Some(now).into())
                .filter(sessions::Column::TenantId.eq(tenant))
                .filter(sessions::Column::Id.eq(session.id))
                .filter(sessions::Column::RevokedAt.is_null())
                .exec(txn)
                .await?;
            if updated.rows_affected == 1 {
                Self::append_revocation_in(
                    txn,
                    tenant,
                    RevocationKind::Session,
                    &session.id.to_string(),
                    now,
                    Some(session.expires_at),
                )
                .await?;
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Ends a user's sessions in `scope`. Returns how many ended (0 when already ended).
    pub async fn end_sessions(
        &self,
        tenant: Uuid,
        user: Uuid,
        scope: SessionScope,
        now: OffsetDateTime,
    ) -> Result<u32, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let ended = Self::end_sessions_in(&txn, tenant, user, scope, now).await?;
        txn.commit().await?;
        if ended > 0 {
            self.revoked.notify_waiters();
        }
        Ok(ended)
    }

    /// Revokes a user outright (suspension, deletion): every live session ends, and every
    /// token issued to the user up to now is refused, including one from a sign-in that
    /// was racing this revocation. Returns how many sessions ended.
    pub async fn revoke_user(
        &self,
        tenant: Uuid,
        user: Uuid,
        now: OffsetDateTime,
    ) -> Result<u32, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let ended = Self::end_sessions_in(&txn, tenant, user, SessionScope::All, now).await?;
        Self::append_revocation_in(
            &txn,
            tenant,
            RevocationKind::User,
            &user.to_string(),
            now,
            Some(now + USER_REVOCATION_TTL),
        )
        .await?;
        txn.commit().await?;
        self.revoked.notify_waiters();
        Ok(ended)
    }

    /// One session of the tenant, live or not, with whether it is live.
    pub async fn session(
        &self,
        tenant: Uuid,
        id: Uuid,
        now: OffsetDateTime,
    ) -> Result<Option<(SessionRecord, bool)>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let found = sessions::Entity::find_by_id(id)
            .filter(sessions::Column::TenantId.eq(tenant))
            .one(&txn)
            .await?;
        txn.commit().await?;
        Ok(found.map(|m| {
            let live = m.revoked_at.is_none() && m.expires_at > now;
            (record_from(m), live)
        }))
    }

    /// A page of a user's live sessions, newest first, after the session `after`.
    pub async fn live_sessions(
        &self,
        tenant: Uuid,
        user: Uuid,
        now: OffsetDateTime,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<SessionRecord>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut query = sessions::Entity::find()
            .filter(sessions::Column::TenantId.eq(tenant))
            .filter(sessions::Column::UserId.eq(user))
            .filter(sessions::Column::RevokedAt.is_null())
            .filter(sessions::Column::ExpiresAt.gt(now));
        if let Some(after) = after {
            // Session ids are UUIDv7: descending id is newest first.
            query = query.filter(sessions::Column::Id.lt(after));
        }
        let rows = query
            .order_by_desc(sessions::Column::Id)
            .limit(limit)
            .all(&txn)
            .await?;
        txn.commit().await?;
        Ok(rows.into_iter().map(record_from).collect())
    }

    /// Whether a revocation of `kind` for `subject` was made at or after `since`.
    pub async fn revoked_since(
        &self,
        tenant: Uuid,
        kind: RevocationKind,
        subject: &str,
        since: OffsetDateTime,
    ) -> Result<bool, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let found = revocations::Entity::find()
            .filter(revocations::Column::TenantId.eq(tenant))
            .filter(revocations::Column::Kind.eq(kind.as_str()))
            .filter(revocations::Column::SubjectId.eq(subject))
            .filter(revocations::Column::RevokedAt.gte(since))
            .one(&txn)
            .await?;
        txn.commit().await?;
        Ok(found.is_some())
    }

    /// The newest sequence number handed out (0 before the first revocation).
    pub async fn latest_revocation(&self) -> Result<u64, DbErr> {
        let backend = self.db.get_database_backend();
        let value = self
            .db
            .query_one_raw(Statement::from_string(
                backend,
                "SELECT value FROM auth_revocation_seq WHERE id = 1",
            ))
            .await?
            .ok_or_else(|| DbErr::RecordNotFound("auth_revocation_seq".into()))?
            .try_get_by_index::<i64>(0)?;
        Ok(u64::try_from(value).unwrap_or(0))
    }

    /// Up to `limit` revocations after `after`, in order, across every tenant (the stream
    /// serves the whole fleet). With `live_at`, only those that still refuse something.
    pub async fn revocations_after(
        &self,
        after: u64,
        limit: u64,
        live_at: Option<OffsetDateTime>,
    ) -> Result<Vec<Revocation>, DbErr> {
        let txn = penny_platform::db::begin_platform(&self.db).await?;
        let mut query = revocations::Entity::find()
            .filter(revocations::Column::Seq.gt(i64::try_from(after).unwrap_or(i64::MAX)));
        if let Some(now) = live_at {
            query = query.filter(
                sea_orm::Condition::any()
                    .add(revocations::Column::ExpiresAt.is_null())
                    .add(revocations::Column::ExpiresAt.gt(now)),
            );
        }
        let rows = query
            .order_by_asc(revocations::Column::Seq)
            .limit(limit)
            .all(&txn)
            .await?;
        txn.commit().await?;
        Ok(rows.into_iter().filter_map(revocation_from).collect())
    }

    /// Resolves after the next revocation committed through this replica.
    pub async fn revoked(&self) {
        self.revoked.notified().await;
    }
}
