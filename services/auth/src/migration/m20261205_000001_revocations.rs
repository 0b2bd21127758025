//! The revocation log that `WatchRevocations` streams, its sequence counter, and an index
//! for listing a user's sessions.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, integer, string, timestamp_with_time_zone, timestamp_with_time_zone_null, uuid,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AuthRevocations {
    Table,
    Seq,
    TenantId,
    Kind,
    SubjectId,
    RevokedAt,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum AuthRevocationSeq {
    Table,
    Id,
    Value,
}

#[derive(DeriveIden)]
enum AuthSessions {
    Table,
    TenantId,
    UserId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuthRevocations::Table)
                    .if_not_exists()
                    // Taken from the counter below inside the revoking transaction, whose
                    // row lock makes sequence numbers commit in order: a follower that has
                    // seen `n` has seen everything before it.
                    .col(big_integer(AuthRevocations::Seq).primary_key())
                    .col(uuid(AuthRevocations::TenantId))
                    .col(string(AuthRevocations::Kind))
                    .col(string(AuthRevocations::SubjectId))
                    .col(timestamp_with_time_zone(AuthRevocations::RevokedAt))
                    .col(timestamp_with_time_zone_null(AuthRevocations::ExpiresAt))
                    .to_owned(),
            )
            .await?;
        // Holds no tenant data: one row, the last sequence number handed out.
        manager
            .create_table(
                Table::create()
                    .table(AuthRevocationSeq::Table)
                    .if_not_exists()
                    .col(integer(AuthRevocationSeq::Id).primary_key())
                    .col(big_integer(AuthRevocationSeq::Value))
                    .to_owned(),
            )
            .await?;
        manager
            .exec_stmt(
                Query::insert()
                    .into_table(AuthRevocationSeq::Table)
                    .columns([AuthRevocationSeq::Id, AuthRevocationSeq::Value])
                    .values_panic([1.into(), 0.into()])
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("auth_sessions_by_user")
                    .table(AuthSessions::Table)
                    .col(AuthSessions::TenantId)
                    .col(AuthSessions::UserId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        penny_platform::db::enable_row_level_security(manager, &["auth_revocations"]).await
    }
}
