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
