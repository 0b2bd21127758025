//! The auth database. Returns domain types.

use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, QueryFilter,
    QuerySelect,
};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::lockout::{Counter, CounterKey, LockoutPolicy, Verdict};

mod api_keys;
mod ip_blocks;
mod mfa;
mod service_clients;
mod session_log;
mod signing_keys;

pub use api_keys::ApiKeyRecord;
pub use ip_blocks::{GLOBAL as GLOBAL_BLOCKS, IpBlock};
pub use mfa::{MfaRecord, MfaState};
pub use service_clients::ServiceClient;
pub use session_log::{Revocation, RevocationKind, SessionScope};
pub use signing_keys::StoredSigningKey;

mod entity {
    pub mod lockouts {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "auth_lockouts")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub tenant_id: Uuid,
            #[sea_orm(primary_key, auto_increment = false)]
            pub scope_key: String,
            pub failures: i32,
            pub pending: i32,
            pub window_start: TimeDateTimeWithTimeZone,
            pub locked_until: Option<TimeDateTimeWithTimeZone>,
            pub lockouts: i32,
            pub updated_at: TimeDateTimeWithTimeZone,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod credentials {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "auth_credentials")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub tenant_id: Uuid,
            #[sea_orm(primary_key, auto_increment = false)]
            pub user_id: Uuid,
            pub password_hash: String,
            pub updated_at: TimeDateTimeWithTimeZone,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod reset_tokens {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "auth_set_password_tokens")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub token_hash: String,
            pub tenant_id: Uuid,
            pub user_id: Uuid,
            pub expires_at: TimeDateTimeWithTimeZone,
            pub used_at: Option<TimeDateTimeWithTimeZone>,
            pub created_at: TimeDateTimeWithTimeZone,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod sessions {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "auth_sessions")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub id: Uuid,
            pub tenant_id: Uuid,
            pub user_id: Uuid,
            pub ip_address: String,
            pub user_agent: String,
            pub mfa_verified: bool,
            pub created_at: TimeDateTimeWithTimeZone,
            pub expires_at: TimeDateTimeWithTimeZone,
            pub revoked_at: Option<TimeDateTimeWithTimeZone>,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod api_keys {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "auth_api_keys")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub id: Uuid,
            pub tenant_id: Uuid,
            pub name: String,
            pub prefix: String,
            pub secret_hash: String,
            pub roles: String,
            pub creator_id: String,
            pub created_at: TimeDateTimeWithTimeZone,
            pub expires_at: Option<TimeDateTimeWithTimeZone>,
            pub last_used_at: Option<TimeDateTimeWithTimeZone>,
            pub revoked_at: Option<TimeDateTimeWithTimeZone>,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod ip_blocks {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "auth_ip_blocks")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub tenant_id: Uuid,
            #[sea_orm(primary_key, auto_increment = false)]
            pub cidr: String,
            pub reason: String,
            pub creator_id: String,
            pub created_at: TimeDateTimeWithTimeZone,
            pub expires_at: Option<TimeDateTimeWithTimeZone>,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod mfa {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "auth_mfa")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub tenant_id: Uuid,
            #[sea_orm(primary_key, auto_increment = false)]
            pub user_id: Uuid,
            pub state: String,
            pub secret_ciphertext: String,
            pub last_step: i64,
            pub pending_expires_at: Option<TimeDateTimeWithTimeZone>,
            pub created_at: TimeDateTimeWithTimeZone,
            pub confirmed_at: Option<TimeDateTimeWithTimeZone>,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod recovery_codes {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "auth_recovery_codes")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub tenant_id: Uuid,
            #[sea_orm(primary_key, auto_increment = false)]
            pub user_id: Uuid,
            #[sea_orm(primary_key, auto_increment = false)]
            pub code_hash: String,
            pub used_at: Option<TimeDateTimeWithTimeZone>,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod challenges {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "auth_mfa_challenges")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub token_hash: String,
            pub tenant_id: Uuid,
            pub user_id: Uuid,
            pub ip_address: String,
            pub expires_at: TimeDateTimeWithTimeZone,
            pub used_at: Option<TimeDateTimeWithTimeZone>,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod signing_keys {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "auth_signing_keys")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub kid: String,
            pub tenant_id: Uuid,
            pub public_key: String,
            pub private_ciphertext: String,
            pub created_at: TimeDateTimeWithTimeZone,
            pub activates_at: TimeDateTimeWithTimeZone,
            pub retired_at: Option<TimeDateTimeWithTimeZone>,
            pub expires_at: Option<TimeDateTimeWithTimeZone>,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod service_clients {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "auth_service_clients")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub client_id: Uuid,
            pub tenant_id: Uuid,
            pub name: String,
            pub secret_hash: String,
            pub scopes: String,
            pub created_at: TimeDateTimeWithTimeZone,
            pub revoked_at: Option<TimeDateTimeWithTimeZone>,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod revocations {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "auth_revocations")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub seq: i64,
            pub tenant_id: Uuid,
            pub kind: String,
            pub subject_id: String,
            pub revoked_at: TimeDateTimeWithTimeZone,
            pub expires_at: Option<TimeDateTimeWithTimeZone>,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }
}

use entity::{credentials, lockouts, reset_tokens, sessions};

/// A login session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The session id (the JWT `sid`).
    pub id: Uuid,
    /// The tenant.
    pub tenant_id: Uuid,
    /// The user.
    pub user_id: Uuid,
    /// The end user's IP at login.
    pub ip_address: String,
    /// The end user's user agent at login.
    pub user_agent: String,
    /// When it started.
    pub created_at: OffsetDateTime,
    /// When it ends.
    pub expires_at: OffsetDateTime,
    /// Whether a second factor was verified.
    pub mfa_verified: bool,
}

/// Why a set-password token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenRefused {
    /// Unknown, used or expired (deliberately not told apart).
    #[error("the set-password token is not valid")]
    Invalid,
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbErr),
}

fn counter_from(m: &lockouts::Model) -> Counter {
    Counter {
        failures: u32::try_from(m.failures).unwrap_or(0),
        pending: u32::try_from(m.pending).unwrap_or(0),
        window_start: m.window_start,
        locked_until: m.locked_until,
        lockouts: u32::try_from(m.lockouts).unwrap_or(0),
    }
}

fn row(tenant: Uuid, key: &str, c: &Counter, now: OffsetDateTime) -> lockouts::ActiveModel {
    lockouts::ActiveModel {
        tenant_id: Set(tenant),
        scope_key: Set(key.to_owned()),
        failures: Set(i32::try_from(c.failures).unwrap_or(i32::MAX)),
        pending: Set(i32::try_from(c.pending).unwrap_or(i32::MAX)),
        window_start: Set(c.window_start),
        locked_until: Set(c.locked_until),
        lockouts: Set(i32::try_from(c.lockouts).unwrap_or(i32::MAX)),
        updated_at: Set(now),
    }
}

/// The auth service's database.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
    /// Woken after every committed revocation, so this replica's revocation streams send
    /// it at once (other replicas' revocations arrive by polling).
    revoked: std::sync::Arc<tokio::sync::Notify>,
}

impl Store {
    /// Wraps a migrated connection.
    pub fn new(db: DatabaseConnection) -> Self {
        Self {
            db,
            revoked: std::sync::Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// The connection, for readiness probes.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Runs `change` on every key's counter in one transaction: each key's row is written
    /// first (so SQLite takes its write lock at once) and read under a row lock
    /// (PostgreSQL), so concurrent attempts are serialized and each sees the others'.
    /// Nothing is written when `change` refuses one key.
    async fn with_counters(
        &self,
        tenant: Uuid,
        keys: &[CounterKey],
        now: OffsetDateTime,
        mut change: impl FnMut(&CounterKey, &mut Counter) -> Verdict,
    ) -> Result<Verdict, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        for key in keys {
            let storage_key = key.storage_key();
            lockouts::Entity::insert(row(tenant, &storage_key, &Counter::fresh(now), now))
                .on_conflict(
                    OnConflict::columns([lockouts::Column::TenantId, lockouts::Column::ScopeKey])
                        .do_nothing()
                        .to_owned(),
                )
                .exec_without_returning(&txn)
                .await?;
            let mut select = lockouts::Entity::find()
                .filter(lockouts::Column::TenantId.eq(tenant))
                .filter(lockouts::Column::ScopeKey.eq(storage_key.clone()));
            if self.db.get_database_backend() == DbBackend::Postgres {
                select = select.lock_exclusive();
            }
            let current = select
                .one(&txn)
                .await?
                .ok_or_else(|| DbErr::RecordNotFound("auth_lockouts".into()))?;
            let mut counter = counter_from(&current);
            let verdict = change(key, &mut counter);
            if verdict != Verdict::Proceed {
                txn.rollback().await?;
                return Ok(verdict);
            }
            lockouts::Entity::update(row(tenant, &storage_key, &counter, now))
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        Ok(Verdict::Proceed)
    }

    /// Admits one attempt on every key, or refuses it (locked, or too many in flight) and
    /// counts nothing.
    pub async fn begin_attempt(
        &self,
        tenant: Uuid,
        keys: &[CounterKey],
        policy: &LockoutPolicy,
        now: OffsetDateTime,
    ) -> Result<Verdict, DbErr> {
        self.with_counters(tenant, keys, now, |key, counter| {
            counter.admit(policy, key.gated(), now)
        })
        .await
    }

    /// The admitted attempt failed: a failure on every key, which may lock it.
    pub async fn attempt_failed(
        &self,
        tenant: Uuid,
        keys: &[CounterKey],
        policy: &LockoutPolicy,
        now: OffsetDateTime,
    ) -> Result<(), DbErr> {
        self.with_counters(tenant, keys, now, |key, counter| {
            counter.fail(policy, key.gated(), now);
            Verdict::Proceed
        })
        .await
        .map(drop)
    }

    /// The admitted attempt ended without an answer: released, not counted.
    pub async fn attempt_abandoned(
        &self,
        tenant: Uuid,
        keys: &[CounterKey],
        now: OffsetDateTime,
    ) -> Result<(), DbErr> {
        self.with_counters(tenant, keys, now, |key, counter| {
            counter.abandon(key.gated());
            Verdict::Proceed
        })
        .await
        .map(drop)
    }

    /// The admitted attempt succeeded: the account's keys start over.
    pub async fn attempt_succeeded(
        &self,
        tenant: Uuid,
        keys: &[CounterKey],
        now: OffsetDateTime,
    ) -> Result<(), DbErr> {
        self.with_counters(tenant, keys, now, |key, counter| {
            counter.succeed(key);
            Verdict::Proceed
        })
        .await
        .map(drop)
    }

    /// The PHC string of a user's password (if set) and whether the user has MFA in force,
    /// read in one transaction: what sign-in needs from this database before hashing.
    pub async fn credential(
        &self,
        tenant: Uuid,
        user: Uuid,
    ) -> Result<(Option<String>, bool), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let found = credentials::Entity::find_by_id((tenant, user))
            .filter(credentials::Column::TenantId.eq(tenant))
            .one(&txn)
            .await?;
        let mfa = entity::mfa::Entity::find_by_id((tenant, user))
            .filter(entity::mfa::Column::TenantId.eq(tenant))
            .filter(entity::mfa::Column::State.eq("active"))
            .one(&txn)
            .await?;
        txn.commit().await?;
        Ok((found.map(|c| c.password_hash), mfa.is_some()))
    }

    /// The PHC string of a user's password, if one is set.
    pub async fn password_hash(&self, tenant: Uuid, user: Uuid) -> Result<Option<String>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let found = credentials::Entity::find_by_id((tenant, user))
            .filter(credentials::Column::TenantId.eq(tenant))
            .one(&txn)
            .await?;
        txn.commit().await?;
        Ok(found.map(|c| c.password_hash))
    }

    async fn put_password_in(
        txn: &sea_orm::DatabaseTransaction,
        tenant: Uuid,
        user: Uuid,
        phc: &str,
        now: OffsetDateTime,
    ) -> Result<(), DbErr> {
        credentials::Entity::insert(credentials::ActiveModel {
            tenant_id: Set(tenant),
            user_id: Set(user),
            password_hash: Set(phc.to_owned()),
            updated_at: Set(now),
        })
        .on_conflict(
            OnConflict::columns([credentials::Column::TenantId, credentials::Column::UserId])
                .update_columns([
                    credentials::Column::PasswordHash,
                    credentials::Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(txn)
        .await?;
        Ok(())
    }

    /// Retires every set-password token of a user still outstanding: a new token, or a
    /// password set any way, leaves only what was just issued usable.
    async fn retire_reset_tokens_in(
        txn: &sea_orm::DatabaseTransaction,
        tenant: Uuid,
        user: Uuid,
        now: OffsetDateTime,
    ) -> Result<(), DbErr> {
        reset_tokens::Entity::update_many()
            .col_expr(reset_tokens::Column::UsedAt, Some(now).into())
            .filter(reset_tokens::Column::TenantId.eq(tenant))
            .filter(reset_tokens::Column::UserId.eq(user))
            .filter(reset_tokens::Column::UsedAt.is_null())
            .exec(txn)
            .await?;
        Ok(())
    }

    /// Sets a user's password (the PHC string) and ends the sessions in `end`, in one
    /// transaction. Returns how many sessions ended.
    pub async fn set_password(
        &self,
        tenant: Uuid,
        user: Uuid,
        phc: &str,
        end: Option<SessionScope>,
        now: OffsetDateTime,
    ) -> Result<u32, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        Self::put_password_in(&txn, tenant, user, phc, now).await?;
        Self::retire_reset_tokens_in(&txn, tenant, user, now).await?;
        let ended = match end {
            Some(scope) => Self::end_sessions_in(&txn, tenant, user, scope, now).await?,
            None => 0,
        };
        txn.commit().await?;
        if ended > 0 {
            self.revoked.notify_waiters();
        }
        Ok(ended)
    }

    /// Stores a minted set-password token by its hash, retiring the user's earlier ones.
    pub async fn insert_reset_token(
        &self,
        tenant: Uuid,
        user: Uuid,
        token_hash: &str,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<(), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        Self::retire_reset_tokens_in(&txn, tenant, user, now).await?;
        reset_tokens::Entity::insert(reset_tokens::ActiveModel {
            token_hash: Set(token_hash.to_owned()),
            tenant_id: Set(tenant),
            user_id: Set(user),
            expires_at: Set(expires_at),
            used_at: Set(None),
            created_at: Set(now),
        })
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await
    }

    /// The user a live (unused, unexpired) set-password token names.
    pub async fn reset_token_user(
        &self,
        tenant: Uuid,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<Uuid, TokenRefused> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let found = reset_tokens::Entity::find_by_id(token_hash.to_owned())
            .filter(reset_tokens::Column::TenantId.eq(tenant))
            .one(&txn)
            .await?;
        txn.commit().await?;
        match found {
            Some(t) if t.used_at.is_none() && t.expires_at > now => Ok(t.user_id),
            _ => Err(TokenRefused::Invalid),
        }
    }

    /// Consumes a set-password token and sets the password in one transaction: of two
    /// concurrent uses exactly one wins. Every session of the user ends (a reset).
    pub async fn consume_reset_token(
        &self,
        tenant: Uuid,
        token_hash: &str,
        user: Uuid,
        phc: &str,
        now: OffsetDateTime,
    ) -> Result<(), TokenRefused> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let consumed = reset_tokens::Entity::update_many()
            .col_expr(reset_tokens::Column::UsedAt, Some(now).into())
            .filter(reset_tokens::Column::TokenHash.eq(token_hash))
            .filter(reset_tokens::Column::TenantId.eq(tenant))
            .filter(reset_tokens::Column::UserId.eq(user))
            .filter(reset_tokens::Column::UsedAt.is_null())
            .filter(reset_tokens::Column::ExpiresAt.gt(now))
            .exec(&txn)
            .await?;
        if consumed.rows_affected != 1 {
            txn.rollback().await?;
            return Err(TokenRefused::Invalid);
        }
        Self::put_password_in(&txn, tenant, user, phc, now).await?;
        Self::retire_reset_tokens_in(&txn, tenant, user, now).await?;
        Self::end_sessions_in(&txn, tenant, user, SessionScope::All, now).await?;
        txn.commit().await?;
        self.revoked.notify_waiters();
        Ok(())
    }

    /// Records a new session.
    pub async fn insert_session(&self, session: &SessionRecord) -> Result<(), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, session.tenant_id).await?;
        sessions::Entity::insert(sessions::ActiveModel {
            id: Set(session.id),
            tenant_id: Set(session.tenant_id),
            user_id: Set(session.user_id),
            ip_address: Set(session.ip_address.clone()),
            user_agent: Set(session.user_agent.clone()),
            mfa_verified: Set(session.mfa_verified),
            created_at: Set(session.created_at),
            expires_at: Set(session.expires_at),
            revoked_at: Set(None),
        })
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await
    }

    /// A key's counter, if it was ever counted (for tests and operators).
    pub async fn counter(&self, tenant: Uuid, key: &CounterKey) -> Result<Option<Counter>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let found = lockouts::Entity::find()
            .filter(lockouts::Column::TenantId.eq(tenant))
            .filter(lockouts::Column::ScopeKey.eq(key.storage_key()))
            .one(&txn)
            .await?;
        txn.commit().await?;
        Ok(found.as_ref().map(counter_from))
    }
}
