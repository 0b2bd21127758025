//! The audit database schema, one file per migration.

use sea_orm_migration::prelude::*;

pub mod m20261205_000001_create_audit;

/// Runs the audit service's migrations.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(m20261205_000001_create_audit::Migration)]
    }

    fn migration_table_name() -> DynIden {
        "audit_migrations".into_iden()
    }
}
