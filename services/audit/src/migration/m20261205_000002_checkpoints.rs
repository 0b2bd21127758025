//! Signed checkpoints of each tenant's chain, append-only like the events; where each head
//! was last checkpointed; heads that only move forward; and who appended each event.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const POSTGRES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS audit_checkpoints (
        tenant_id uuid NOT NULL,
        sequence bigint NOT NULL,
        hash bytea NOT NULL,
        create_micros bigint NOT NULL,
        signed_payload bytea NOT NULL,
        signature bytea NOT NULL,
        key_id text NOT NULL,
        public_key bytea NOT NULL,
        PRIMARY KEY (tenant_id, sequence)
    )",
    "ALTER TABLE audit_heads ADD COLUMN IF NOT EXISTS checkpoint_sequence bigint NOT NULL DEFAULT 0",
    "ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS producer_id text NOT NULL DEFAULT ''",
    "CREATE OR REPLACE FUNCTION audit_head_forward() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
        IF NEW.tenant_id <> OLD.tenant_id OR NEW.sequence < OLD.sequence
           OR (NEW.sequence = OLD.sequence AND NEW.hash <> OLD.hash)
           OR NEW.checkpoint_sequence < OLD.checkpoint_sequence THEN
            RAISE EXCEPTION 'an audit chain head only moves forward';
        END IF;
        RETURN NEW;
     END $$",
    "DROP TRIGGER IF EXISTS audit_heads_no_delete ON audit_heads",
    "CREATE TRIGGER audit_heads_no_delete BEFORE DELETE ON audit_heads
        FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()",
    "DROP TRIGGER IF EXISTS audit_heads_forward ON audit_heads",
    "CREATE TRIGGER audit_heads_forward BEFORE UPDATE ON audit_heads
        FOR EACH ROW EXECUTE FUNCTION audit_head_forward()",
    "DROP TRIGGER IF EXISTS audit_checkpoints_append_only ON audit_checkpoints",
    "CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
        FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()",
];

const SQLITE: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS audit_checkpoints (
        tenant_id BLOB NOT NULL,
        sequence INTEGER NOT NULL,
        hash BLOB NOT NULL,
        create_micros INTEGER NOT NULL,
        signed_payload BLOB NOT NULL,
        signature BLOB NOT NULL,
        key_id TEXT NOT NULL,
        public_key BLOB NOT NULL,
        PRIMARY KEY (tenant_id, sequence)
    )",
    "ALTER TABLE audit_heads ADD COLUMN checkpoint_sequence INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE audit_events ADD COLUMN producer_id TEXT NOT NULL DEFAULT ''",
    "CREATE TRIGGER IF NOT EXISTS audit_heads_forward BEFORE UPDATE ON audit_heads
        WHEN NEW.tenant_id <> OLD.tenant_id OR NEW.sequence < OLD.sequence
          OR (NEW.sequence = OLD.sequence AND NEW.hash <> OLD.hash)
          OR NEW.checkpoint_sequence < OLD.checkpoint_sequence
        BEGIN SELECT RAISE(ABORT, 'an audit chain head only moves forward'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_heads_no_delete BEFORE DELETE ON audit_heads
        BEGIN SELECT RAISE(ABORT, 'audit rows are append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
        BEGIN SELECT RAISE(ABORT, 'audit rows are append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
        BEGIN SELECT RAISE(ABORT, 'audit rows are append-only'); END",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        penny_platform::db::execute_per_backend(manager, POSTGRES, SQLITE).await?;
        penny_platform::db::enable_row_level_security(manager, &["audit_checkpoints"]).await
    }
}
