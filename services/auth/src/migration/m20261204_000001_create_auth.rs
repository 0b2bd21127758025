//! Lockout counters, password credentials, set-password tokens and sessions.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    boolean, integer, string, text, timestamp_with_time_zone, timestamp_with_time_zone_null, uuid,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AuthLockouts {
    Table,
    TenantId,
    ScopeKey,
    Failures,
    Pending,
    WindowStart,
    LockedUntil,
    Lockouts,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum AuthCredentials {
    Table,
    TenantId,
    UserId,
    PasswordHash,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum AuthSetPasswordTokens {
    Table,
    TokenHash,
    TenantId,
    UserId,
    ExpiresAt,
    UsedAt,
    CreatedAt,
}

#[derive(DeriveIden)]
enum AuthSessions {
    Table,
    Id,
    TenantId,
    UserId,
    IpAddress,
    UserAgent,
    MfaVerified,
    CreatedAt,
    ExpiresAt,
    RevokedAt,
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
                    .col(integer(AuthLockouts::Pending))
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
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuthCredentials::Table)
                    .if_not_exists()
                    .col(uuid(AuthCredentials::TenantId))
                    .col(uuid(AuthCredentials::UserId))
                    // The argon2id PHC string; never the password.
                    .col(text(AuthCredentials::PasswordHash))
                    .col(timestamp_with_time_zone(AuthCredentials::UpdatedAt))
                    .primary_key(
                        Index::create()
                            .col(AuthCredentials::TenantId)
                            .col(AuthCredentials::UserId),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuthSetPasswordTokens::Table)
                    .if_not_exists()
                    // SHA-256 of the token, hex; never the token.
                    .col(string(AuthSetPasswordTokens::TokenHash).primary_key())
                    .col(uuid(AuthSetPasswordTokens::TenantId))
                    .col(uuid(AuthSetPasswordTokens::UserId))
                    .col(timestamp_with_time_zone(AuthSetPasswordTokens::ExpiresAt))
                    .col(timestamp_with_time_zone_null(AuthSetPasswordTokens::UsedAt))
                    .col(timestamp_with_time_zone(AuthSetPasswordTokens::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuthSessions::Table)
                    .if_not_exists()
                    .col(uuid(AuthSessions::Id).primary_key())
                    .col(uuid(AuthSessions::TenantId))
                    .col(uuid(AuthSessions::UserId))
                    .col(string(AuthSessions::IpAddress))
                    .col(text(AuthSessions::UserAgent))
                    .col(boolean(AuthSessions::MfaVerified))
                    .col(timestamp_with_time_zone(AuthSessions::CreatedAt))
                    .col(timestamp_with_time_zone(AuthSessions::ExpiresAt))
                    .col(timestamp_with_time_zone_null(AuthSessions::RevokedAt))
                    .to_owned(),
            )
            .await
    }
}
