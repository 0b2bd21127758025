//! Rewrap jobs: one row per tenant, the progress of moving its files' data keys to the
//! tenant key's latest version (RewrapTenant), so a job survives restarts and replicas.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, integer, string, timestamp_with_time_zone, timestamp_with_time_zone_null, uuid,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum FileRewrapJobs {
    Table,
    TenantId,
    State,
    TargetKeyVersion,
    TotalFiles,
    RewrappedFiles,
    FailedFiles,
    StartedAt,
    EndedAt,
    LeaseUntil,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(FileRewrapJobs::Table)
                    .if_not_exists()
                    .col(uuid(FileRewrapJobs::TenantId).primary_key())
                    .col(string(FileRewrapJobs::State))
                    .col(integer(FileRewrapJobs::TargetKeyVersion))
                    .col(big_integer(FileRewrapJobs::TotalFiles))
                    .col(big_integer(FileRewrapJobs::RewrappedFiles))
                    .col(big_integer(FileRewrapJobs::FailedFiles))
                    .col(timestamp_with_time_zone(FileRewrapJobs::StartedAt))
                    .col(timestamp_with_time_zone_null(FileRewrapJobs::EndedAt))
                    // While a replica works on the job it holds it until this time, and
                    // extends it as it goes; after it, another replica may take over.
                    .col(timestamp_with_time_zone(FileRewrapJobs::LeaseUntil))
                    .to_owned(),
            )
            .await?;
        penny_platform::db::enable_row_level_security(manager, &["file_rewrap_jobs"]).await
    }
}
