//! The trail: chained events, their personal payloads, redactions, and each tenant's head.
//!
//! Events and redactions are append-only and payloads can be deleted (redaction) but not
//! changed: on PostgreSQL the serving role is granted nothing more (see
//! [`super::SERVING_ROLE_LIMITS`]) and triggers refuse the rest even to the owner; on SQLite
//! the triggers alone. Row level security covers every table.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Every tenant-scoped table.
pub const TENANT_TABLES: &[&str] = &[
    "audit_events",
    "audit_payloads",
    "audit_redactions",
    "audit_heads",
];

const POSTGRES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS audit_events (
        tenant_id uuid NOT NULL,
        sequence bigint NOT NULL,
        event_id uuid NOT NULL,
        service text NOT NULL,
        action text NOT NULL,
        resource text NOT NULL,
        resource_id text NOT NULL,
        principal_kind integer NOT NULL,
        outcome integer NOT NULL,
        method text NOT NULL,
        duration_micros bigint NOT NULL,
        status integer NOT NULL,
        trace_id text NOT NULL,
        event_time_micros bigint NOT NULL,
        receive_time_micros bigint NOT NULL,
        payload_digest bytea NOT NULL,
        prev_hash bytea NOT NULL,
        hash bytea NOT NULL,
        PRIMARY KEY (tenant_id, sequence),
        UNIQUE (tenant_id, event_id)
    )",
    "CREATE INDEX IF NOT EXISTS audit_events_action ON audit_events (tenant_id, action, sequence)",
    "CREATE INDEX IF NOT EXISTS audit_events_time ON audit_events (tenant_id, event_time_micros)",
    "CREATE TABLE IF NOT EXISTS audit_payloads (
        tenant_id uuid NOT NULL,
        sequence bigint NOT NULL,
        user_id text NOT NULL,
        ip_address text NOT NULL,
        user_agent text NOT NULL,
        path text NOT NULL,
        attributes text NOT NULL,
        salt bytea NOT NULL,
        PRIMARY KEY (tenant_id, sequence)
    )",
    "CREATE INDEX IF NOT EXISTS audit_payloads_user ON audit_payloads (tenant_id, user_id, sequence)",
    "CREATE TABLE IF NOT EXISTS audit_redactions (
        tenant_id uuid NOT NULL,
        sequence bigint NOT NULL,
        redacted_at_micros bigint NOT NULL,
        redaction_sequence bigint NOT NULL,
        PRIMARY KEY (tenant_id, sequence)
    )",
    "CREATE TABLE IF NOT EXISTS audit_heads (
        tenant_id uuid PRIMARY KEY,
        sequence bigint NOT NULL,
        hash bytea NOT NULL
    )",
    "CREATE OR REPLACE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
        RAISE EXCEPTION 'audit rows are append-only (% on %)', TG_OP, TG_TABLE_NAME;
     END $$",
    "DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events",
    "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
        FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()",
    "DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events",
    "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
        FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()",
    "DROP TRIGGER IF EXISTS audit_redactions_append_only ON audit_redactions",
    "CREATE TRIGGER audit_redactions_append_only BEFORE UPDATE OR DELETE ON audit_redactions
        FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()",
    "DROP TRIGGER IF EXISTS audit_payloads_no_update ON audit_payloads",
    "CREATE TRIGGER audit_payloads_no_update BEFORE UPDATE ON audit_payloads
        FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()",
];

const SQLITE: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS audit_events (
        tenant_id BLOB NOT NULL,
        sequence INTEGER NOT NULL,
        event_id BLOB NOT NULL,
        service TEXT NOT NULL,
        action TEXT NOT NULL,
        resource TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        principal_kind INTEGER NOT NULL,
        outcome INTEGER NOT NULL,
        method TEXT NOT NULL,
        duration_micros INTEGER NOT NULL,
        status INTEGER NOT NULL,
        trace_id TEXT NOT NULL,
        event_time_micros INTEGER NOT NULL,
        receive_time_micros INTEGER NOT NULL,
        payload_digest BLOB NOT NULL,
        prev_hash BLOB NOT NULL,
        hash BLOB NOT NULL,
        PRIMARY KEY (tenant_id, sequence),
        UNIQUE (tenant_id, event_id)
    )",
    "CREATE INDEX IF NOT EXISTS audit_events_action ON audit_events (tenant_id, action, sequence)",
    "CREATE INDEX IF NOT EXISTS audit_events_time ON audit_events (tenant_id, event_time_micros)",
    "CREATE TABLE IF NOT EXISTS audit_payloads (
        tenant_id BLOB NOT NULL,
        sequence INTEGER NOT NULL,
        user_id TEXT NOT NULL,
        ip_address TEXT NOT NULL,
        user_agent TEXT NOT NULL,
        path TEXT NOT NULL,
        attributes TEXT NOT NULL,
        salt BLOB NOT NULL,
        PRIMARY KEY (tenant_id, sequence)
    )",
    "CREATE INDEX IF NOT EXISTS audit_payloads_user ON audit_payloads (tenant_id, user_id, sequence)",
    "CREATE TABLE IF NOT EXISTS audit_redactions (
        tenant_id BLOB NOT NULL,
        sequence INTEGER NOT NULL,
        redacted_at_micros INTEGER NOT NULL,
        redaction_sequence INTEGER NOT NULL,
        PRIMARY KEY (tenant_id, sequence)
    )",
    "CREATE TABLE IF NOT EXISTS audit_heads (
        tenant_id BLOB PRIMARY KEY,
        sequence INTEGER NOT NULL,
        hash BLOB NOT NULL
    )",
    "CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events
        BEGIN SELECT RAISE(ABORT, 'audit rows are append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events
        BEGIN SELECT RAISE(ABORT, 'audit rows are append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_redactions_no_update BEFORE UPDATE ON audit_redactions
        BEGIN SELECT RAISE(ABORT, 'audit rows are append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_redactions_no_delete BEFORE DELETE ON audit_redactions
        BEGIN SELECT RAISE(ABORT, 'audit rows are append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_payloads_no_update BEFORE UPDATE ON audit_payloads
        BEGIN SELECT RAISE(ABORT, 'audit rows are append-only'); END",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        penny_platform::db::execute_per_backend(manager, POSTGRES, SQLITE).await?;
        penny_platform::db::enable_row_level_security(manager, TENANT_TABLES).await
    }
}
