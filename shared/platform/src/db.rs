//! Database connections: SQLite (embedded default) or PostgreSQL, migrations at start.
//!
//! Each service owns its own database and migrator. On PostgreSQL, tenant-scoped work runs
//! in a transaction that first sets `app.current_tenant` (transaction-local), which the row
//! level security policies read; on SQLite the store layer filters by tenant itself.

use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, Statement, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use uuid::Uuid;

/// Connects to `url` (`sqlite://path?mode=rwc` or `postgres://…`).
pub async fn connect(url: &str) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .sqlx_logging(false)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5));
    if url.starts_with("sqlite:") {
        // One writer at a time in SQLite: a small pool avoids lock contention. WAL lets
        // readers run beside the writer; NORMAL sync is durable in WAL mode except for the
        // last transactions before a power loss (never corrupt).
        options
            .max_connections(8)
            .min_connections(1)
            .map_sqlx_sqlite_opts(|opts| {
                opts.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(5))
                    .foreign_keys(true)
                    // Deleted rows are overwritten, not left in free pages: deleting a
                    // wrapped key must destroy it. Set on every pooled connection.
                    .pragma("secure_delete", "ON")
            });
    } else {
        options.max_connections(32).min_connections(1);
    }
    Database::connect(options).await
}

/// Connects and brings the schema up to date.
pub async fn connect_and_migrate<M: MigratorTrait>(url: &str) -> Result<DatabaseConnection, DbErr> {
    let db = connect(url).await?;
    M::up(&db, None).await?;
    Ok(db)
}

/// The SQLite URL of database `name` inside `dir`, created if missing.
pub fn sqlite_url(dir: &std::path::Path, name: &str) -> String {
    format!(
        "sqlite://{}?mode=rwc",
        dir.join(format!("{name}.db")).display()
    )
}

/// Begins a transaction scoped to `tenant`: on PostgreSQL it sets `app.current_tenant` for
/// this transaction only, so row level security sees exactly this tenant and a pooled
/// connection never carries it into another request.
pub async fn begin_tenant(
    db: &DatabaseConnection,
    tenant: Uuid,
) -> Result<DatabaseTransaction, DbErr> {
    let txn = db.begin().await?;
    if db.get_database_backend() == DbBackend::Postgres {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT set_config('app.current_tenant', $1, true)",
            [tenant.to_string().into()],
        ))
        .await?;
    }
    Ok(txn)
}

/// Whether the database answers: the readiness probe of services that own one.
pub async fn ping(db: &DatabaseConnection) -> bool {
    db.ping().await.is_ok()
}
