//! Token-signing keys: the private half sealed through KeyService (platform tenant,
//! purpose `signing-key`, the key id), published from before they sign until every token
//! they signed has expired.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    string, text, timestamp_with_time_zone, timestamp_with_time_zone_null, uuid,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AuthSigningKeys {
    Table,
    Kid,
    TenantId,
    PublicKey,
    PrivateCiphertext,
    CreatedAt,
    ActivatesAt,
    RetiredAt,
    ExpiresAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuthSigningKeys::Table)
                    .if_not_exists()
                    .col(string(AuthSigningKeys::Kid).primary_key())
                    // Always the platform tenant: the keys are the fleet's.
                    .col(uuid(AuthSigningKeys::TenantId))
                    // The public key, base64url (the JWK `x`).
                    .col(string(AuthSigningKeys::PublicKey))
                    .col(text(AuthSigningKeys::PrivateCiphertext))
                    .col(timestamp_with_time_zone(AuthSigningKeys::CreatedAt))
                    // Published from creation; signs from here on.
                    .col(timestamp_with_time_zone(AuthSigningKeys::ActivatesAt))
                    .col(timestamp_with_time_zone_null(AuthSigningKeys::RetiredAt))
                    // No longer published after this.
                    .col(timestamp_with_time_zone_null(AuthSigningKeys::ExpiresAt))
                    .to_owned(),
            )
            .await?;
        penny_platform::db::enable_row_level_security(manager, &["auth_signing_keys"]).await
    }
}
