//! Files: one row per stored file, holding its metadata and its wrapped data key (never
//! the key itself, never content).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, binary, boolean, integer, string, text, timestamp_with_time_zone,
    timestamp_with_time_zone_null, uuid, uuid_null,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Files {
    Table,
    Id,
    TenantId,
    WorkspaceId,
    OwnerId,
    DisplayName,
    ContentType,
    SizeBytes,
    Sha256,
    ScanStatus,
    ScanSignature,
    ScannerVersion,
    ScanTime,
    KeyVersion,
    WrappedKey,
    StorageKey,
    Committed,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Files::Table)
                    .if_not_exists()
                    .col(uuid(Files::Id).primary_key())
                    .col(uuid(Files::TenantId))
                    .col(uuid_null(Files::WorkspaceId))
                    .col(string(Files::OwnerId))
                    .col(text(Files::DisplayName))
                    .col(string(Files::ContentType))
                    .col(big_integer(Files::SizeBytes))
                    .col(binary(Files::Sha256))
                    .col(string(Files::ScanStatus))
                    .col(text(Files::ScanSignature))
                    .col(text(Files::ScannerVersion))
                    .col(timestamp_with_time_zone_null(Files::ScanTime))
                    .col(integer(Files::KeyVersion))
                    .col(text(Files::WrappedKey))
                    .col(string(Files::StorageKey).unique_key())
                    // False between recording a file and moving its object into place:
                    // invisible, and swept when a crash leaves it so.
                    .col(boolean(Files::Committed))
                    .col(timestamp_with_time_zone(Files::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("files_tenant_listing")
                    .table(Files::Table)
                    .col(Files::TenantId)
                    .col(Files::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("files_tenant_key_version")
                    .table(Files::Table)
                    .col(Files::TenantId)
                    .col(Files::KeyVersion)
                    .to_owned(),
            )
            .await
    }
}
