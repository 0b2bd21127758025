//! The auth service's foundations against a real database: lockout counters that hold
//! under concurrency, and argon2id passwords.

use std::time::Duration;

use penny_auth::domain::lockout::{CounterKey, LockoutPolicy, Verdict};
use penny_auth::domain::password::PasswordHasherPool;
use penny_auth::store::Store;
use penny_tests::{TempDir, fresh_database};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use time::OffsetDateTime;
use uuid::Uuid;

async fn store(dir: &TempDir) -> Store {
    penny_tests::init();
    let database = fresh_database(dir.path(), "auth").await;
    let db = penny_platform::db::open::<penny_auth::migration::Migrator>(
        &database.url,
        database.migration_url.as_deref(),
    )
    .await
    .expect("open the auth database");
    if let Some(owner_url) = &database.migration_url {
        // On PostgreSQL the counters are under row level security like every tenant table.
        let owner = penny_platform::db::connect(owner_url).await.unwrap();
        let row = owner
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = 'auth_lockouts'",
            ))
            .await
            .unwrap()
            .unwrap();
        assert!(row.try_get_by_index::<bool>(0).unwrap());
        assert!(row.try_get_by_index::<bool>(1).unwrap());
    }
    Store::new(db)
}

fn at(base: OffsetDateTime, secs: u64) -> OffsetDateTime {
    base + Duration::from_secs(secs)
}

#[tokio::test]
async fn six_wrong_passwords_lock_the_account_until_the_lockout_ends() {
    let dir = TempDir::new("penny-auth");
    let store = store(&dir).await;
    let tenant = Uuid::new_v4();
    let policy = LockoutPolicy::default();
    let keys = CounterKey::for_attempt("Ada@example.org", "192.0.2.7");
    let t0 = OffsetDateTime::now_utc();
    let mut verdicts = Vec::new();
    for i in 0..6 {
        verdicts.push(
            store
                .begin_attempt(tenant, &keys, &policy, at(t0, i))
                .await
                .unwrap(),
        );
    }
    assert_eq!(&verdicts[..5], &[Verdict::Proceed; 5]);
    assert!(matches!(verdicts[5], Verdict::Locked(_)), "{verdicts:?}");
    // The right password now is refused before it is even checked.
    assert!(matches!(
        store
            .begin_attempt(tenant, &keys, &policy, at(t0, 60))
            .await
            .unwrap(),
        Verdict::Locked(_)
    ));
    // The same account from another IP is locked too (the account key), and another
    // account from the same IP is not (five failures are not more than five).
    let elsewhere = CounterKey::for_attempt("ada@EXAMPLE.org", "198.51.100.1");
    assert!(matches!(
        store
            .begin_attempt(tenant, &elsewhere, &policy, at(t0, 61))
            .await
            .unwrap(),
        Verdict::Locked(_)
    ));
    let other = CounterKey::for_attempt("bob@example.org", "203.0.113.9");
    assert_eq!(
        store
            .begin_attempt(tenant, &other, &policy, at(t0, 62))
            .await
            .unwrap(),
        Verdict::Proceed
    );
    // Another tenant's counters are its own.
    assert_eq!(
        store
            .begin_attempt(Uuid::new_v4(), &keys, &policy, at(t0, 63))
            .await
            .unwrap(),
        Verdict::Proceed
    );
    // After the lockout (15 minutes from the sixth failure) the right password gets through
    // and the account starts over.
    let after = at(t0, 5 + 15 * 60);
    assert_eq!(
        store
            .begin_attempt(tenant, &keys, &policy, after)
            .await
            .unwrap(),
        Verdict::Proceed
    );
    store.attempt_succeeded(tenant, &keys, after).await.unwrap();
    let account = store.counter(tenant, &keys[0]).await.unwrap().unwrap();
    assert_eq!((account.failures, account.lockouts), (0, 0));
}

#[tokio::test]
async fn twenty_parallel_wrong_attempts_are_counted_exactly() {
    let dir = TempDir::new("penny-auth");
    let store = store(&dir).await;
    let tenant = Uuid::new_v4();
    let policy = LockoutPolicy::default();
    let hasher = PasswordHasherPool::new(2).unwrap();
    let stored = hasher.hash("the right password").await.unwrap();
    let now = OffsetDateTime::now_utc();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let (store, hasher, stored) = (store.clone(), hasher.clone(), stored.clone());
        tasks.spawn(async move {
            let keys = CounterKey::for_attempt("ada@example.org", "192.0.2.7");
            match store
                .begin_attempt(tenant, &keys, &policy, now)
                .await
                .unwrap()
            {
                // Only an admitted attempt reaches the password check.
                Verdict::Proceed => {
                    let ok = hasher
                        .verify(&format!("guess {i}"), Some(&stored))
                        .await
                        .unwrap();
                    assert!(!ok);
                    1
                }
                Verdict::Locked(_) => 0,
            }
        });
    }
    let mut checked = 0;
    while let Some(joined) = tasks.join_next().await {
        checked += joined.unwrap();
    }
    assert_eq!(
        checked, 5,
        "exactly the threshold reached the password check"
    );
    let keys = CounterKey::for_attempt("ada@example.org", "192.0.2.7");
    let account = store.counter(tenant, &keys[0]).await.unwrap().unwrap();
    assert_eq!(account.lockouts, 1, "one lockout, not several");
    assert!(account.locked_until.is_some());
}
