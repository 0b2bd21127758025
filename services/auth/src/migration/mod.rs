//! The auth database schema, one file per migration.

use sea_orm_migration::prelude::*;

mod m20261204_000001_create_auth;
pub mod m20261204_000002_row_level_security;
mod m20261205_000001_revocations;
mod m20261205_000002_api_keys;
mod m20261205_000003_ip_blocks;
mod m20261205_000004_mfa;
mod m20261205_000005_signing_keys;
mod m20261205_000006_service_clients;

/// Runs the auth service's migrations.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261204_000001_create_auth::Migration),
            Box::new(m20261204_000002_row_level_security::Migration),
            Box::new(m20261205_000001_revocations::Migration),
            Box::new(m20261205_000002_api_keys::Migration),
            Box::new(m20261205_000003_ip_blocks::Migration),
            Box::new(m20261205_000004_mfa::Migration),
            Box::new(m20261205_000005_signing_keys::Migration),
            Box::new(m20261205_000006_service_clients::Migration),
        ]
    }

    fn migration_table_name() -> DynIden {
        "auth_migrations".into_iden()
    }
}
