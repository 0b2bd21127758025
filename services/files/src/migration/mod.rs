//! The files database schema, one file per migration.

use sea_orm_migration::prelude::*;

mod m20261205_000001_create_files;
pub mod m20261205_000002_row_level_security;
mod m20261205_000003_rewrap_jobs;

/// Runs the files service's migrations.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261205_000001_create_files::Migration),
            Box::new(m20261205_000002_row_level_security::Migration),
            Box::new(m20261205_000003_rewrap_jobs::Migration),
        ]
    }

    fn migration_table_name() -> DynIden {
        "files_migrations".into_iden()
    }
}
