//! API keys: only the SHA-256 of each secret is stored, beside a visible prefix.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    string, text, timestamp_with_time_zone, timestamp_with_time_zone_null, uuid,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AuthApiKeys {
    Table,
    Id,
    TenantId,
    Name,
    Prefix,
    SecretHash,
    Roles,
    CreatorId,
    CreatedAt,
    ExpiresAt,
    LastUsedAt,
    RevokedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuthApiKeys::Table)
                    .if_not_exists()
                    .col(uuid(AuthApiKeys::Id).primary_key())
                    .col(uuid(AuthApiKeys::TenantId))
                    .col(string(AuthApiKeys::Name))
                    .col(string(AuthApiKeys::Prefix))
                    // SHA-256 of the secret, hex; never the secret.
                    .col(string(AuthApiKeys::SecretHash).unique_key())
                    // JSON array of role names.
                    .col(text(AuthApiKeys::Roles))
                    .col(string(AuthApiKeys::CreatorId))
                    .col(timestamp_with_time_zone(AuthApiKeys::CreatedAt))
                    .col(timestamp_with_time_zone_null(AuthApiKeys::ExpiresAt))
                    .col(timestamp_with_time_zone_null(AuthApiKeys::LastUsedAt))
                    .col(timestamp_with_time_zone_null(AuthApiKeys::RevokedAt))
                    .to_owned(),
            )
            .await?;
        penny_platform::db::enable_row_level_security(manager, &["auth_api_keys"]).await
    }
}
