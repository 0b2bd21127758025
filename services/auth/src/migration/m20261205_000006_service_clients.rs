//! Service clients: the fleet's own services and internal callers, which trade a client id
//! and secret for a short-lived service token. Only the secret's SHA-256 is stored.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    string, text, timestamp_with_time_zone, timestamp_with_time_zone_null, uuid,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AuthServiceClients {
    Table,
    ClientId,
    TenantId,
    Name,
    SecretHash,
    Scopes,
    CreatedAt,
    RevokedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuthServiceClients::Table)
                    .if_not_exists()
                    .col(uuid(AuthServiceClients::ClientId).primary_key())
                    // Always the platform tenant: clients are the fleet's.
                    .col(uuid(AuthServiceClients::TenantId))
                    .col(string(AuthServiceClients::Name))
                    // SHA-256 of the secret, hex; never the secret.
                    .col(string(AuthServiceClients::SecretHash))
                    // Space-separated scopes the client may ask for.
                    .col(text(AuthServiceClients::Scopes))
                    .col(timestamp_with_time_zone(AuthServiceClients::CreatedAt))
                    .col(timestamp_with_time_zone_null(AuthServiceClients::RevokedAt))
                    .to_owned(),
            )
            .await?;
        penny_platform::db::enable_row_level_security(manager, &["auth_service_clients"]).await
    }
}
