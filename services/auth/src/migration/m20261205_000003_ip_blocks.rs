//! The IP block list: per tenant, and global (stored under the nil tenant id).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    string, text, timestamp_with_time_zone, timestamp_with_time_zone_null, uuid,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AuthIpBlocks {
    Table,
    TenantId,
    Cidr,
    Reason,
    CreatorId,
    CreatedAt,
    ExpiresAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuthIpBlocks::Table)
                    .if_not_exists()
                    .col(uuid(AuthIpBlocks::TenantId))
                    // Normalised network/prefix text, e.g. `203.0.113.0/24`.
                    .col(string(AuthIpBlocks::Cidr))
                    .col(text(AuthIpBlocks::Reason))
                    .col(string(AuthIpBlocks::CreatorId))
                    .col(timestamp_with_time_zone(AuthIpBlocks::CreatedAt))
                    .col(timestamp_with_time_zone_null(AuthIpBlocks::ExpiresAt))
                    .primary_key(
                        Index::create()
                            .col(AuthIpBlocks::TenantId)
                            .col(AuthIpBlocks::Cidr),
                    )
                    .to_owned(),
            )
            .await?;
        penny_platform::db::enable_row_level_security(manager, &["auth_ip_blocks"]).await
    }
}
