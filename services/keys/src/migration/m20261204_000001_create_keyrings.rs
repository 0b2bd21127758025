//! Keyrings and their versions.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{binary, boolean, integer, string, timestamp_with_time_zone, uuid};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Keyrings {
    Table,
    TenantId,
    Backend,
    LatestVersion,
    MinDecryptionVersion,
    MinEncryptionVersion,
    DeletionAllowed,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum KeyVersions {
    Table,
    TenantId,
    Version,
    WrappedKey,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Keyrings::Table)
                    .if_not_exists()
                    .col(uuid(Keyrings::TenantId).primary_key())
                    .col(string(Keyrings::Backend))
                    .col(integer(Keyrings::LatestVersion))
                    .col(integer(Keyrings::MinDecryptionVersion))
                    .col(integer(Keyrings::MinEncryptionVersion))
                    .col(boolean(Keyrings::DeletionAllowed))
                    .col(timestamp_with_time_zone(Keyrings::CreatedAt))
                    .col(timestamp_with_time_zone(Keyrings::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(KeyVersions::Table)
                    .if_not_exists()
                    .col(uuid(KeyVersions::TenantId))
                    .col(integer(KeyVersions::Version))
                    // The version key wrapped by the tenant's KEK (local engine); empty for
                    // Vault, which keeps its own material.
                    .col(binary(KeyVersions::WrappedKey))
                    .col(timestamp_with_time_zone(KeyVersions::CreatedAt))
                    .primary_key(
                        Index::create()
                            .col(KeyVersions::TenantId)
                            .col(KeyVersions::Version),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(KeyVersions::Table, KeyVersions::TenantId)
                            .to(Keyrings::Table, Keyrings::TenantId)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }
}
