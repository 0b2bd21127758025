//! The files database: one row per file. Returns domain types.
//!
//! Tenant-scoped work runs in [`penny_platform::db::begin_tenant`] transactions, so on
//! PostgreSQL row level security decides what is visible; every query also filters by
//! tenant itself, which is all the isolation SQLite has. Only the sweep of commits a crash
//! interrupted reads across tenants.

mod entity;
pub mod rewrap;

use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::{ScanStatus, StoredFile};
use entity::files;

/// The files service's database.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
}

fn corrupt() -> DbErr {
    DbErr::Custom("unreadable file row".into())
}

fn file_from(m: files::Model) -> Result<StoredFile, DbErr> {
    Ok(StoredFile {
        id: m.id,
        tenant_id: m.tenant_id,
        workspace_id: m.workspace_id,
        owner_id: m.owner_id,
        display_name: m.display_name,
        content_type: m.content_type,
        size_bytes: u64::try_from(m.size_bytes).map_err(|_| corrupt())?,
        sha256: m.sha256.try_into().map_err(|_| corrupt())?,
        scan_status: ScanStatus::parse(&m.scan_status).ok_or_else(corrupt)?,
        scan_signature: m.scan_signature,
        scanner_version: m.scanner_version,
        scan_time: m.scan_time,
        key_version: u32::try_from(m.key_version).map_err(|_| corrupt())?,
        wrapped_key: m.wrapped_key,
        storage_key: m.storage_key,
        created_at: m.created_at,
    })
}

fn file_row(f: &StoredFile) -> files::ActiveModel {
    files::ActiveModel {
        id: Set(f.id),
        tenant_id: Set(f.tenant_id),
        workspace_id: Set(f.workspace_id),
        owner_id: Set(f.owner_id.clone()),
        display_name: Set(f.display_name.clone()),
        content_type: Set(f.content_type.clone()),
        size_bytes: Set(i64::try_from(f.size_bytes).unwrap_or(i64::MAX)),
        sha256: Set(f.sha256.to_vec()),
        scan_status: Set(f.scan_status.as_str().to_owned()),
        scan_signature: Set(f.scan_signature.clone()),
        scanner_version: Set(f.scanner_version.clone()),
        scan_time: Set(f.scan_time),
        key_version: Set(i32::try_from(f.key_version).unwrap_or(i32::MAX)),
        wrapped_key: Set(f.wrapped_key.clone()),
        storage_key: Set(f.storage_key.clone()),
        committed: Set(false),
        created_at: Set(f.created_at),
    }
}

/// Filters of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this workspace's files.
    pub workspace: Option<Uuid>,
    /// Only this uploader's files.
    pub owner: Option<String>,
    /// Only files in this state.
    pub scan_status: Option<ScanStatus>,
}

impl Store {
    /// Wraps a migrated connection.
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        penny_platform::db::ping(&self.db).await
    }

    /// Records `files` of `tenant`, not yet visible (see [`Self::mark_committed`]).
    pub async fn insert_uncommitted(
        &self,
        tenant: Uuid,
        files: &[StoredFile],
    ) -> Result<(), DbErr> {
        if files.is_empty() {
            return Ok(());
        }
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        files::Entity::insert_many(files.iter().map(file_row))
            .exec(&txn)
            .await?;
        txn.commit().await
    }

    /// Makes recorded files visible once their objects are in place; fails, changing
    /// nothing, unless every one of them is still recorded (the sweep of another replica
    /// may have removed a row it took for a crash's).
    pub async fn mark_committed(&self, tenant: Uuid, ids: &[Uuid]) -> Result<(), DbErr> {
        if ids.is_empty() {
            return Ok(());
        }
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let updated = files::Entity::update_many()
            .col_expr(
                files::Column::Committed,
                sea_orm::sea_query::Expr::value(true),
            )
            .filter(files::Column::TenantId.eq(tenant))
            .filter(files::Column::Id.is_in(ids.iter().copied()))
            .filter(files::Column::Committed.eq(false))
            .exec(&txn)
            .await?;
        if updated.rows_affected != ids.len() as u64 {
            txn.rollback().await?;
            return Err(DbErr::Custom(
                "a recorded file vanished before its commit".into(),
            ));
        }
        txn.commit().await
    }

    /// Deletes the rows of an upload that failed, whether or not they were made visible
    /// (a commit whose answer was lost may have happened).
    pub async fn delete_failed(&self, tenant: Uuid, ids: &[Uuid]) -> Result<(), DbErr> {
        if ids.is_empty() {
            return Ok(());
        }
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        files::Entity::delete_many()
            .filter(files::Column::TenantId.eq(tenant))
            .filter(files::Column::Id.is_in(ids.iter().copied()))
            .exec(&txn)
            .await?;
        txn.commit().await
    }

    /// Forgets recorded files whose commit did not finish.
    pub async fn delete_uncommitted(&self, tenant: Uuid, ids: &[Uuid]) -> Result<(), DbErr> {
        if ids.is_empty() {
            return Ok(());
        }
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        files::Entity::delete_many()
            .filter(files::Column::TenantId.eq(tenant))
            .filter(files::Column::Id.is_in(ids.iter().copied()))
            .filter(files::Column::Committed.eq(false))
            .exec(&txn)
            .await?;
        txn.commit().await
    }

    /// A visible file of `tenant`.
    pub async fn get(&self, tenant: Uuid, id: Uuid) -> Result<Option<StoredFile>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let row = files::Entity::find_by_id(id)
            .filter(files::Column::TenantId.eq(tenant))
            .filter(files::Column::Committed.eq(true))
            .one(&txn)
            .await?;
        txn.commit().await?;
        row.map(file_from).transpose()
    }

    /// A page of `tenant`'s visible files, newest first, after the file `before`.
    pub async fn list(
        &self,
        tenant: Uuid,
        filter: &ListFilter,
        before: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<StoredFile>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut query = files::Entity::find()
            .filter(files::Column::TenantId.eq(tenant))
            .filter(files::Column::Committed.eq(true));
        if let Some(workspace) = filter.workspace {
            query = query.filter(files::Column::WorkspaceId.eq(workspace));
        }
        if let Some(owner) = &filter.owner {
            query = query.filter(files::Column::OwnerId.eq(owner.as_str()));
        }
        if let Some(status) = filter.scan_status {
            query = query.filter(files::Column::ScanStatus.eq(status.as_str()));
        }
        if let Some(before) = before {
            query = query.filter(files::Column::Id.lt(before));
        }
        let rows = query
            .order_by_desc(files::Column::Id)
            .limit(limit)
            .all(&txn)
            .await?;
        txn.commit().await?;
        rows.into_iter().map(file_from).collect()
    }

    /// Starts deleting a visible file: hides its row and drops its wrapped data key, which
    /// makes the object unreadable at once; returns the row (its object is the caller's to
    /// delete, then the row, with [`Store::delete_uncommitted`]). A row left so, because
    /// removing the object failed, is a later sweep's. One statement
    /// (`UPDATE … RETURNING`): on SQLite a read before the write would fail with "database
    /// is locked" when another writer got in between.
    pub async fn hide_for_deletion(
        &self,
        tenant: Uuid,
        id: Uuid,
    ) -> Result<Option<StoredFile>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let rows = files::Entity::update_many()
            .col_expr(
                files::Column::Committed,
                sea_orm::sea_query::Expr::value(false),
            )
            .col_expr(
                files::Column::WrappedKey,
                sea_orm::sea_query::Expr::value(""),
            )
            .filter(files::Column::TenantId.eq(tenant))
            .filter(files::Column::Id.eq(id))
            .filter(files::Column::Committed.eq(true))
            .exec_with_returning(&txn)
            .await?;
        txn.commit().await?;
        rows.into_iter().next().map(file_from).transpose()
    }

    /// Hides up to `limit` of `tenant`'s visible files at once, oldest first, dropping their
    /// wrapped data keys (as [`Store::hide_for_deletion`] does one), for the tenant's purge;
    /// returns them. One statement, so SQLite takes its write lock before it reads.
    pub async fn hide_tenant_files(
        &self,
        tenant: Uuid,
        limit: u64,
    ) -> Result<Vec<StoredFile>, DbErr> {
        use sea_orm::sea_query::{Expr, Query};
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let page = Query::select()
            .column(files::Column::Id)
            .from(files::Entity)
            .and_where(files::Column::TenantId.eq(tenant))
            .and_where(files::Column::Committed.eq(true))
            .order_by(files::Column::Id, sea_orm::Order::Asc)
            .limit(limit)
            .to_owned();
        let rows = files::Entity::update_many()
            .col_expr(files::Column::Committed, Expr::value(false))
            .col_expr(files::Column::WrappedKey, Expr::value(""))
            .filter(files::Column::TenantId.eq(tenant))
            .filter(files::Column::Committed.eq(true))
            .filter(files::Column::Id.in_subquery(page))
            .exec_with_returning(&txn)
            .await?;
        txn.commit().await?;
        rows.into_iter().map(file_from).collect()
    }

    /// Rows whose commit a crash interrupted: recorded before `cutoff` and never made
    /// visible (every tenant; for the sweep).
    pub async fn stale_uncommitted(
        &self,
        cutoff: OffsetDateTime,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<StoredFile>, DbErr> {
        let txn = penny_platform::db::begin_platform(&self.db).await?;
        let mut query = files::Entity::find()
            .filter(files::Column::Committed.eq(false))
            .filter(files::Column::CreatedAt.lt(cutoff));
        if let Some(after) = after {
            query = query.filter(files::Column::Id.gt(after));
        }
        let rows = query
            .order_by_asc(files::Column::Id)
            .limit(limit)
            .all(&txn)
            .await?;
        txn.commit().await?;
        rows.into_iter().map(file_from).collect()
    }
}
