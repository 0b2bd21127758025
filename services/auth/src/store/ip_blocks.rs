//! The IP block list. Global blocks live under the nil tenant id, so row level security
//! scopes them like any tenant's.

use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::Store;
use super::entity::ip_blocks;

/// The tenant id global blocks are stored under.
pub const GLOBAL: Uuid = Uuid::nil();

/// One block as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpBlock {
    /// The tenant, or [`GLOBAL`].
    pub tenant_id: Uuid,
    /// Normalised CIDR text.
    pub cidr: String,
    /// Why.
    pub reason: String,
    /// Who blocked it.
    pub creator_id: String,
    /// When it was created or last replaced.
    pub created_at: OffsetDateTime,
    /// When it lapses.
    pub expires_at: Option<OffsetDateTime>,
}

fn block_from(m: ip_blocks::Model) -> IpBlock {
    IpBlock {
        tenant_id: m.tenant_id,
        cidr: m.cidr,
        reason: m.reason,
        creator_id: m.creator_id,
        created_at: m.created_at,
        expires_at: m.expires_at,
    }
}

impl Store {
    /// Blocks a range, replacing an existing block of the same range and tenant.
    pub async fn put_ip_block(&self, block: &IpBlock) -> Result<(), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, block.tenant_id).await?;
        ip_blocks::Entity::insert(ip_blocks::ActiveModel {
            tenant_id: Set(block.tenant_id),
            cidr: Set(block.cidr.clone()),
            reason: Set(block.reason.clone()),
            creator_id: Set(block.creator_id.clone()),
            created_at: Set(block.created_at),
            expires_at: Set(block.expires_at),
        })
        .on_conflict(
            OnConflict::columns([ip_blocks::Column::TenantId, ip_blocks::Column::Cidr])
                .update_columns([
                    ip_blocks::Column::Reason,
                    ip_blocks::Column::CreatorId,
                    ip_blocks::Column::CreatedAt,
                    ip_blocks::Column::ExpiresAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await
    }

    /// Removes a block; whether there was one (lapsed blocks count as none).
    pub async fn delete_ip_block(
        &self,
        tenant: Uuid,
        cidr: &str,
        now: OffsetDateTime,
    ) -> Result<bool, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let live = ip_blocks::Entity::find_by_id((tenant, cidr.to_owned()))
            .filter(ip_blocks::Column::TenantId.eq(tenant))
            .one(&txn)
            .await?
            .is_some_and(|b| b.expires_at.is_none_or(|t| t > now));
        ip_blocks::Entity::delete_many()
            .filter(ip_blocks::Column::TenantId.eq(tenant))
            .filter(ip_blocks::Column::Cidr.eq(cidr))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(live)
    }

    /// A page of one tenant's (or the global) active blocks, by CIDR text, after `after`.
    pub async fn ip_blocks(
        &self,
        tenant: Uuid,
        now: OffsetDateTime,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<IpBlock>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut query = ip_blocks::Entity::find()
            .filter(ip_blocks::Column::TenantId.eq(tenant))
            .filter(
                sea_orm::Condition::any()
                    .add(ip_blocks::Column::ExpiresAt.is_null())
                    .add(ip_blocks::Column::ExpiresAt.gt(now)),
            );
        if let Some(after) = after {
            query = query.filter(ip_blocks::Column::Cidr.gt(after));
        }
        let rows = query
            .order_by_asc(ip_blocks::Column::Cidr)
            .limit(limit)
            .all(&txn)
            .await?;
        txn.commit().await?;
        Ok(rows.into_iter().map(block_from).collect())
    }
}
