//! Tenant isolation in the databases. On PostgreSQL: row level security enabled and forced
//! on every tenant table, a serving role that cannot bypass it, a pooled connection that
//! carries nothing between tenants, nothing visible without a tenant, no writes into
//! another tenant. On SQLite (no RLS) the store layer filters, and the same alternation
//! test runs through it.

use penny_keys::domain::TenantId;
use penny_keys::store::Store;
use penny_proto::keys::v1 as pb;
use penny_proto::keys::v1::key_service_client::KeyServiceClient;
use penny_tests::{TEST_APP_ROLE, TestFleet, with_token};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use uuid::Uuid;

async fn keys_fleet_with_two_tenants() -> (TestFleet, Uuid, Uuid) {
    let fleet = TestFleet::builder().with_auth().start().await;
    let mut keys = KeyServiceClient::new(fleet.keys().server.channel().await);
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for tenant in [a, b] {
        keys.create_key(with_token(
            pb::CreateKeyRequest {
                tenant_id: tenant.to_string(),
            },
            &fleet.service_token(),
        ))
        .await
        .unwrap();
        keys.rotate_key(with_token(
            pb::RotateKeyRequest {
                tenant_id: tenant.to_string(),
            },
            &fleet.admin_token(),
        ))
        .await
        .unwrap();
    }
    (fleet, a, b)
}

async fn tenant_ids(conn: &impl ConnectionTrait, table: &str) -> Vec<Uuid> {
    conn.query_all_raw(Statement::from_string(
        DbBackend::Postgres,
        format!("SELECT tenant_id FROM {table}"),
    ))
    .await
    .unwrap()
    .into_iter()
    .map(|row| row.try_get_by_index::<Uuid>(0).unwrap())
    .collect()
}

fn on_postgres(fleet: &TestFleet) -> bool {
    fleet.keys().database.migration_url.is_some()
}

/// Through the keys store on a pool of one connection, alternating tenants 10,000 times:
/// every read sees its own tenant's keyring and nothing else. Runs on both backends.
#[tokio::test]
async fn a_pool_of_one_alternating_tenants_returns_no_foreign_rows() {
    let (fleet, a, b) = keys_fleet_with_two_tenants().await;
    let conn = penny_platform::db::connect_pool(&fleet.keys().database.url, Some(1))
        .await
        .unwrap();
    let store = Store::new(conn.clone()).await.unwrap();
    let postgres = on_postgres(&fleet);
    let mut foreign = 0usize;
    for i in 0..10_000 {
        let tenant = if i % 2 == 0 { a } else { b };
        let ring = store
            .load(TenantId(tenant))
            .await
            .unwrap()
            .expect("own keyring");
        if ring.info.tenant_id.0 != tenant || ring.wrapped.len() != 2 {
            foreign += 1;
        }
        if postgres && i % 10 == 0 {
            // The same connection, raw SQL with no tenant filter: RLS alone decides.
            let txn = penny_platform::db::begin_tenant(&conn, tenant)
                .await
                .unwrap();
            for table in ["keyrings", "key_versions"] {
                foreign += tenant_ids(&txn, table)
                    .await
                    .iter()
                    .filter(|t| **t != tenant)
                    .count();
            }
            txn.commit().await.unwrap();
        }
    }
    assert_eq!(foreign, 0);
}

async fn postgres_or_note(fleet: &TestFleet) -> Option<DatabaseConnection> {
    if !on_postgres(fleet) {
        eprintln!(
            "row level security exists on PostgreSQL only; run with PENNY_TEST_DATABASE_URL (CI does)"
        );
        return None;
    }
    Some(
        penny_platform::db::connect_pool(&fleet.keys().database.url, Some(1))
            .await
            .unwrap(),
    )
}

#[tokio::test]
async fn rls_is_enabled_and_forced_on_every_tenant_table_and_the_serving_role_cannot_bypass_it() {
    let fleet = TestFleet::builder().with_auth().with_files().start().await;
    if postgres_or_note(&fleet).await.is_none() {
        return;
    }
    for owner_url in [
        fleet.keys().database.migration_url.clone().unwrap(),
        fleet.authz().database.migration_url.clone().unwrap(),
        fleet.tenants().database.migration_url.clone().unwrap(),
        fleet.auth().database.migration_url.clone().unwrap(),
        fleet.files().database.migration_url.clone().unwrap(),
    ] {
        let owner = penny_platform::db::connect(&owner_url).await.unwrap();
        let rows = owner
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT c.relname::text, c.relrowsecurity, c.relforcerowsecurity, pg_get_userbyid(c.relowner)::text, \
                        EXISTS (SELECT 1 FROM pg_policies p WHERE p.tablename = c.relname AND p.policyname = 'tenant_isolation') \
                 FROM pg_class c JOIN information_schema.columns col \
                   ON col.table_name = c.relname AND col.column_name = 'tenant_id' AND col.table_schema = 'public' \
                 WHERE c.relkind = 'r'",
            ))
            .await
            .unwrap();
        assert!(!rows.is_empty(), "tenant tables found in {owner_url}");
        // Every table of the service: a table without `tenant_id` would escape the check.
        // The exceptions are single-row counters that hold no tenant data.
        let all = owner
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' \
                 AND tablename NOT LIKE '%_migrations' \
                 AND tablename NOT IN ('authz_revision', 'auth_revocation_seq')",
            ))
            .await
            .unwrap();
        assert_eq!(
            all.len(),
            rows.len(),
            "a table without tenant_id in {owner_url}"
        );
        for row in rows {
            let table: String = row.try_get_by_index(0).unwrap();
            assert!(
                row.try_get_by_index::<bool>(1).unwrap(),
                "{table}: RLS not enabled"
            );
            assert!(
                row.try_get_by_index::<bool>(2).unwrap(),
                "{table}: RLS not forced"
            );
            assert_ne!(
                row.try_get_by_index::<String>(3).unwrap(),
                TEST_APP_ROLE,
                "{table} owned by the app role"
            );
            assert!(
                row.try_get_by_index::<bool>(4).unwrap(),
                "{table}: no tenant_isolation policy"
            );
        }
        let role = owner
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                format!(
                    "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = '{TEST_APP_ROLE}'"
                ),
            ))
            .await
            .unwrap()
            .unwrap();
        assert!(
            !role.try_get_by_index::<bool>(0).unwrap(),
            "app role is superuser"
        );
        assert!(
            !role.try_get_by_index::<bool>(1).unwrap(),
            "app role has BYPASSRLS"
        );
    }
}

#[tokio::test]
async fn without_a_tenant_nothing_is_visible_and_no_write_crosses_tenants() {
    let (fleet, a, b) = keys_fleet_with_two_tenants().await;
    let Some(conn) = postgres_or_note(&fleet).await else {
        return;
    };
    // No tenant set, and an empty one: nothing.
    let txn = conn.begin().await.unwrap();
    assert!(tenant_ids(&txn, "keyrings").await.is_empty());
    txn.execute_unprepared("SELECT set_config('app.current_tenant', '', true)")
        .await
        .unwrap();
    assert!(tenant_ids(&txn, "keyrings").await.is_empty());
    txn.commit().await.unwrap();

    // Inside tenant A: an insert carrying B's id is refused by the policy.
    let txn = penny_platform::db::begin_tenant(&conn, a).await.unwrap();
    let inserted = txn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO keyrings (tenant_id, backend, latest_version, min_decryption_version, \
             min_encryption_version, deletion_allowed, created_at, updated_at) \
             VALUES ($1, 'local', 1, 1, 0, true, now(), now())",
            [Uuid::new_v4().into()],
        ))
        .await;
    assert!(
        inserted.is_err(),
        "insert of a foreign tenant's row was accepted"
    );
    txn.rollback().await.unwrap();

    // And an update aimed at B from inside A touches nothing.
    let txn = penny_platform::db::begin_tenant(&conn, a).await.unwrap();
    let updated = txn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE keyrings SET deletion_allowed = true WHERE tenant_id = $1",
            [b.into()],
        ))
        .await
        .unwrap();
    assert_eq!(updated.rows_affected(), 0);
    txn.commit().await.unwrap();

    // Moving A's row into B is refused too.
    let txn = penny_platform::db::begin_tenant(&conn, a).await.unwrap();
    let moved = txn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE keyrings SET tenant_id = $1 WHERE tenant_id = $2",
            [b.into(), a.into()],
        ))
        .await;
    assert!(moved.is_err(), "a row was moved into another tenant");
    txn.rollback().await.unwrap();
}

#[tokio::test]
async fn a_privileged_serving_role_is_refused_at_start() {
    let fleet = TestFleet::builder().start().await;
    let Ok(admin_url) = std::env::var(penny_tests::TEST_DATABASE_ENV) else {
        eprintln!(
            "the serving-role check applies to PostgreSQL only; run with PENNY_TEST_DATABASE_URL (CI does)"
        );
        return;
    };
    let database = penny_tests::fresh_database(fleet.data_dir.path(), "keys").await;
    // Serving through the owner (a superuser here) must fail, naming the problem.
    let owner_url = database.migration_url.clone().unwrap_or(admin_url);
    let err = penny_platform::db::open::<penny_keys::migration::Migrator>(&owner_url, None)
        .await
        .expect_err("a superuser serving role is refused");
    assert!(err.to_string().contains("is a superuser"), "{err}");
}

/// Tenants' own tables: the same alternation through the tenants store, and raw SQL on the
/// same pooled connection seeing only the scoped tenant.
#[tokio::test]
async fn tenants_tables_alternating_on_one_connection_return_no_foreign_rows() {
    use penny_proto::tenants::v1 as tpb;
    use penny_proto::tenants::v1::tenant_service_client::TenantServiceClient;
    use penny_tenants::domain::UserStatus;

    let fleet = TestFleet::builder().with_tenants().start().await;
    let mut client = TenantServiceClient::new(fleet.tenants().server.channel().await);
    let admin = fleet.admin_token();
    let mut ids = Vec::new();
    for slug in ["alpha", "bravo"] {
        let created = client
            .create_tenant(with_token(
                tpb::CreateTenantRequest {
                    request_id: Uuid::new_v4().to_string(),
                    name: slug.into(),
                    slug: slug.into(),
                    owner: Some(tpb::OwnerSpec {
                        email: format!("o@{slug}.test"),
                        display_name: "O".into(),
                    }),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner();
        let id = Uuid::parse_str(&created.tenant.unwrap().id).unwrap();
        for i in 0..3 {
            client
                .create_user(with_token(
                    tpb::CreateUserRequest {
                        tenant_id: id.to_string(),
                        email: format!("u{i}@{slug}.test"),
                        display_name: "U".into(),
                        role: String::new(),
                    },
                    &admin,
                ))
                .await
                .unwrap();
        }
        client
            .create_workspace(with_token(
                tpb::CreateWorkspaceRequest {
                    tenant_id: id.to_string(),
                    name: "general".into(),
                    description: String::new(),
                },
                &admin,
            ))
            .await
            .unwrap();
        ids.push(id);
    }
    let (a, b) = (ids[0], ids[1]);
    let conn = penny_platform::db::connect_pool(&fleet.tenants().database.url, Some(1))
        .await
        .unwrap();
    let store = penny_tenants::store::Store::new(conn.clone());
    let postgres = fleet.tenants().database.migration_url.is_some();
    let statuses = [UserStatus::Active, UserStatus::Suspended];
    let mut foreign = 0usize;
    for i in 0..10_000 {
        let tenant = if i % 2 == 0 { a } else { b };
        let users = store
            .list_users(tenant, &statuses, None, None, 100)
            .await
            .unwrap();
        if users.len() != 4 {
            foreign += 1;
        }
        foreign += users.iter().filter(|u| u.tenant_id != tenant).count();
        if store.tenant(tenant).await.unwrap().map(|t| t.id) != Some(tenant) {
            foreign += 1;
        }
        if postgres && i % 10 == 0 {
            let txn = penny_platform::db::begin_tenant(&conn, tenant)
                .await
                .unwrap();
            for table in ["tenants", "tenant_users", "tenant_workspaces"] {
                foreign += tenant_ids(&txn, table)
                    .await
                    .iter()
                    .filter(|t| **t != tenant)
                    .count();
            }
            txn.commit().await.unwrap();
        }
    }
    assert_eq!(foreign, 0);

    if !postgres {
        eprintln!(
            "row level security exists on PostgreSQL only; run with PENNY_TEST_DATABASE_URL (CI does)"
        );
        return;
    }
    // No tenant: not even the platform tenant's row is visible.
    let txn = conn.begin().await.unwrap();
    for table in ["tenants", "tenant_users", "tenant_workspaces"] {
        assert!(tenant_ids(&txn, table).await.is_empty(), "{table}");
    }
    txn.commit().await.unwrap();
    // Inside A, a user carrying B's tenant id is refused.
    let txn = penny_platform::db::begin_tenant(&conn, a).await.unwrap();
    let inserted = txn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO tenant_users (id, tenant_id, email, email_key, display_name, status, \
             suspend_reason, created_at, updated_at) \
             VALUES ($1, $2, 'x@y', 'x@y', 'X', 'active', '', now(), now())",
            [Uuid::new_v4().into(), b.into()],
        ))
        .await;
    assert!(inserted.is_err(), "a user was inserted into another tenant");
    txn.rollback().await.unwrap();
}
