//! Lockout counters.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    integer, string, timestamp_with_time_zone, timestamp_with_time_zone_null, uuid,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AuthLockouts {
    Table,
    TenantId,
    ScopeKey,
    Failures,
    WindowStart,
    LockedUntil,
    Lockouts,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuthLockouts::Table)
                    .if_not_exists()
                    .col(uuid(AuthLockouts::TenantId))
                    .col(string(AuthLockouts::ScopeKey))
                    .col(integer(AuthLockouts::Failures))
                    .col(timestamp_with_time_zone(AuthLockouts::WindowStart))
                    .col(timestamp_with_time_zone_null(AuthLockouts::LockedUntil))
                    .col(integer(AuthLockouts::Lockouts))
                    .col(timestamp_with_time_zone(AuthLockouts::UpdatedAt))
                    .primary_key(
                        Index::create()
                            .col(AuthLockouts::TenantId)
                            .col(AuthLockouts::ScopeKey),
                    )
                    .to_owned(),
            )
            .await
    }
}
