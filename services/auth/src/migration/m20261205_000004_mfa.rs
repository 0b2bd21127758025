//! TOTP MFA: the secret (encrypted through KeyService), recovery codes (hashed), and
//! sign-in challenges waiting for a second factor (by token hash).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, string, text, timestamp_with_time_zone, timestamp_with_time_zone_null, uuid,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AuthMfa {
    Table,
    TenantId,
    UserId,
    State,
    SecretCiphertext,
    LastStep,
    PendingExpiresAt,
    CreatedAt,
    ConfirmedAt,
}

#[derive(DeriveIden)]
enum AuthRecoveryCodes {
    Table,
    TenantId,
    UserId,
    CodeHash,
    UsedAt,
}

#[derive(DeriveIden)]
enum AuthMfaChallenges {
    Table,
    TokenHash,
    TenantId,
    UserId,
    IpAddress,
    ExpiresAt,
    UsedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuthMfa::Table)
                    .if_not_exists()
                    .col(uuid(AuthMfa::TenantId))
                    .col(uuid(AuthMfa::UserId))
                    // `pending` until the first code confirms it, then `active`.
                    .col(string(AuthMfa::State))
                    // KeyService ciphertext (context: tenant, purpose `mfa`, the user).
                    .col(text(AuthMfa::SecretCiphertext))
                    // The newest TOTP step accepted: each step works once (compare-and-set).
                    .col(big_integer(AuthMfa::LastStep))
                    .col(timestamp_with_time_zone_null(AuthMfa::PendingExpiresAt))
                    .col(timestamp_with_time_zone(AuthMfa::CreatedAt))
                    .col(timestamp_with_time_zone_null(AuthMfa::ConfirmedAt))
                    .primary_key(Index::create().col(AuthMfa::TenantId).col(AuthMfa::UserId))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuthRecoveryCodes::Table)
                    .if_not_exists()
                    .col(uuid(AuthRecoveryCodes::TenantId))
                    .col(uuid(AuthRecoveryCodes::UserId))
                    // SHA-256 of the user id and the code; never the code.
                    .col(string(AuthRecoveryCodes::CodeHash))
                    .col(timestamp_with_time_zone_null(AuthRecoveryCodes::UsedAt))
                    .primary_key(
                        Index::create()
                            .col(AuthRecoveryCodes::TenantId)
                            .col(AuthRecoveryCodes::UserId)
                            .col(AuthRecoveryCodes::CodeHash),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuthMfaChallenges::Table)
                    .if_not_exists()
                    .col(string(AuthMfaChallenges::TokenHash).primary_key())
                    .col(uuid(AuthMfaChallenges::TenantId))
                    .col(uuid(AuthMfaChallenges::UserId))
                    .col(string(AuthMfaChallenges::IpAddress))
                    .col(timestamp_with_time_zone(AuthMfaChallenges::ExpiresAt))
                    .col(timestamp_with_time_zone_null(AuthMfaChallenges::UsedAt))
                    .to_owned(),
            )
            .await?;
        penny_platform::db::enable_row_level_security(
            manager,
            &["auth_mfa", "auth_recovery_codes", "auth_mfa_challenges"],
        )
        .await
    }
}
