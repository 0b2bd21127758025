//! Rewrap jobs and the rows they move.

use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect,
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::entity::{files, rewrap_jobs};
use super::{Store, corrupt};
use crate::domain::{RewrapJob, RewrapState};

fn job_from(m: rewrap_jobs::Model) -> Result<RewrapJob, DbErr> {
    Ok(RewrapJob {
        tenant_id: m.tenant_id,
        state: RewrapState::parse(&m.state).ok_or_else(corrupt)?,
        target_key_version: u32::try_from(m.target_key_version).map_err(|_| corrupt())?,
        total_files: u64::try_from(m.total_files).map_err(|_| corrupt())?,
        rewrapped_files: u64::try_from(m.rewrapped_files).map_err(|_| corrupt())?,
        failed_files: u64::try_from(m.failed_files).map_err(|_| corrupt())?,
        started_at: m.started_at,
        ended_at: m.ended_at,
        lease_until: m.lease_until,
    })
}

fn job_row(j: &RewrapJob) -> rewrap_jobs::ActiveModel {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    rewrap_jobs::ActiveModel {
        tenant_id: Set(j.tenant_id),
        state: Set(j.state.as_str().to_owned()),
        target_key_version: Set(i32::try_from(j.target_key_version).unwrap_or(i32::MAX)),
        total_files: Set(count(j.total_files)),
        rewrapped_files: Set(count(j.rewrapped_files)),
        failed_files: Set(count(j.failed_files)),
        started_at: Set(j.started_at),
        ended_at: Set(j.ended_at),
        lease_until: Set(j.lease_until),
    }
}

/// A file as the rewrap sees it.
#[derive(Debug, Clone)]
pub struct WrappedKey {
    /// The file.
    pub id: Uuid,
    /// Its wrapped data key.
    pub wrapped_key: String,
}

impl Store {
    /// The tenant's rewrap job, if it ever had one.
    pub async fn rewrap_job(&self, tenant: Uuid) -> Result<Option<RewrapJob>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let row = rewrap_jobs::Entity::find_by_id(tenant)
            .filter(rewrap_jobs::Column::TenantId.eq(tenant))
            .one(&txn)
            .await?;
        txn.commit().await?;
        row.map(job_from).transpose()
    }

    /// Starts (or resumes) the tenant's job as `job` unless another replica holds a
    /// running one whose lease has not passed; returns the job as it now stands and
    /// whether this call took it.
    pub async fn claim_rewrap_job(
        &self,
        job: &RewrapJob,
        now: OffsetDateTime,
    ) -> Result<(RewrapJob, bool), DbErr> {
        let tenant = job.tenant_id;
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut select = rewrap_jobs::Entity::find_by_id(tenant)
            .filter(rewrap_jobs::Column::TenantId.eq(tenant));
        if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
            select = select.lock_exclusive();
        } else {
            // SQLite: take the write lock before reading, or the write after the read
            // fails with "database is locked" when another writer got in between.
            rewrap_jobs::Entity::update_many()
                .col_expr(
                    rewrap_jobs::Column::TenantId,
                    sea_orm::sea_query::Expr::col(rewrap_jobs::Column::TenantId),
                )
                .filter(rewrap_jobs::Column::TenantId.eq(tenant))
                .exec(&txn)
                .await?;
        }
        let current = select.one(&txn).await?.map(job_from).transpose()?;
        match current {
            Some(current) if current.state == RewrapState::Running && current.lease_until > now => {
                txn.commit().await?;
                return Ok((current, false));
            }
            Some(_) => {
                // The primary key is the tenant: this updates exactly its row.
                rewrap_jobs::Entity::update(job_row(job)).exec(&txn).await?;
            }
            None => {
                rewrap_jobs::Entity::insert(job_row(job)).exec(&txn).await?;
            }
        }
        txn.commit().await?;
        Ok((job.clone(), true))
    }

    /// Writes the job's progress (and its extended lease, or its end) if this run still
    /// holds it; false if it does not. The claim's start time is the fencing token: a
    /// replica whose lease passed and whose job another replica claimed writes nothing.
    pub async fn save_rewrap_job(&self, job: &RewrapJob) -> Result<bool, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, job.tenant_id).await?;
        let saved = rewrap_jobs::Entity::update_many()
            .set(job_row(job))
            .filter(rewrap_jobs::Column::TenantId.eq(job.tenant_id))
            .filter(rewrap_jobs::Column::State.eq(RewrapState::Running.as_str()))
            .filter(rewrap_jobs::Column::StartedAt.eq(job.started_at))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(saved.rows_affected == 1)
    }

    /// Up to `limit` visible files of `tenant` whose data key is below `target`, after the
    /// file `after`, in id order.
    pub async fn files_below(
        &self,
        tenant: Uuid,
        target: u32,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<WrappedKey>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut query = files::Entity::find()
            .filter(files::Column::TenantId.eq(tenant))
            .filter(files::Column::Committed.eq(true))
            .filter(files::Column::KeyVersion.lt(i32::try_from(target).unwrap_or(i32::MAX)));
        if let Some(after) = after {
            query = query.filter(files::Column::Id.gt(after));
        }
        let rows = query
            .order_by_asc(files::Column::Id)
            .limit(limit)
            .all(&txn)
            .await?;
        txn.commit().await?;
        Ok(rows
            .into_iter()
            .map(|m| WrappedKey {
                id: m.id,
                wrapped_key: m.wrapped_key,
            })
            .collect())
    }

    /// Replaces a file's wrapped data key, if it is still `old` (a concurrent rewrap or
    /// deletion wins); returns whether it was replaced.
    pub async fn set_wrapped_key(
        &self,
        tenant: Uuid,
        id: Uuid,
        old: &str,
        new: &str,
        version: u32,
    ) -> Result<bool, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let result = files::Entity::update_many()
            .col_expr(
                files::Column::WrappedKey,
                sea_orm::sea_query::Expr::value(new),
            )
            .col_expr(
                files::Column::KeyVersion,
                sea_orm::sea_query::Expr::value(i32::try_from(version).unwrap_or(i32::MAX)),
            )
            .filter(files::Column::TenantId.eq(tenant))
            .filter(files::Column::Id.eq(id))
            .filter(files::Column::Committed.eq(true))
            .filter(files::Column::WrappedKey.eq(old))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(result.rows_affected == 1)
    }

    /// A page of the tenants that have visible files, in id order after `after`, each with
    /// the lowest key version its files use (the background rewrap's view across tenants).
    pub async fn lowest_key_versions(
        &self,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<(Uuid, u32)>, DbErr> {
        let txn = penny_platform::db::begin_platform(&self.db).await?;
        let mut query = files::Entity::find()
            .select_only()
            .column(files::Column::TenantId)
            .column_as(files::Column::KeyVersion.min(), "lowest")
            .filter(files::Column::Committed.eq(true));
        if let Some(after) = after {
            query = query.filter(files::Column::TenantId.gt(after));
        }
        let rows: Vec<(Uuid, i32)> = query
            .group_by(files::Column::TenantId)
            .order_by_asc(files::Column::TenantId)
            .limit(limit)
            .into_tuple()
            .all(&txn)
            .await?;
        txn.commit().await?;
        rows.into_iter()
            .map(|(tenant, lowest)| Ok((tenant, u32::try_from(lowest).map_err(|_| corrupt())?)))
            .collect()
    }

    /// How many visible files `tenant` has, how many are at `target` or newer, and the
    /// lowest key version any of them uses.
    pub async fn key_versions(
        &self,
        tenant: Uuid,
        target: u32,
    ) -> Result<(u64, u64, Option<u32>), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let visible = || {
            files::Entity::find()
                .filter(files::Column::TenantId.eq(tenant))
                .filter(files::Column::Committed.eq(true))
        };
        let total = visible().count(&txn).await?;
        let current = visible()
            .filter(files::Column::KeyVersion.gte(i32::try_from(target).unwrap_or(i32::MAX)))
            .count(&txn)
            .await?;
        let lowest = visible()
            .order_by_asc(files::Column::KeyVersion)
            .one(&txn)
            .await?
            .map(|m| u32::try_from(m.key_version).map_err(|_| corrupt()))
            .transpose()?;
        txn.commit().await?;
        Ok((total, current, lowest))
    }
}
