//! The auth database. Returns domain types.

use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, QueryFilter,
    QuerySelect,
};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::lockout::{Counter, CounterKey, LockoutPolicy, Verdict};

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
            pub window_start: TimeDateTimeWithTimeZone,
            pub locked_until: Option<TimeDateTimeWithTimeZone>,
            pub lockouts: i32,
            pub updated_at: TimeDateTimeWithTimeZone,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }
}

use entity::lockouts;

fn counter_from(m: &lockouts::Model) -> Counter {
    Counter {
        failures: u32::try_from(m.failures).unwrap_or(0),
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
}

impl Store {
    /// Wraps a migrated connection.
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// The connection, for readiness probes.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Reserves one attempt on every key, atomically: each key's row is written first (so
    /// SQLite takes its write lock at once) and read under a row lock (PostgreSQL), so
    /// concurrent attempts are serialized and each sees the others' reservations.
    /// `Locked` when any key is locked.
    pub async fn begin_attempt(
        &self,
        tenant: Uuid,
        keys: &[CounterKey],
        policy: &LockoutPolicy,
        now: OffsetDateTime,
    ) -> Result<Verdict, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut verdict = Verdict::Proceed;
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
            let this = counter.reserve(policy, now);
            if let (Verdict::Proceed, Verdict::Locked(_)) = (verdict, this) {
                verdict = this;
            }
            lockouts::Entity::update(row(tenant, &storage_key, &counter, now))
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        Ok(verdict)
    }

    /// The attempt succeeded: the account's keys start over, the IP's reservation is
    /// returned.
    pub async fn attempt_succeeded(
        &self,
        tenant: Uuid,
        keys: &[CounterKey],
        now: OffsetDateTime,
    ) -> Result<(), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        for key in keys {
            let storage_key = key.storage_key();
            let mut select = lockouts::Entity::find()
                .filter(lockouts::Column::TenantId.eq(tenant))
                .filter(lockouts::Column::ScopeKey.eq(storage_key.clone()));
            if self.db.get_database_backend() == DbBackend::Postgres {
                select = select.lock_exclusive();
            }
            if let Some(current) = select.one(&txn).await? {
                let mut counter = counter_from(&current);
                counter.succeed(key);
                lockouts::Entity::update(row(tenant, &storage_key, &counter, now))
                    .exec(&txn)
                    .await?;
            }
        }
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
