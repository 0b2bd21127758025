//! The security monitor's state, shared by every audit replica: windowed counters,
//! firings (so a rule fires once per window, whichever replica counts the last event),
//! the networks and hours each user signs in from, and the alerts.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const POSTGRES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS monitor_counts (
        tenant_id uuid NOT NULL,
        rule text NOT NULL,
        key text NOT NULL,
        bucket bigint NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (tenant_id, rule, key, bucket)
    )",
    "CREATE INDEX IF NOT EXISTS monitor_counts_bucket ON monitor_counts (bucket)",
    "CREATE TABLE IF NOT EXISTS monitor_firings (
        tenant_id uuid NOT NULL,
        rule text NOT NULL,
        key text NOT NULL,
        until_micros bigint NOT NULL,
        PRIMARY KEY (tenant_id, rule, key)
    )",
    "CREATE TABLE IF NOT EXISTS monitor_networks (
        tenant_id uuid NOT NULL,
        user_id text NOT NULL,
        network text NOT NULL,
        first_seen_micros bigint NOT NULL,
        PRIMARY KEY (tenant_id, user_id, network)
    )",
    "CREATE TABLE IF NOT EXISTS monitor_hours (
        tenant_id uuid NOT NULL,
        user_id text NOT NULL,
        hour integer NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (tenant_id, user_id, hour)
    )",
    "CREATE TABLE IF NOT EXISTS monitor_alerts (
        id uuid PRIMARY KEY,
        tenant_id uuid NOT NULL,
        rule text NOT NULL,
        severity integer NOT NULL,
        key_kind integer NOT NULL,
        key text NOT NULL,
        message text NOT NULL,
        event_ids text NOT NULL,
        action integer NOT NULL,
        action_status integer NOT NULL,
        action_error text NOT NULL,
        attempts integer NOT NULL,
        next_attempt_micros bigint NOT NULL,
        state integer NOT NULL,
        create_micros bigint NOT NULL,
        update_micros bigint NOT NULL,
        ack_micros bigint,
        ack_principal_id text NOT NULL,
        ack_note text NOT NULL,
        revision bigint NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS monitor_alerts_tenant ON monitor_alerts (tenant_id, create_micros, id)",
    "CREATE INDEX IF NOT EXISTS monitor_alerts_update ON monitor_alerts (update_micros)",
    "CREATE INDEX IF NOT EXISTS monitor_alerts_pending ON monitor_alerts (action_status, next_attempt_micros)",
];

const SQLITE: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS monitor_counts (
        tenant_id BLOB NOT NULL,
        rule TEXT NOT NULL,
        key TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (tenant_id, rule, key, bucket)
    )",
    "CREATE INDEX IF NOT EXISTS monitor_counts_bucket ON monitor_counts (bucket)",
    "CREATE TABLE IF NOT EXISTS monitor_firings (
        tenant_id BLOB NOT NULL,
        rule TEXT NOT NULL,
        key TEXT NOT NULL,
        until_micros INTEGER NOT NULL,
        PRIMARY KEY (tenant_id, rule, key)
    )",
    "CREATE TABLE IF NOT EXISTS monitor_networks (
        tenant_id BLOB NOT NULL,
        user_id TEXT NOT NULL,
        network TEXT NOT NULL,
        first_seen_micros INTEGER NOT NULL,
        PRIMARY KEY (tenant_id, user_id, network)
    )",
    "CREATE TABLE IF NOT EXISTS monitor_hours (
        tenant_id BLOB NOT NULL,
        user_id TEXT NOT NULL,
        hour INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (tenant_id, user_id, hour)
    )",
    "CREATE TABLE IF NOT EXISTS monitor_alerts (
        id BLOB PRIMARY KEY,
        tenant_id BLOB NOT NULL,
        rule TEXT NOT NULL,
        severity INTEGER NOT NULL,
        key_kind INTEGER NOT NULL,
        key TEXT NOT NULL,
        message TEXT NOT NULL,
        event_ids TEXT NOT NULL,
        action INTEGER NOT NULL,
        action_status INTEGER NOT NULL,
        action_error TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_attempt_micros INTEGER NOT NULL,
        state INTEGER NOT NULL,
        create_micros INTEGER NOT NULL,
        update_micros INTEGER NOT NULL,
        ack_micros INTEGER,
        ack_principal_id TEXT NOT NULL,
        ack_note TEXT NOT NULL,
        revision INTEGER NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS monitor_alerts_tenant ON monitor_alerts (tenant_id, create_micros, id)",
    "CREATE INDEX IF NOT EXISTS monitor_alerts_update ON monitor_alerts (update_micros)",
    "CREATE INDEX IF NOT EXISTS monitor_alerts_pending ON monitor_alerts (action_status, next_attempt_micros)",
];

/// The monitor's tables (row level security on each).
pub const TABLES: &[&str] = &[
    "monitor_counts",
    "monitor_firings",
    "monitor_networks",
    "monitor_hours",
    "monitor_alerts",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        penny_platform::db::execute_per_backend(manager, POSTGRES, SQLITE).await?;
        penny_platform::db::enable_row_level_security(manager, TABLES).await?;
        // The trail's own tables again, with the policy that reads its settings once per
        // statement rather than once per row (verification reads every row).
        let mut trail = super::m20261205_000001_create_audit::TENANT_TABLES.to_vec();
        trail.push("audit_checkpoints");
        penny_platform::db::enable_row_level_security(manager, &trail).await
    }
}
