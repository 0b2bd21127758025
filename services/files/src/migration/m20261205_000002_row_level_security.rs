//! Row level security on every tenant-scoped table (PostgreSQL; SQLite has none and the
//! store filters by tenant itself).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The tables that hold a `tenant_id` when this migration ran (migration 3 adds
/// `file_rewrap_jobs`, with its own policy).
pub const TENANT_TABLES: &[&str] = &["files"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        penny_platform::db::enable_row_level_security(manager, TENANT_TABLES).await
    }
}
