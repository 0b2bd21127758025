//! Tenants, their users and workspaces, and the platform tenant.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, boolean, integer, string, string_null, text, timestamp_with_time_zone, uuid,
    uuid_null,
};
use sea_orm_migration::sea_orm::prelude::TimeDateTimeWithTimeZone;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tenants {
    Table,
    TenantId,
    Name,
    Slug,
    Plan,
    MfaRequired,
    SessionLifetimeSecs,
    LockoutThreshold,
    LockoutWindowSecs,
    LockoutDurationSecs,
    State,
    Saga,
    Platform,
    RequestId,
    OwnerId,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum TenantUsers {
    Table,
    Id,
    TenantId,
    Email,
    EmailKey,
    DisplayName,
    Status,
    SuspendReason,
    SuspendAlertId,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum TenantWorkspaces {
    Table,
    Id,
    TenantId,
    Name,
    NameKey,
    Description,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Tenants::Table)
                    .if_not_exists()
                    .col(uuid(Tenants::TenantId).primary_key())
                    .col(string(Tenants::Name))
                    .col(string(Tenants::Slug).unique_key())
                    .col(string(Tenants::Plan))
                    .col(boolean(Tenants::MfaRequired))
                    .col(big_integer(Tenants::SessionLifetimeSecs))
                    .col(integer(Tenants::LockoutThreshold))
                    .col(big_integer(Tenants::LockoutWindowSecs))
                    .col(big_integer(Tenants::LockoutDurationSecs))
                    .col(string(Tenants::State))
                    .col(string(Tenants::Saga))
                    .col(boolean(Tenants::Platform))
                    .col(uuid_null(Tenants::RequestId).unique_key())
                    .col(uuid_null(Tenants::OwnerId))
                    .col(timestamp_with_time_zone(Tenants::CreatedAt))
                    .col(timestamp_with_time_zone(Tenants::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(TenantUsers::Table)
                    .if_not_exists()
                    .col(uuid(TenantUsers::Id).primary_key())
                    .col(uuid(TenantUsers::TenantId))
                    .col(string(TenantUsers::Email))
                    .col(string_null(TenantUsers::EmailKey))
                    .col(string(TenantUsers::DisplayName))
                    .col(string(TenantUsers::Status))
                    .col(text(TenantUsers::SuspendReason))
                    .col(uuid_null(TenantUsers::SuspendAlertId))
                    .col(timestamp_with_time_zone(TenantUsers::CreatedAt))
                    .col(timestamp_with_time_zone(TenantUsers::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("tenant_users_email_unique")
                    .table(TenantUsers::Table)
                    .col(TenantUsers::TenantId)
                    .col(TenantUsers::EmailKey)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(TenantWorkspaces::Table)
                    .if_not_exists()
                    .col(uuid(TenantWorkspaces::Id).primary_key())
                    .col(uuid(TenantWorkspaces::TenantId))
                    .col(string(TenantWorkspaces::Name))
                    .col(string(TenantWorkspaces::NameKey))
                    .col(text(TenantWorkspaces::Description))
                    .col(timestamp_with_time_zone(TenantWorkspaces::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("tenant_workspaces_name_unique")
                    .table(TenantWorkspaces::Table)
                    .col(TenantWorkspaces::TenantId)
                    .col(TenantWorkspaces::NameKey)
                    .unique()
                    .to_owned(),
            )
            .await?;
        // The platform tenant holds the platform's staff. It exists from the start, is
        // never deleted, and requires MFA.
        let now = TimeDateTimeWithTimeZone::now_utc();
        manager
            .exec_stmt(
                Query::insert()
                    .into_table(Tenants::Table)
                    .columns([
                        Tenants::TenantId,
                        Tenants::Name,
                        Tenants::Slug,
                        Tenants::Plan,
                        Tenants::MfaRequired,
                        Tenants::SessionLifetimeSecs,
                        Tenants::LockoutThreshold,
                        Tenants::LockoutWindowSecs,
                        Tenants::LockoutDurationSecs,
                        Tenants::State,
                        Tenants::Saga,
                        Tenants::Platform,
                        Tenants::CreatedAt,
                        Tenants::UpdatedAt,
                    ])
                    .values_panic([
                        penny_platform::principal::PLATFORM_TENANT_ID.into(),
                        "Platform".into(),
                        crate::domain::PLATFORM_SLUG.into(),
                        "enterprise".into(),
                        true.into(),
                        (8i64 * 3600).into(),
                        5i32.into(),
                        300i64.into(),
                        900i64.into(),
                        "active".into(),
                        "".into(),
                        true.into(),
                        now.into(),
                        now.into(),
                    ])
                    .to_owned(),
            )
            .await
    }
}
