//! MFA enrolments, recovery codes and sign-in challenges.
//!
//! Each TOTP step is accepted at most once per user: acceptance is a compare-and-set on
//! the newest accepted step, so of two concurrent uses of one code exactly one wins. A
//! recovery code or a challenge is used by one conditional update, likewise.

use sea_orm::{ActiveValue::Set, ColumnTrait, DbErr, EntityTrait, PaginatorTrait, QueryFilter};
use time::OffsetDateTime;
use uuid::Uuid;

use super::Store;
use super::entity::{challenges, mfa, recovery_codes, sessions};

/// Where an enrolment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MfaState {
    /// Enrolled but not yet confirmed by a first code.
    Pending,
    /// In force.
    Active,
}

impl MfaState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
        }
    }
}

/// A user's enrolment as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MfaRecord {
    /// Pending or active.
    pub state: MfaState,
    /// The secret, as KeyService ciphertext.
    pub secret_ciphertext: String,
    /// The newest step accepted.
    pub last_step: u64,
    /// When a pending enrolment lapses.
    pub pending_expires_at: Option<OffsetDateTime>,
}

fn record_from(m: mfa::Model) -> Option<MfaRecord> {
    Some(MfaRecord {
        state: match m.state.as_str() {
            "pending" => MfaState::Pending,
            "active" => MfaState::Active,
            _ => return None,
        },
        secret_ciphertext: m.secret_ciphertext,
        last_step: u64::try_from(m.last_step).unwrap_or(0),
        pending_expires_at: m.pending_expires_at,
    })
}

fn step_value(step: u64) -> i64 {
    i64::try_from(step).unwrap_or(i64::MAX)
}

impl Store {
    /// A user's enrolment, if any.
    pub async fn mfa(&self, tenant: Uuid, user: Uuid) -> Result<Option<MfaRecord>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let found = mfa::Entity::find_by_id((tenant, user))
            .filter(mfa::Column::TenantId.eq(tenant))
            .one(&txn)
            .await?;
        txn.commit().await?;
        Ok(found.and_then(record_from))
    }

    /// Stores a pending enrolment, replacing an earlier pending one. Returns `false` (and
    /// changes nothing) when MFA is already active.
    pub async fn put_pending_mfa(
        &self,
        tenant: Uuid,
        user: Uuid,
        secret_ciphertext: &str,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<bool, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        mfa::Entity::delete_many()
            .filter(mfa::Column::TenantId.eq(tenant))
            .filter(mfa::Column::UserId.eq(user))
            .filter(mfa::Column::State.eq(MfaState::Pending.as_str()))
            .exec(&txn)
            .await?;
        let inserted = mfa::Entity::insert(mfa::ActiveModel {
            tenant_id: Set(tenant),
            user_id: Set(user),
            state: Set(MfaState::Pending.as_str().to_owned()),
            secret_ciphertext: Set(secret_ciphertext.to_owned()),
            last_step: Set(0),
            pending_expires_at: Set(Some(expires_at)),
            created_at: Set(now),
            confirmed_at: Set(None),
        })
        .on_conflict(
            sea_orm::sea_query::OnConflict::columns([mfa::Column::TenantId, mfa::Column::UserId])
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await?;
        Ok(inserted == 1)
    }

    /// Activates a pending, unexpired enrolment (the one holding `secret_ciphertext`) with
    /// the step of its first code, storing
    /// the recovery codes' hashes (replacing any earlier ones). Returns `false` when there
    /// was nothing to confirm.
    pub async fn confirm_mfa(
        &self,
        tenant: Uuid,
        user: Uuid,
        secret_ciphertext: &str,
        step: u64,
        code_hashes: &[String],
        now: OffsetDateTime,
    ) -> Result<bool, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let updated = mfa::Entity::update_many()
            .col_expr(mfa::Column::State, MfaState::Active.as_str().into())
            .col_expr(mfa::Column::LastStep, step_value(step).into())
            .col_expr(mfa::Column::ConfirmedAt, Some(now).into())
            .col_expr(
                mfa::Column::PendingExpiresAt,
                Option::<OffsetDateTime>::None.into(),
            )
            .filter(mfa::Column::TenantId.eq(tenant))
            .filter(mfa::Column::UserId.eq(user))
            .filter(mfa::Column::State.eq(MfaState::Pending.as_str()))
            // The very enrolment the code was checked against, not one made meanwhile.
            .filter(mfa::Column::SecretCiphertext.eq(secret_ciphertext))
            .filter(mfa::Column::PendingExpiresAt.gt(now))
            .exec(&txn)
            .await?;
        if updated.rows_affected != 1 {
            txn.rollback().await?;
            return Ok(false);
        }
        recovery_codes::Entity::delete_many()
            .filter(recovery_codes::Column::TenantId.eq(tenant))
            .filter(recovery_codes::Column::UserId.eq(user))
            .exec(&txn)
            .await?;
        recovery_codes::Entity::insert_many(code_hashes.iter().map(|hash| {
            recovery_codes::ActiveModel {
                tenant_id: Set(tenant),
                user_id: Set(user),
                code_hash: Set(hash.clone()),
                used_at: Set(None),
            }
        }))
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await?;
        Ok(true)
    }

    /// Accepts `step` for an active enrolment if no step at or after it was accepted
    /// before (compare-and-set): `false` for a replayed or older code.
    pub async fn accept_step(&self, tenant: Uuid, user: Uuid, step: u64) -> Result<bool, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let updated = mfa::Entity::update_many()
            .col_expr(mfa::Column::LastStep, step_value(step).into())
            .filter(mfa::Column::TenantId.eq(tenant))
            .filter(mfa::Column::UserId.eq(user))
            .filter(mfa::Column::State.eq(MfaState::Active.as_str()))
            .filter(mfa::Column::LastStep.lt(step_value(step)))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(updated.rows_affected == 1)
    }

    /// Uses a recovery code once: `false` when unknown or already used.
    pub async fn use_recovery_code(
        &self,
        tenant: Uuid,
        user: Uuid,
        code_hash: &str,
        now: OffsetDateTime,
    ) -> Result<bool, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let updated = recovery_codes::Entity::update_many()
            .col_expr(recovery_codes::Column::UsedAt, Some(now).into())
            .filter(recovery_codes::Column::TenantId.eq(tenant))
            .filter(recovery_codes::Column::UserId.eq(user))
            .filter(recovery_codes::Column::CodeHash.eq(code_hash))
            .filter(recovery_codes::Column::UsedAt.is_null())
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(updated.rows_affected == 1)
    }

    /// Recovery codes not yet used.
    pub async fn recovery_codes_left(&self, tenant: Uuid, user: Uuid) -> Result<u32, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let left = recovery_codes::Entity::find()
            .filter(recovery_codes::Column::TenantId.eq(tenant))
            .filter(recovery_codes::Column::UserId.eq(user))
            .filter(recovery_codes::Column::UsedAt.is_null())
            .count(&txn)
            .await?;
        txn.commit().await?;
        Ok(u32::try_from(left).unwrap_or(u32::MAX))
    }

    /// Removes a user's enrolment and recovery codes.
    pub async fn delete_mfa(&self, tenant: Uuid, user: Uuid) -> Result<(), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        mfa::Entity::delete_many()
            .filter(mfa::Column::TenantId.eq(tenant))
            .filter(mfa::Column::UserId.eq(user))
            .exec(&txn)
            .await?;
        recovery_codes::Entity::delete_many()
            .filter(recovery_codes::Column::TenantId.eq(tenant))
            .filter(recovery_codes::Column::UserId.eq(user))
            .exec(&txn)
            .await?;
        txn.commit().await
    }

    /// Records a sign-in challenge by its token's hash.
    pub async fn insert_challenge(
        &self,
        tenant: Uuid,
        user: Uuid,
        token_hash: &str,
        ip: &str,
        expires_at: OffsetDateTime,
    ) -> Result<(), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        challenges::Entity::insert(challenges::ActiveModel {
            token_hash: Set(token_hash.to_owned()),
            tenant_id: Set(tenant),
            user_id: Set(user),
            ip_address: Set(ip.to_owned()),
            expires_at: Set(expires_at),
            used_at: Set(None),
        })
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await
    }

    /// The user and IP of a live (unused, unexpired) challenge.
    pub async fn challenge(
        &self,
        tenant: Uuid,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<Option<(Uuid, String)>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let found = challenges::Entity::find_by_id(token_hash.to_owned())
            .filter(challenges::Column::TenantId.eq(tenant))
            .one(&txn)
            .await?;
        txn.commit().await?;
        Ok(found
            .filter(|c| c.used_at.is_none() && c.expires_at > now)
            .map(|c| (c.user_id, c.ip_address)))
    }

    /// Uses a challenge once: `false` when it was used (or lapsed) meanwhile.
    pub async fn consume_challenge(
        &self,
        tenant: Uuid,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<bool, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let updated = challenges::Entity::update_many()
            .col_expr(challenges::Column::UsedAt, Some(now).into())
            .filter(challenges::Column::TokenHash.eq(token_hash))
            .filter(challenges::Column::TenantId.eq(tenant))
            .filter(challenges::Column::UsedAt.is_null())
            .filter(challenges::Column::ExpiresAt.gt(now))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(updated.rows_affected == 1)
    }

    /// Marks a session as having passed a second factor.
    pub async fn mark_session_mfa(&self, tenant: Uuid, session: Uuid) -> Result<(), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        sessions::Entity::update_many()
            .col_expr(sessions::Column::MfaVerified, true.into())
            .filter(sessions::Column::TenantId.eq(tenant))
            .filter(sessions::Column::Id.eq(session))
            .exec(&txn)
            .await?;
        txn.commit().await
    }
}
