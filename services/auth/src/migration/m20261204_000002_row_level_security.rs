//! Row level security on every tenant-scoped table (PostgreSQL; SQLite has none and the
//! store filters by tenant itself).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The tables that hold a `tenant_id` (every table of this service).
pub const TENANT_TABLES: &[&str] = &[
    "auth_lockouts",
    "auth_credentials",
    "auth_set_password_tokens",
    "auth_sessions",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        for table in TENANT_TABLES {
            for sql in penny_platform::db::row_level_security_sql(table) {
                manager.get_connection().execute_unprepared(&sql).await?;
            }
        }
        Ok(())
    }
}
