//! Custom roles, role bindings, and the change feed with its revision counter.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, integer, string, text, timestamp_with_time_zone, uuid,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AuthzRoles {
    Table,
    TenantId,
    Name,
    Description,
    Permissions,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum AuthzBindings {
    Table,
    Id,
    TenantId,
    SubjectKind,
    SubjectId,
    SubjectTenantId,
    Role,
    WorkspaceId,
    GranterId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum AuthzChanges {
    Table,
    Revision,
    TenantId,
    Kind,
    Payload,
    CreatedAt,
}

#[derive(DeriveIden)]
enum AuthzRevision {
    Table,
    Id,
    Value,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuthzRoles::Table)
                    .if_not_exists()
                    .col(uuid(AuthzRoles::TenantId))
                    .col(string(AuthzRoles::Name))
                    .col(text(AuthzRoles::Description))
                    // JSON array of grants.
                    .col(text(AuthzRoles::Permissions))
                    .col(timestamp_with_time_zone(AuthzRoles::CreatedAt))
                    .col(timestamp_with_time_zone(AuthzRoles::UpdatedAt))
                    .primary_key(
                        Index::create()
                            .col(AuthzRoles::TenantId)
                            .col(AuthzRoles::Name),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuthzBindings::Table)
                    .if_not_exists()
                    .col(uuid(AuthzBindings::Id).primary_key())
                    .col(uuid(AuthzBindings::TenantId))
                    .col(string(AuthzBindings::SubjectKind))
                    .col(string(AuthzBindings::SubjectId))
                    .col(uuid(AuthzBindings::SubjectTenantId))
                    .col(string(AuthzBindings::Role))
                    // '' for a tenant-wide binding: NULLs would defeat the unique index.
                    .col(string(AuthzBindings::WorkspaceId))
                    .col(string(AuthzBindings::GranterId))
                    .col(timestamp_with_time_zone(AuthzBindings::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("authz_bindings_unique")
                    .table(AuthzBindings::Table)
                    .col(AuthzBindings::TenantId)
                    .col(AuthzBindings::SubjectKind)
                    .col(AuthzBindings::SubjectId)
                    .col(AuthzBindings::Role)
                    .col(AuthzBindings::WorkspaceId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuthzChanges::Table)
                    .if_not_exists()
                    .col(big_integer(AuthzChanges::Revision).primary_key())
                    .col(uuid(AuthzChanges::TenantId))
                    .col(string(AuthzChanges::Kind))
                    .col(text(AuthzChanges::Payload))
                    .col(timestamp_with_time_zone(AuthzChanges::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuthzRevision::Table)
                    .if_not_exists()
                    .col(integer(AuthzRevision::Id).primary_key())
                    .col(big_integer(AuthzRevision::Value))
                    .to_owned(),
            )
            .await?;
        manager
            .exec_stmt(
                Query::insert()
                    .into_table(AuthzRevision::Table)
                    .columns([AuthzRevision::Id, AuthzRevision::Value])
                    .values_panic([1.into(), 0i64.into()])
                    .to_owned(),
            )
            .await
    }
}
