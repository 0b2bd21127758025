//! The platform's database helpers, on SQLite or on PostgreSQL when
//! `PENNY_TEST_DATABASE_URL` is set.

use penny_platform::db;
use penny_tests::{TempDir, fresh_database_url};
use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};
use uuid::Uuid;

async fn one_string(conn: &impl ConnectionTrait, sql: &str) -> Option<String> {
    let row = conn
        .query_one_raw(Statement::from_string(conn.get_database_backend(), sql))
        .await
        .unwrap()?;
    row.try_get_by_index::<Option<String>>(0).unwrap()
}

#[tokio::test]
async fn sqlite_runs_in_wal_mode_or_postgres_answers() {
    penny_tests::init();
    let dir = TempDir::new("penny-db");
    let url = fresh_database_url(dir.path(), "platform").await;
    let conn = db::connect(&url).await.unwrap();
    assert!(db::ping(&conn).await);
    match conn.get_database_backend() {
        DbBackend::Sqlite => {
            assert_eq!(
                one_string(&conn, "PRAGMA journal_mode").await.as_deref(),
                Some("wal")
            );
        }
        _ => {
            assert!(
                one_string(&conn, "SELECT version()")
                    .await
                    .unwrap()
                    .starts_with("PostgreSQL")
            );
        }
    }
}

#[tokio::test]
async fn tenant_transactions_scope_the_tenant_setting_to_the_transaction() {
    penny_tests::init();
    let dir = TempDir::new("penny-db");
    let url = fresh_database_url(dir.path(), "platform").await;
    let conn = db::connect(&url).await.unwrap();
    let tenant = Uuid::new_v4();
    let txn = db::begin_tenant(&conn, tenant).await.unwrap();
    if conn.get_database_backend() == DbBackend::Postgres {
        assert_eq!(
            one_string(&txn, "SELECT current_setting('app.current_tenant', true)").await,
            Some(tenant.to_string())
        );
        txn.commit().await.unwrap();
        // The setting is transaction-local: the next transaction on the pool sees nothing.
        let next = conn.begin().await.unwrap();
        let leftover =
            one_string(&next, "SELECT current_setting('app.current_tenant', true)").await;
        assert!(
            leftover.as_deref().unwrap_or("").is_empty(),
            "leaked {leftover:?}"
        );
        next.commit().await.unwrap();
    } else {
        // SQLite has no session settings: the store layer filters by tenant itself.
        txn.commit().await.unwrap();
    }
}

/// A pooled SQLite connection keeps the schema it last loaded, and an upsert prepared on
/// one that loaded it partway through the migrations (after a table, before its unique
/// index) fails with "ON CONFLICT clause does not match any PRIMARY KEY or UNIQUE
/// constraint" instead of being prepared again. Every connection a service serves through
/// must know the whole schema: here each of the pool's eight runs, as its first statement,
/// the upsert authz's GrantRole runs.
#[tokio::test]
async fn every_pooled_sqlite_connection_sees_the_whole_migrated_schema() {
    penny_tests::init();
    // A pool opens extra connections during the migrations when its returned ones come
    // back late, as on a busy machine: two spinning threads make it busy (without them,
    // pools built the old way failed here in 5 runs of 20, against none of 20 unloaded).
    let _busy = Spinners::start(2);
    for round in 0..40 {
        let dir = TempDir::new("penny-db");
        let url = db::sqlite_url(dir.path(), "authz");
        let conn = db::open::<penny_authz::migration::Migrator>(&url, None)
            .await
            .unwrap();
        // Eight transactions open at once hold eight distinct connections.
        let mut txns = Vec::new();
        for _ in 0..8 {
            txns.push(conn.begin().await.unwrap());
        }
        for (i, txn) in txns.into_iter().enumerate() {
            let upsert = Statement::from_sql_and_values(
                DbBackend::Sqlite,
                "INSERT INTO authz_bindings (id, tenant_id, subject_kind, subject_id, \
                 subject_tenant_id, role, workspace_id, granter_id, created_at) \
                 VALUES (?, ?, 'user', 'dora', ?, 'viewer', '', 'test', '2026-12-05 00:00:00+00:00') \
                 ON CONFLICT (tenant_id, subject_kind, subject_id, role, workspace_id) DO NOTHING",
                [
                    Uuid::new_v4().into(),
                    Uuid::nil().into(),
                    Uuid::nil().into(),
                ],
            );
            if let Err(err) = txn.execute_raw(upsert).await {
                panic!("round {round}, connection {i}: {err}");
            }
            txn.commit().await.unwrap();
        }
        conn.close().await.unwrap();
    }
}

/// A database that cannot serve a statement right now answers UNAVAILABLE with a retry
/// delay, so callers and sagas retry: a row lock or SQLite's write lock held by another
/// transaction, no connection free in the pool, a server that refuses connections. A wrong
/// statement stays INTERNAL, under a reference.
#[tokio::test]
async fn a_busy_or_unreachable_database_is_unavailable_and_a_wrong_statement_internal() {
    penny_tests::init();
    let dir = TempDir::new("penny-db");
    let url = fresh_database_url(dir.path(), "platform").await;
    let conn = db::connect(&url).await.unwrap();
    conn.execute_unprepared("CREATE TABLE held (id INTEGER PRIMARY KEY)")
        .await
        .unwrap();
    conn.execute_unprepared("INSERT INTO held (id) VALUES (1)")
        .await
        .unwrap();
    let holder = conn.begin().await.unwrap();
    let busy = match conn.get_database_backend() {
        DbBackend::Sqlite => {
            holder
                .execute_unprepared("UPDATE held SET id = 1 WHERE id = 1")
                .await
                .unwrap();
            // A second pool that does not wait for the write lock (the services' waits 5 s).
            let mut options = sea_orm::ConnectOptions::new(url.clone());
            options.map_sqlx_sqlite_opts(|o| o.busy_timeout(std::time::Duration::ZERO));
            let impatient = sea_orm::Database::connect(options).await.unwrap();
            impatient
                .execute_unprepared("UPDATE held SET id = 1 WHERE id = 1")
                .await
                .unwrap_err()
        }
        _ => {
            holder
                .execute_unprepared("SELECT id FROM held WHERE id = 1 FOR UPDATE")
                .await
                .unwrap();
            let other = conn.begin().await.unwrap();
            other
                .execute_unprepared("SELECT id FROM held WHERE id = 1 FOR UPDATE NOWAIT")
                .await
                .unwrap_err()
        }
    };
    holder.rollback().await.unwrap();
    let mut nothing_listens = sea_orm::ConnectOptions::new("postgres://postgres@127.0.0.1:1/penny");
    nothing_listens
        .connect_timeout(std::time::Duration::from_millis(300))
        .acquire_timeout(std::time::Duration::from_millis(300));
    let unreachable = sea_orm::Database::connect(nothing_listens)
        .await
        .unwrap_err();
    let exhausted = sea_orm::DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout);
    let mut unavailable = vec![
        ("lock held", busy),
        ("connection refused", unreachable),
        ("pool exhausted", exhausted),
    ];
    let mut internal = Vec::new();
    if conn.get_database_backend() == DbBackend::Postgres {
        // A connection the server ends in the middle of a transaction (57P01 or a
        // broken pipe, whichever the driver sees first).
        let victim = conn.begin().await.unwrap();
        let pid = one_string(&victim, "SELECT pg_backend_pid()::text")
            .await
            .unwrap();
        conn.execute_unprepared(&format!("SELECT pg_terminate_backend({pid})"))
            .await
            .unwrap();
        let lost = victim.execute_unprepared("SELECT 1").await.unwrap_err();
        unavailable.push(("connection terminated", lost));
        // A database that does not exist is a misconfiguration, not a reason to retry.
        let mut missing_database = sea_orm::ConnectOptions::new(penny_tests::replace_database(
            &url,
            "penny_no_such_database",
        ));
        missing_database.acquire_timeout(std::time::Duration::from_secs(2));
        internal.push(
            sea_orm::Database::connect(missing_database)
                .await
                .unwrap_err(),
        );
    }
    for (what, err) in unavailable {
        assert!(db::is_unavailable(&err), "{what}: {err}");
        let status = tonic::Status::from(penny_platform::ApiError::database(&err));
        assert_eq!(
            status.code(),
            tonic::Code::Unavailable,
            "{what}: {status:?}"
        );
        assert!(penny_platform::error::is_transient(&status));
        assert!(!status.message().contains("held"), "{what}: {status:?}");
    }
    let duplicate = conn
        .execute_unprepared("INSERT INTO held (id) VALUES (1)")
        .await
        .unwrap_err();
    let missing = conn
        .execute_unprepared("SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    internal.extend([duplicate, missing]);
    for err in internal {
        assert!(!db::is_unavailable(&err), "{err}");
        let status = tonic::Status::from(penny_platform::ApiError::database(&err));
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert!(status.message().starts_with("internal error (reference "));
    }
}

/// Threads that keep the cores busy until dropped.
struct Spinners {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Spinners {
    fn start(count: usize) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..count)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
