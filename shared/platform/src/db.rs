//! Database connections: SQLite (embedded default) or PostgreSQL, migrations at start.
//!
//! Each service owns its own database and migrator. On PostgreSQL, tenant-scoped work runs
//! in a transaction that first sets `app.current_tenant` (transaction-local), which the row
//! level security policies read; on SQLite the store layer filters by tenant itself.
//!
//! On PostgreSQL the role that serves requests must own nothing and be neither superuser
//! nor BYPASSRLS, or row level security would not bind it: [`open`] migrates through a
//! separate owner connection, grants the serving role what it needs, and refuses to start
//! when the serving role could bypass the policies.

use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, Statement, TransactionTrait, Value,
};
use sea_orm_migration::MigratorTrait;
use uuid::Uuid;

/// Connects to `url` (`sqlite://path?mode=rwc` or `postgres://…`) with the default pool
/// (8 connections for SQLite, 32 for PostgreSQL).
pub async fn connect(url: &str) -> Result<DatabaseConnection, DbErr> {
    connect_pool(url, None).await
}

/// Connects with a pool of at most `max_connections` (tests pin it to 1 to prove a reused
/// connection carries nothing from one tenant to the next).
pub async fn connect_pool(
    url: &str,
    max_connections: Option<u32>,
) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .sqlx_logging(false)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5));
    if is_sqlite(url) {
        // One writer at a time in SQLite: a small pool avoids lock contention. WAL lets
        // readers run beside the writer; NORMAL sync is durable in WAL mode except for the
        // last transactions before a power loss (never corrupt).
        options
            .max_connections(max_connections.unwrap_or(8))
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
        options
            .max_connections(max_connections.unwrap_or(32))
            .min_connections(1);
    }
    Database::connect(options).await
}

/// Connects and brings the schema up to date (tests of one store; SQLite through a
/// connection of its own first, as [`open`] does). Services use [`open`].
pub async fn connect_and_migrate<M: MigratorTrait>(url: &str) -> Result<DatabaseConnection, DbErr> {
    if is_sqlite_file(url) {
        return migrate_sqlite::<M>(url).await;
    }
    let db = connect(url).await?;
    M::up(&db, None).await?;
    Ok(db)
}

fn is_sqlite(url: &str) -> bool {
    url.starts_with("sqlite:")
}

/// An in-memory SQLite database lives only as long as its connections: it cannot be
/// migrated through one that is closed before the pool that serves opens.
fn is_sqlite_file(url: &str) -> bool {
    is_sqlite(url) && !url.contains(":memory:") && !url.contains("mode=memory")
}

/// Migrates a SQLite database through one connection of its own, closed before the pool
/// that serves is opened. A SQLite connection keeps the schema it last read until it next
/// runs a statement, and an upsert prepared on a pooled connection that read it partway
/// through the migrations (a table made, its unique index not yet) fails with "ON CONFLICT
/// clause does not match any PRIMARY KEY or UNIQUE constraint" instead of being prepared
/// again. A pool opened after the migrations holds no such connection.
async fn migrate_sqlite<M: MigratorTrait>(url: &str) -> Result<DatabaseConnection, DbErr> {
    let migrator = connect_pool(url, Some(1)).await?;
    let migrated = M::up(&migrator, None).await;
    let closed = migrator.close().await;
    migrated?;
    closed?;
    connect(url).await
}

/// Why a service's database cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Connecting or migrating failed.
    #[error("{0}")]
    Db(#[from] DbErr),
    /// The serving role could bypass row level security.
    #[error(
        "the serving database role {role} {why}; serve through a role that owns nothing and has neither SUPERUSER nor BYPASSRLS (migrations run through the migration URL)"
    )]
    PrivilegedRole {
        /// The role.
        role: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Opens a service's database for serving: migrates it (through `migration_url` when given,
/// the owner's connection), and on PostgreSQL grants the serving role row access and checks
/// that it cannot bypass row level security.
pub async fn open<M: MigratorTrait>(
    serve_url: &str,
    migration_url: Option<&str>,
) -> Result<DatabaseConnection, OpenError> {
    open_limited::<M>(serve_url, migration_url, &[]).await
}

/// [`open`], then on PostgreSQL takes back from the serving role, per `(table,
/// privileges)` of `limits`, what it must not do (`("audit_events", "UPDATE, DELETE,
/// TRUNCATE")`), and refuses to serve if the role still can.
pub async fn open_limited<M: MigratorTrait>(
    serve_url: &str,
    migration_url: Option<&str>,
    limits: &[(&str, &str)],
) -> Result<DatabaseConnection, OpenError> {
    if is_sqlite_file(serve_url) {
        return Ok(migrate_sqlite::<M>(serve_url).await?);
    }
    let db = connect(serve_url).await?;
    if db.get_database_backend() != DbBackend::Postgres {
        M::up(&db, None).await?;
        return Ok(db);
    }
    let serving_role = one_string(&db, "SELECT current_user::text").await?;
    match migration_url {
        Some(url) => {
            let owner = connect(url).await?;
            M::up(&owner, None).await?;
            // The grant and the limits in one transaction: another replica's serving role
            // never holds, even for a moment, what the limits take away.
            let txn = owner.begin().await?;
            grant_rows(&txn, &serving_role).await?;
            for (table, privileges) in limits {
                txn.execute_unprepared(&format!(
                    "REVOKE {privileges} ON {} FROM {}",
                    quote_ident(table),
                    quote_ident(&serving_role)
                ))
                .await?;
            }
            txn.commit().await?;
            owner.close().await?;
        }
        None => M::up(&db, None).await?,
    }
    check_unprivileged(&db, &serving_role).await?;
    check_limits(&db, &serving_role, limits).await?;
    Ok(db)
}

async fn check_limits(
    db: &DatabaseConnection,
    role: &str,
    limits: &[(&str, &str)],
) -> Result<(), OpenError> {
    for (table, privileges) in limits {
        for privilege in privileges.split(',').map(str::trim) {
            let row = db
                .query_one_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT has_table_privilege($1, $2, $3)",
                    [role.into(), (*table).into(), privilege.into()],
                ))
                .await?
                .ok_or_else(|| DbErr::RecordNotFound("has_table_privilege".into()))?;
            if row.try_get_by_index::<bool>(0)? {
                return Err(OpenError::PrivilegedRole {
                    role: role.to_owned(),
                    why: "may change rows that must stay as written",
                });
            }
        }
    }
    Ok(())
}

async fn one_string(db: &DatabaseConnection, sql: &str) -> Result<String, DbErr> {
    db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(sql.to_owned()))?
        .try_get_by_index::<String>(0)
}

/// Lets `role` read and write rows (never DDL) in the public schema.
async fn grant_rows(owner: &impl ConnectionTrait, role: &str) -> Result<(), DbErr> {
    let role = quote_ident(role);
    for sql in [
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"),
        format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"),
    ] {
        owner.execute_unprepared(&sql).await?;
    }
    Ok(())
}

/// A PostgreSQL identifier, quoted.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn check_unprivileged(db: &DatabaseConnection, role: &str) -> Result<(), OpenError> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            // Owning a table, or being a member of a role that does (SET ROLE would
            // switch the policies off), both count as owning.
            "SELECT r.rolsuper, r.rolbypassrls, \
                    (SELECT count(*) FROM pg_tables t \
                      WHERE t.schemaname = 'public' AND pg_has_role(r.rolname, t.tableowner, 'MEMBER'))::bigint \
             FROM pg_roles r WHERE r.rolname = $1",
            [role.into()],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("pg_roles".into()))?;
    let superuser: bool = row.try_get_by_index(0)?;
    let bypass: bool = row.try_get_by_index(1)?;
    let owned: i64 = row.try_get_by_index(2)?;
    let why = if superuser {
        Some("is a superuser")
    } else if bypass {
        Some("has BYPASSRLS")
    } else if owned > 0 {
        Some("owns tables (or is a member of their owner)")
    } else {
        None
    };
    match why {
        Some(why) => Err(OpenError::PrivilegedRole {
            role: role.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// Row level security on a tenant-scoped table: rows are visible and writable only when
/// `app.current_tenant` names their tenant, or in a platform-scope transaction; an unset or
/// empty setting matches nothing. The SQL for a PostgreSQL migration; SQLite has no RLS.
///
/// Each setting is read in a scalar subquery, which PostgreSQL evaluates once per
/// statement: read in the predicate itself, it would be looked up and cast for every row a
/// statement touches.
pub fn row_level_security_sql(table: &str) -> Vec<String> {
    let predicate = "tenant_id = (SELECT NULLIF(current_setting('app.current_tenant', true), '')::uuid) \
                     OR (SELECT current_setting('app.platform_scope', true)) = 'on'";
    vec![
        format!("ALTER TABLE {table} ENABLE ROW LEVEL SECURITY"),
        format!("ALTER TABLE {table} FORCE ROW LEVEL SECURITY"),
        format!("DROP POLICY IF EXISTS tenant_isolation ON {table}"),
        format!(
            "CREATE POLICY tenant_isolation ON {table} USING ({predicate}) WITH CHECK ({predicate})"
        ),
    ]
}

/// The body of every service's row level security migration: on PostgreSQL, enables,
/// forces and installs the tenant policy on each of `tables`; on SQLite (no RLS) nothing.
pub async fn enable_row_level_security(
    manager: &sea_orm_migration::SchemaManager<'_>,
    tables: &[&str],
) -> Result<(), DbErr> {
    if manager.get_database_backend() != DbBackend::Postgres {
        return Ok(());
    }
    for table in tables {
        for sql in row_level_security_sql(table) {
            manager.get_connection().execute_unprepared(&sql).await?;
        }
    }
    Ok(())
}

/// A statement under construction, with placeholders in the backend's style (`$1` on
/// PostgreSQL, `?` on SQLite): for hand-written SQL such as multi-row INSERTs.
pub struct Sql {
    backend: DbBackend,
    text: String,
    values: Vec<Value>,
}

impl Sql {
    /// A statement starting with `text`.
    pub fn new(backend: DbBackend, text: &str) -> Self {
        Self {
            backend,
            text: text.to_owned(),
            values: Vec::new(),
        }
    }

    /// Appends `text`.
    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends a placeholder bound to `value`.
    pub fn bind(&mut self, value: impl Into<Value>) -> &mut Self {
        self.values.push(value.into());
        if self.backend == DbBackend::Postgres {
            self.text.push('$');
            self.text.push_str(&self.values.len().to_string());
        } else {
            self.text.push('?');
        }
        self
    }

    /// Appends `(v1, v2, …)`.
    pub fn bind_list<V: Into<Value>>(&mut self, values: impl IntoIterator<Item = V>) -> &mut Self {
        self.push("(");
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.bind(value);
        }
        self.push(")")
    }

    /// The statement.
    pub fn build(self) -> Statement {
        Statement::from_sql_and_values(self.backend, self.text, self.values)
    }
}

/// A migration written in each backend's own SQL: runs `postgres` or `sqlite`, in order.
pub async fn execute_per_backend(
    manager: &sea_orm_migration::SchemaManager<'_>,
    postgres: &[&str],
    sqlite: &[&str],
) -> Result<(), DbErr> {
    let statements = if manager.get_database_backend() == DbBackend::Postgres {
        postgres
    } else {
        sqlite
    };
    for sql in statements {
        manager.get_connection().execute_unprepared(sql).await?;
    }
    Ok(())
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

/// Begins a transaction that may read across tenants (platform listings, change feeds).
/// Only for operations the access table reserves to services or platform staff.
pub async fn begin_platform(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    let txn = db.begin().await?;
    if db.get_database_backend() == DbBackend::Postgres {
        txn.execute_unprepared("SELECT set_config('app.platform_scope', 'on', true)")
            .await?;
    }
    Ok(txn)
}

/// Whether `err` says the database could not serve the statement right now, not that the
/// statement was wrong: no connection (refused, lost, the pool exhausted or closed), SQLite's
/// BUSY or LOCKED (its write lock held past the busy timeout), or PostgreSQL's connection
/// exceptions (class 08), a read-only transaction (25006: a standby, during a failover),
/// serialization failures and deadlocks (40001, 40P01), too many connections (53300), a
/// lock not available (55P03), a statement timeout (57014) and a server shutting down or
/// starting (57P01 to 57P03). A retry may succeed where these failed; but a connection lost
/// during a COMMIT leaves unknown whether the change was made, as any network failure does.
pub fn is_unavailable(err: &DbErr) -> bool {
    use sea_orm::RuntimeErr;
    use sea_orm::sqlx::Error;
    let cause = match err {
        DbErr::ConnectionAcquire(_) => return true,
        // A connection the pool opens can also be refused for good (a wrong password, a
        // missing database): the codes below tell.
        DbErr::Conn(RuntimeErr::SqlxError(cause))
        | DbErr::Exec(RuntimeErr::SqlxError(cause))
        | DbErr::Query(RuntimeErr::SqlxError(cause)) => cause,
        DbErr::Conn(_) => return true,
        _ => return false,
    };
    match cause.as_ref() {
        Error::Io(_) | Error::PoolTimedOut | Error::PoolClosed | Error::WorkerCrashed => true,
        Error::Database(db) => {
            let Some(code) = db.code() else {
                return false;
            };
            if db
                .try_downcast_ref::<sea_orm::sqlx::sqlite::SqliteError>()
                .is_some()
            {
                // An extended result code; its low byte is the primary one.
                code.parse::<i32>()
                    .is_ok_and(|extended| matches!(extended & 0xff, 5 | 6))
            } else {
                code.starts_with("08")
                    || matches!(
                        code.as_ref(),
                        "25006"
                            | "40001"
                            | "40P01"
                            | "53300"
                            | "55P03"
                            | "57014"
                            | "57P01"
                            | "57P02"
                            | "57P03"
                    )
            }
        }
        _ => false,
    }
}

/// Whether the database answers: the readiness probe of services that own one.
pub async fn ping(db: &DatabaseConnection) -> bool {
    db.ping().await.is_ok()
}
