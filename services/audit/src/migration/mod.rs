//! The audit database schema, one file per migration.

use sea_orm_migration::prelude::*;

pub mod m20261205_000001_create_audit;
pub mod m20261205_000002_checkpoints;
pub mod m20261205_000003_monitor;

/// What the serving role may not do, per table (revoked after the platform's grant of
/// row access, and checked at start).
pub const SERVING_ROLE_LIMITS: &[(&str, &str)] = &[
    ("audit_events", "UPDATE, DELETE, TRUNCATE"),
    ("audit_redactions", "UPDATE, DELETE, TRUNCATE"),
    ("audit_payloads", "UPDATE, TRUNCATE"),
    ("audit_heads", "DELETE, TRUNCATE"),
    ("audit_checkpoints", "UPDATE, DELETE, TRUNCATE"),
];

/// Runs the audit service's migrations.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261205_000001_create_audit::Migration),
            Box::new(m20261205_000002_checkpoints::Migration),
            Box::new(m20261205_000003_monitor::Migration),
        ]
    }

    fn migration_table_name() -> DynIden {
        "audit_migrations".into_iden()
    }
}
