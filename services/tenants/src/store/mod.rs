//! The tenants database: tenants, users and workspaces. Returns domain types.
//!
//! Tenant-scoped work runs in [`penny_platform::db::begin_tenant`] transactions, so on
//! PostgreSQL row level security decides what is visible; every query also filters by
//! tenant itself, which is all the isolation SQLite has. Only platform listings and the
//! idempotency lookup of `CreateTenant` read across tenants.

mod entity;

use std::time::Duration;

use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect, SqlErr,
};
use uuid::Uuid;

use crate::domain::{
    Plan, Saga, SecurityPolicy, Tenant, TenantState, User, UserStatus, Workspace, fold_case,
};
use entity::{tenants, users, workspaces};

/// Why a store write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another tenant has the slug.
    #[error("slug taken")]
    SlugTaken,
    /// A tenant was already created with this request id.
    #[error("request id taken")]
    RequestIdTaken,
    /// Another user of the tenant has the email.
    #[error("email taken")]
    EmailTaken,
    /// Another workspace of the tenant has the name.
    #[error("workspace name taken")]
    NameTaken,
    /// The row does not exist (for this tenant).
    #[error("not found")]
    NotFound,
    /// The tenant is not ACTIVE (being created or deleted).
    #[error("tenant not active")]
    NotActive,
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbErr),
}

/// The tenants service's database.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
}

fn corrupt(what: &str) -> DbErr {
    DbErr::Custom(format!("unreadable {what} row"))
}

fn secs(value: i64) -> Duration {
    Duration::from_secs(u64::try_from(value).unwrap_or(0))
}

fn secs_of(value: Duration) -> i64 {
    i64::try_from(value.as_secs()).unwrap_or(i64::MAX)
}

fn tenant_from(m: tenants::Model) -> Result<Tenant, DbErr> {
    Ok(Tenant {
        id: m.tenant_id,
        name: m.name,
        slug: m.slug,
        plan: Plan::parse(&m.plan).ok_or_else(|| corrupt("tenant"))?,
        policy: SecurityPolicy {
            mfa_required: m.mfa_required,
            session_lifetime: secs(m.session_lifetime_secs),
            lockout_threshold: u32::try_from(m.lockout_threshold).unwrap_or(0),
            lockout_window: secs(m.lockout_window_secs),
            lockout_duration: secs(m.lockout_duration_secs),
        },
        state: TenantState::parse(&m.state).ok_or_else(|| corrupt("tenant"))?,
        saga: Saga::parse(&m.saga).ok_or_else(|| corrupt("tenant"))?,
        platform: m.platform,
        request_id: m.request_id,
        owner_id: m.owner_id,
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

fn tenant_row(t: &Tenant) -> tenants::ActiveModel {
    tenants::ActiveModel {
        tenant_id: Set(t.id),
        name: Set(t.name.clone()),
        slug: Set(t.slug.clone()),
        plan: Set(t.plan.as_str().to_owned()),
        mfa_required: Set(t.policy.mfa_required),
        session_lifetime_secs: Set(secs_of(t.policy.session_lifetime)),
        lockout_threshold: Set(i32::try_from(t.policy.lockout_threshold).unwrap_or(i32::MAX)),
        lockout_window_secs: Set(secs_of(t.policy.lockout_window)),
        lockout_duration_secs: Set(secs_of(t.policy.lockout_duration)),
        state: Set(t.state.as_str().to_owned()),
        saga: Set(t.saga.as_str().to_owned()),
        platform: Set(t.platform),
        request_id: Set(t.request_id),
        owner_id: Set(t.owner_id),
        created_at: Set(t.created_at),
        updated_at: Set(t.updated_at),
    }
}

fn user_from(m: users::Model) -> Result<User, DbErr> {
    Ok(User {
        id: m.id,
        tenant_id: m.tenant_id,
        email: m.email,
        display_name: m.display_name,
        status: UserStatus::parse(&m.status).ok_or_else(|| corrupt("user"))?,
        suspend_reason: m.suspend_reason,
        suspend_alert_id: m.suspend_alert_id,
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

fn user_row(u: &User) -> users::ActiveModel {
    let deleted = u.status == UserStatus::Deleted;
    users::ActiveModel {
        id: Set(u.id),
        tenant_id: Set(u.tenant_id),
        email: Set(u.email.clone()),
        email_key: Set((!deleted).then(|| fold_case(&u.email))),
        display_name: Set(u.display_name.clone()),
        status: Set(u.status.as_str().to_owned()),
        suspend_reason: Set(u.suspend_reason.clone()),
        suspend_alert_id: Set(u.suspend_alert_id),
        created_at: Set(u.created_at),
        updated_at: Set(u.updated_at),
    }
}

fn workspace_from(m: workspaces::Model) -> Workspace {
    Workspace {
        id: m.id,
        tenant_id: m.tenant_id,
        name: m.name,
        description: m.description,
        created_at: m.created_at,
    }
}

/// Maps a unique violation to `taken(message)`, anything else to a database error.
fn unique_or(err: DbErr, taken: impl FnOnce(&str) -> StoreError) -> StoreError {
    match err.sql_err() {
        Some(SqlErr::UniqueConstraintViolation(message)) => taken(&message),
        _ => StoreError::Db(err),
    }
}

/// Takes a row lock where the backend has them (SQLite serializes writers instead).
fn for_update<S: QuerySelect>(select: S, backend: DbBackend) -> S {
    if backend == DbBackend::Postgres {
        select.lock_exclusive()
    } else {
        select
    }
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

    async fn tenant_in(txn: &DatabaseTransaction, id: Uuid) -> Result<Option<Tenant>, DbErr> {
        tenants::Entity::find_by_id(id)
            .filter(tenants::Column::TenantId.eq(id))
            .one(txn)
            .await?
            .map(tenant_from)
            .transpose()
    }

    /// A tenant, read inside its own scope.
    pub async fn tenant(&self, id: Uuid) -> Result<Option<Tenant>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, id).await?;
        let tenant = Self::tenant_in(&txn, id).await?;
        txn.commit().await?;
        Ok(tenant)
    }

    /// The tenant a `CreateTenant` request id made, if any (platform scope: the request id
    /// is all the caller has).
    pub async fn tenant_by_request(&self, request_id: Uuid) -> Result<Option<Tenant>, DbErr> {
        let txn = penny_platform::db::begin_platform(&self.db).await?;
        let tenant = tenants::Entity::find()
            .filter(tenants::Column::RequestId.eq(request_id))
            .one(&txn)
            .await?
            .map(tenant_from)
            .transpose()?;
        txn.commit().await?;
        Ok(tenant)
    }

    /// Inserts a new tenant with its owner, in one transaction scoped to the new tenant.
    pub async fn insert_tenant(&self, tenant: &Tenant, owner: &User) -> Result<(), StoreError> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant.id).await?;
        if let Err(err) = tenants::Entity::insert(tenant_row(tenant))
            .exec_without_returning(&txn)
            .await
        {
            txn.rollback().await?;
            return Err(unique_or(err, |message| {
                if message.contains("request_id") {
                    StoreError::RequestIdTaken
                } else {
                    StoreError::SlugTaken
                }
            }));
        }
        users::Entity::insert(user_row(owner))
            .exec_without_returning(&txn)
            .await?;
        txn.commit().await?;
        Ok(())
    }

    /// Tenants in id order (UUIDv7: creation order), after `after`, at most `limit`.
    pub async fn list_tenants(
        &self,
        state: Option<TenantState>,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<Tenant>, DbErr> {
        let txn = penny_platform::db::begin_platform(&self.db).await?;
        let mut query = tenants::Entity::find();
        query = match state {
            Some(state) => query.filter(tenants::Column::State.eq(state.as_str())),
            None => query.filter(tenants::Column::State.ne(TenantState::Deleted.as_str())),
        };
        if let Some(after) = after {
            query = query.filter(tenants::Column::TenantId.gt(after));
        }
        let rows = query
            .order_by_asc(tenants::Column::TenantId)
            .limit(limit)
            .all(&txn)
            .await?;
        txn.commit().await?;
        rows.into_iter().map(tenant_from).collect()
    }

    /// Reads a tenant under a row lock, lets `change` edit it, and writes it back when
    /// `change` says so. NOT_FOUND when the tenant does not exist.
    pub async fn update_tenant<E: From<StoreError>>(
        &self,
        id: Uuid,
        change: impl FnOnce(&mut Tenant) -> Result<bool, E>,
    ) -> Result<Tenant, E> {
        let txn = penny_platform::db::begin_tenant(&self.db, id)
            .await
            .map_err(StoreError::from)?;
        let select = tenants::Entity::find_by_id(id).filter(tenants::Column::TenantId.eq(id));
        let found = for_update(select, self.db.get_database_backend())
            .one(&txn)
            .await
            .map_err(StoreError::from)?
            .map(tenant_from)
            .transpose()
            .map_err(StoreError::from)?;
        let Some(mut tenant) = found else {
            return Err(StoreError::NotFound.into());
        };
        if change(&mut tenant)? {
            tenant.updated_at = crate::domain::now();
            tenants::Entity::update(tenant_row(&tenant))
                .exec(&txn)
                .await
                .map_err(StoreError::from)?;
        }
        txn.commit().await.map_err(StoreError::from)?;
        Ok(tenant)
    }

    /// Inside a transaction that has just written a row of `tenant`: fails unless the
    /// tenant is ACTIVE, holding its row (PostgreSQL `FOR SHARE`) until commit. A deletion
    /// marks the tenant PENDING under `FOR UPDATE`, so the two are ordered: either the row
    /// lands before the deletion starts (and is tombstoned with the rest), or it is refused.
    /// Writing first keeps SQLite's transaction a writer from its first statement.
    async fn require_active_in(txn: &DatabaseTransaction, tenant: Uuid) -> Result<(), StoreError> {
        let mut select =
            tenants::Entity::find_by_id(tenant).filter(tenants::Column::TenantId.eq(tenant));
        if txn.get_database_backend() == DbBackend::Postgres {
            select = select.lock_shared();
        }
        match select.one(txn).await? {
            Some(row) if row.state == TenantState::Active.as_str() => Ok(()),
            _ => Err(StoreError::NotActive),
        }
    }

    /// A user of `tenant`.
    pub async fn user(&self, tenant: Uuid, id: Uuid) -> Result<Option<User>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let user = users::Entity::find_by_id(id)
            .filter(users::Column::TenantId.eq(tenant))
            .one(&txn)
            .await?
            .map(user_from)
            .transpose()?;
        txn.commit().await?;
        Ok(user)
    }

    /// Inserts a user; `EmailTaken` when the tenant has one with that email.
    pub async fn insert_user(&self, user: &User) -> Result<(), StoreError> {
        let txn = penny_platform::db::begin_tenant(&self.db, user.tenant_id).await?;
        if let Err(err) = users::Entity::insert(user_row(user))
            .exec_without_returning(&txn)
            .await
        {
            txn.rollback().await?;
            return Err(unique_or(err, |_| StoreError::EmailTaken));
        }
        if let Err(err) = Self::require_active_in(&txn, user.tenant_id).await {
            txn.rollback().await?;
            return Err(err);
        }
        txn.commit().await?;
        Ok(())
    }

    /// Removes a user that was never handed out (undoing a half-made `CreateUser`).
    pub async fn remove_new_user(&self, tenant: Uuid, id: Uuid) -> Result<(), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        users::Entity::delete_many()
            .filter(users::Column::TenantId.eq(tenant))
            .filter(users::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        txn.commit().await
    }

    /// A tenant's users with one of `statuses`, optionally one email, in id order.
    pub async fn list_users(
        &self,
        tenant: Uuid,
        statuses: &[UserStatus],
        email: Option<&str>,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<User>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut query = users::Entity::find()
            .filter(users::Column::TenantId.eq(tenant))
            .filter(users::Column::Status.is_in(statuses.iter().map(|s| s.as_str())));
        if let Some(email) = email {
            query = query.filter(users::Column::EmailKey.eq(fold_case(email)));
        }
        if let Some(after) = after {
            query = query.filter(users::Column::Id.gt(after));
        }
        let rows = query
            .order_by_asc(users::Column::Id)
            .limit(limit)
            .all(&txn)
            .await?;
        txn.commit().await?;
        rows.into_iter().map(user_from).collect()
    }

    /// Reads a user under a row lock, lets `change` edit it, and writes it back when
    /// `change` says so.
    pub async fn update_user<E: From<StoreError>>(
        &self,
        tenant: Uuid,
        id: Uuid,
        change: impl FnOnce(&mut User) -> Result<bool, E>,
    ) -> Result<User, E> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant)
            .await
            .map_err(StoreError::from)?;
        let select = users::Entity::find_by_id(id).filter(users::Column::TenantId.eq(tenant));
        let found = for_update(select, self.db.get_database_backend())
            .one(&txn)
            .await
            .map_err(StoreError::from)?
            .map(user_from)
            .transpose()
            .map_err(StoreError::from)?;
        let Some(mut user) = found else {
            return Err(StoreError::NotFound.into());
        };
        if change(&mut user)? {
            user.updated_at = crate::domain::now();
            if let Err(err) = users::Entity::update(user_row(&user)).exec(&txn).await {
                txn.rollback().await.map_err(StoreError::from)?;
                return Err(unique_or(err, |_| StoreError::EmailTaken).into());
            }
        }
        txn.commit().await.map_err(StoreError::from)?;
        Ok(user)
    }

    /// Marks every user of a deleted tenant DELETED and removes their personal data.
    pub async fn tombstone_users(&self, tenant: Uuid) -> Result<u64, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let done = users::Entity::update_many()
            .col_expr(users::Column::Email, "".into())
            .col_expr(users::Column::EmailKey, Option::<String>::None.into())
            .col_expr(users::Column::DisplayName, "".into())
            .col_expr(users::Column::SuspendReason, "".into())
            .col_expr(users::Column::SuspendAlertId, Option::<Uuid>::None.into())
            .col_expr(users::Column::Status, UserStatus::Deleted.as_str().into())
            .col_expr(users::Column::UpdatedAt, crate::domain::now().into())
            .filter(users::Column::TenantId.eq(tenant))
            .filter(users::Column::Status.ne(UserStatus::Deleted.as_str()))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(done.rows_affected)
    }

    /// Inserts a workspace; `NameTaken` when the tenant has one of that name.
    pub async fn insert_workspace(&self, workspace: &Workspace) -> Result<(), StoreError> {
        let txn = penny_platform::db::begin_tenant(&self.db, workspace.tenant_id).await?;
        let inserted = workspaces::Entity::insert(workspaces::ActiveModel {
            id: Set(workspace.id),
            tenant_id: Set(workspace.tenant_id),
            name: Set(workspace.name.clone()),
            name_key: Set(fold_case(&workspace.name)),
            description: Set(workspace.description.clone()),
            created_at: Set(workspace.created_at),
        })
        .exec_without_returning(&txn)
        .await;
        if let Err(err) = inserted {
            txn.rollback().await?;
            return Err(unique_or(err, |_| StoreError::NameTaken));
        }
        if let Err(err) = Self::require_active_in(&txn, workspace.tenant_id).await {
            txn.rollback().await?;
            return Err(err);
        }
        txn.commit().await?;
        Ok(())
    }

    /// A tenant's workspaces by name (case-insensitive), after the name key `after`.
    pub async fn list_workspaces(
        &self,
        tenant: Uuid,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<Workspace>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut query = workspaces::Entity::find().filter(workspaces::Column::TenantId.eq(tenant));
        if let Some(after) = after {
            query = query.filter(workspaces::Column::NameKey.gt(after));
        }
        let rows = query
            .order_by_asc(workspaces::Column::NameKey)
            .limit(limit)
            .all(&txn)
            .await?;
        txn.commit().await?;
        Ok(rows.into_iter().map(workspace_from).collect())
    }
}
