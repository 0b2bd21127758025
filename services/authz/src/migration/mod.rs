//! The authz database schema, one file per migration.

use sea_orm_migration::prelude::*;

mod m20261204_000001_create_authz;

/// Runs the authz service's migrations.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(m20261204_000001_create_authz::Migration)]
    }

    fn migration_table_name() -> DynIden {
        "authz_migrations".into_iden()
    }
}
