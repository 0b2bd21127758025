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

/// One wrong password, as Login handles it: admitted, checked, failed.
async fn wrong(
    store: &Store,
    tenant: Uuid,
    keys: &[CounterKey],
    policy: &LockoutPolicy,
    now: OffsetDateTime,
) -> Verdict {
    let verdict = store
        .begin_attempt(tenant, keys, policy, now)
        .await
        .unwrap();
    if verdict == Verdict::Proceed {
        store
            .attempt_failed(tenant, keys, policy, now)
            .await
            .unwrap();
    }
    verdict
}

#[tokio::test]
async fn six_wrong_passwords_lock_the_account_until_the_lockout_ends() {
    let dir = TempDir::new("penny-auth");
    let store = store(&dir).await;
    let tenant = Uuid::new_v4();
    let policy = LockoutPolicy::default();
    let keys = CounterKey::for_attempt("Ada@example.org", "192.0.2.7");
    let t0 = OffsetDateTime::now_utc();
    // Five wrong, then the right one: in.
    for i in 0..5 {
        assert_eq!(
            wrong(&store, tenant, &keys, &policy, at(t0, i)).await,
            Verdict::Proceed
        );
    }
    assert_eq!(
        store
            .begin_attempt(tenant, &keys, &policy, at(t0, 5))
            .await
            .unwrap(),
        Verdict::Proceed
    );
    store
        .attempt_succeeded(tenant, &keys, at(t0, 5))
        .await
        .unwrap();
    // Six wrong (after the window, so the IP key's five failures above are forgotten):
    // the sixth failure locks.
    for i in 0..6 {
        assert_eq!(
            wrong(&store, tenant, &keys, &policy, at(t0, 400 + i)).await,
            Verdict::Proceed
        );
    }
    // The right password now is refused before it is even checked.
    assert!(matches!(
        store
            .begin_attempt(tenant, &keys, &policy, at(t0, 460))
            .await
            .unwrap(),
        Verdict::Locked(_)
    ));
    // The same account from another IP is locked too (the account key), and so is another
    // account from the same IP (six failures are more than five on the IP key as well); an
    // account elsewhere is not.
    let elsewhere = CounterKey::for_attempt("ada@EXAMPLE.org", "198.51.100.1");
    assert!(matches!(
        store
            .begin_attempt(tenant, &elsewhere, &policy, at(t0, 461))
            .await
            .unwrap(),
        Verdict::Locked(_)
    ));
    let same_ip = CounterKey::for_attempt("bob@example.org", "192.0.2.7");
    assert!(matches!(
        store
            .begin_attempt(tenant, &same_ip, &policy, at(t0, 462))
            .await
            .unwrap(),
        Verdict::Locked(_)
    ));
    let other = CounterKey::for_attempt("bob@example.org", "203.0.113.9");
    assert_eq!(
        store
            .begin_attempt(tenant, &other, &policy, at(t0, 462))
            .await
            .unwrap(),
        Verdict::Proceed
    );
    // Another tenant's counters are its own.
    assert_eq!(
        store
            .begin_attempt(Uuid::new_v4(), &keys, &policy, at(t0, 463))
            .await
            .unwrap(),
        Verdict::Proceed
    );
    // After the lockout (15 minutes from the sixth failure) the right password gets through
    // and the account starts over.
    let after = at(t0, 405 + 15 * 60);
    assert_eq!(
        store
            .begin_attempt(tenant, &keys, &policy, after)
            .await
            .unwrap(),
        Verdict::Proceed
    );
    store.attempt_succeeded(tenant, &keys, after).await.unwrap();
    let account = store.counter(tenant, &keys[0]).await.unwrap().unwrap();
    assert_eq!(
        (account.failures, account.pending, account.lockouts),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn twenty_parallel_wrong_attempts_get_no_more_checks_than_six_in_a_row() {
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
                    store
                        .attempt_failed(tenant, &keys, &policy, now)
                        .await
                        .unwrap();
                    1
                }
                Verdict::Busy | Verdict::Locked(_) => 0,
            }
        });
    }
    let mut checked = 0;
    while let Some(joined) = tasks.join_next().await {
        checked += joined.unwrap();
    }
    // Sequentially, six wrong passwords are checked and the sixth locks: so here.
    assert_eq!(checked, 6, "a burst got extra password checks");
    let keys = CounterKey::for_attempt("ada@example.org", "192.0.2.7");
    let account = store.counter(tenant, &keys[0]).await.unwrap().unwrap();
    assert_eq!(account.lockouts, 1, "one lockout, not several");
    assert!(account.locked_until.is_some());
    assert_eq!(account.pending, 0, "nothing left in flight");
}

pub(crate) mod service {
    use penny_proto::auth::v1 as pb;
    use penny_proto::auth::v1::auth_service_client::AuthServiceClient;
    use penny_proto::tenants::v1 as tpb;
    use penny_proto::tenants::v1::tenant_service_client::TenantServiceClient;
    use penny_tests::{TestFleet, error_reason as reason, with_token};
    use tonic::Code;
    use tonic::transport::Channel;
    use tonic_types::StatusExt;
    use uuid::Uuid;

    pub(crate) struct Harness {
        pub(crate) fleet: TestFleet,
        pub(crate) auth: AuthServiceClient<Channel>,
        pub(crate) tenants: TenantServiceClient<Channel>,
        pub(crate) admin: String,
        /// The trusted front end that calls Login and SetPassword for end users.
        pub(crate) frontend: String,
    }

    pub(crate) struct Account {
        pub(crate) tenant: Uuid,
        pub(crate) user: Uuid,
        pub(crate) email: String,
    }

    impl Harness {
        pub(crate) async fn start() -> Self {
            Self::start_with(TestFleet::builder()).await
        }

        pub(crate) async fn start_with(builder: penny_tests::TestFleetBuilder) -> Self {
            let fleet = builder.with_auth().start().await;
            let auth = AuthServiceClient::new(fleet.auth().server.channel().await);
            let tenants = TenantServiceClient::new(fleet.tenants().server.channel().await);
            let admin = fleet.admin_token();
            let frontend = fleet.service_token();
            Self {
                fleet,
                auth,
                tenants,
                admin,
                frontend,
            }
        }

        pub(crate) async fn tenant(&mut self, slug: &str, mfa_required: bool) -> Account {
            let created = self
                .tenants
                .create_tenant(with_token(
                    tpb::CreateTenantRequest {
                        request_id: Uuid::new_v4().to_string(),
                        name: slug.into(),
                        slug: slug.into(),
                        security_policy: Some(tpb::SecurityPolicy {
                            mfa_required,
                            ..Default::default()
                        }),
                        owner: Some(tpb::OwnerSpec {
                            email: format!("Owner@{slug}.test"),
                            display_name: "Owner".into(),
                        }),
                        ..Default::default()
                    },
                    &self.admin,
                ))
                .await
                .unwrap()
                .into_inner();
            let owner = created.owner.unwrap();
            Account {
                tenant: Uuid::parse_str(&owner.tenant_id).unwrap(),
                user: Uuid::parse_str(&owner.id).unwrap(),
                email: owner.email,
            }
        }

        pub(crate) async fn set_password(&mut self, account: &Account, password: &str) {
            self.auth
                .set_password(with_token(
                    pb::SetPasswordRequest {
                        grant: Some(pb::set_password_request::Grant::User(pb::UserRef {
                            tenant_id: account.tenant.to_string(),
                            user_id: account.user.to_string(),
                        })),
                        new_password: password.into(),
                        ..Default::default()
                    },
                    &self.admin,
                ))
                .await
                .unwrap();
        }

        pub(crate) async fn login(
            &mut self,
            tenant: Uuid,
            email: &str,
            password: &str,
        ) -> Result<pb::Tokens, tonic::Status> {
            let response = self
                .auth
                .login(with_token(
                    pb::LoginRequest {
                        tenant_id: tenant.to_string(),
                        email: email.into(),
                        password: password.into(),
                        ip_address: "192.0.2.10".into(),
                        user_agent: "penny-tests".into(),
                    },
                    &self.frontend,
                ))
                .await?
                .into_inner();
            match response.result {
                Some(pb::login_response::Result::Tokens(tokens)) => Ok(tokens),
                other => panic!("unexpected login result {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_invite_sets_a_password_once_and_login_gives_a_token_every_service_accepts() {
        let mut h = Harness::start().await;
        let account = h.tenant("acme", false).await;
        // Staff mint an invite; only its hash is kept.
        let minted = h
            .auth
            .set_password(with_token(
                pb::SetPasswordRequest {
                    grant: Some(pb::set_password_request::Grant::User(pb::UserRef {
                        tenant_id: account.tenant.to_string(),
                        user_id: account.user.to_string(),
                    })),
                    ..Default::default()
                },
                &h.admin,
            ))
            .await
            .unwrap()
            .into_inner();
        let superseded = minted.set_password_token;
        // A second invite retires the first: only the newest is usable.
        let minted = h
            .auth
            .set_password(with_token(
                pb::SetPasswordRequest {
                    grant: Some(pb::set_password_request::Grant::User(pb::UserRef {
                        tenant_id: account.tenant.to_string(),
                        user_id: account.user.to_string(),
                    })),
                    ..Default::default()
                },
                &h.admin,
            ))
            .await
            .unwrap()
            .into_inner();
        let invite = minted.set_password_token;
        assert!(invite.starts_with("pst_"), "{invite}");
        assert_ne!(invite, superseded);
        let status = h
            .auth
            .set_password(with_token(
                pb::SetPasswordRequest {
                    grant: Some(pb::set_password_request::Grant::Token(superseded)),
                    new_password: "a long and unusual passphrase".into(),
                    ..Default::default()
                },
                &h.frontend,
            ))
            .await
            .unwrap_err();
        assert_eq!(reason(&status), "SET_PASSWORD_TOKEN_INVALID");
        assert!(minted.set_password_token_expire_time.is_some());
        let with_invite = |password: &str| {
            with_token(
                pb::SetPasswordRequest {
                    grant: Some(pb::set_password_request::Grant::Token(invite.clone())),
                    new_password: password.into(),
                    ..Default::default()
                },
                &h.frontend,
            )
        };
        // A common password is refused, and the invite survives the refusal.
        let status = h
            .auth
            .set_password(with_invite("Password123"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(reason(&status), "PASSWORD_POLICY_VIOLATION");
        assert!(!status.message().contains("Password123"));
        let done = h
            .auth
            .set_password(with_invite("a long and unusual passphrase"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(done.user_id, account.user.to_string());
        // Used once: never again.
        let status = h
            .auth
            .set_password(with_invite("another unusual passphrase"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason(&status), "SET_PASSWORD_TOKEN_INVALID");

        // The email is matched case-insensitively.
        let tokens = h
            .login(
                account.tenant,
                &account.email.to_uppercase(),
                "a long and unusual passphrase",
            )
            .await
            .unwrap();
        assert_eq!(tokens.token_type, "Bearer");
        assert_eq!(tokens.user_id, account.user.to_string());
        assert_eq!(tokens.tenant_id, account.tenant.to_string());
        // Its claims: the user, the tenant, the session, the roles bound in authz, as a
        // verifier that follows auth's JWKS (as every service's does) reads them.
        let verifier = h.fleet.config.verifier.following_revocations(
            h.fleet.auth().server.channel().await,
            penny_platform::ServiceCredential::fixed(h.fleet.service_token()),
        );
        penny_tests::assert_eventually!(
            std::time::Duration::from_secs(5),
            verifier.verify(&tokens.access_token).is_ok()
        );
        let principal = verifier.verify(&tokens.access_token).unwrap();
        assert_eq!(principal.id, account.user.to_string());
        assert_eq!(principal.tenant_id, account.tenant);
        assert_eq!(
            principal.session_id.as_deref(),
            Some(tokens.session_id.as_str())
        );
        assert_eq!(principal.roles, ["owner"]);
        // And another service accepts it: the owner reads the tenant.
        let tenant = h
            .tenants
            .get_tenant(with_token(
                tpb::GetTenantRequest {
                    tenant_id: account.tenant.to_string(),
                },
                &tokens.access_token,
            ))
            .await
            .unwrap()
            .into_inner()
            .tenant
            .unwrap();
        assert_eq!(tenant.slug, "acme");

        // The JWKS is public and names the key that signed the token.
        let jwks = AuthServiceClient::new(h.fleet.auth().server.channel().await)
            .get_jwks(pb::GetJwksRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(jwks.keys.len(), 1);
        let header = jsonwebtoken::decode_header(&tokens.access_token).unwrap();
        assert_eq!(Some(jwks.keys[0].kid.clone()), header.kid);
        assert_eq!(jwks.keys[0].alg, "EdDSA");
        // The auth database holds an argon2id hash, never the password.
        let owner = penny_platform::db::connect(
            h.fleet
                .auth()
                .database
                .migration_url
                .as_deref()
                .unwrap_or(&h.fleet.auth().database.url),
        )
        .await
        .unwrap();
        use sea_orm::ConnectionTrait;
        let rows = owner
            .query_all_raw(sea_orm::Statement::from_string(
                owner.get_database_backend(),
                "SELECT password_hash FROM auth_credentials",
            ))
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        let stored: String = rows[0].try_get_by_index(0).unwrap();
        assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(!stored.contains("passphrase"));
    }

    #[tokio::test]
    async fn unknown_user_wrong_password_locked_and_suspended_all_look_the_same() {
        let mut h = Harness::start().await;
        let account = h.tenant("acme", false).await;
        let right = "correct horse battery staple";
        h.set_password(&account, right).await;

        let mut failures = Vec::new();
        failures.push(
            h.login(account.tenant, "nobody@acme.test", right)
                .await
                .unwrap_err(),
        );
        failures.push(
            h.login(Uuid::new_v4(), &account.email, right)
                .await
                .unwrap_err(),
        );
        // Six wrong passwords: the sixth locks the account.
        for i in 0..6 {
            failures.push(
                h.login(account.tenant, &account.email, &format!("wrong guess {i}"))
                    .await
                    .unwrap_err(),
            );
        }
        // Then the right password is refused too, exactly like the rest.
        failures.push(
            h.login(account.tenant, &account.email, right)
                .await
                .unwrap_err(),
        );
        for status in &failures {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            assert_eq!(reason(status), "INVALID_CREDENTIALS");
            assert_eq!(status.message(), failures[0].message());
        }

        // A suspended user with the right password: the same answer.
        let other = h.tenant("bravo", false).await;
        h.set_password(&other, right).await;
        h.login(other.tenant, &other.email, right).await.unwrap();
        h.tenants
            .suspend_user(with_token(
                tpb::SuspendUserRequest {
                    tenant_id: other.tenant.to_string(),
                    user_id: other.user.to_string(),
                    reason: "investigation".into(),
                    alert_id: String::new(),
                },
                &h.admin,
            ))
            .await
            .unwrap();
        let status = h
            .login(other.tenant, &other.email, right)
            .await
            .unwrap_err();
        assert_eq!(reason(&status), "INVALID_CREDENTIALS");
        assert_eq!(status.message(), failures[0].message());
    }

    #[tokio::test]
    async fn only_trusted_callers_sign_users_in() {
        let mut h = Harness::start().await;
        let account = h.tenant("acme", false).await;
        let user_token = h.fleet.user_token(account.tenant, &["owner"]);
        let status = h
            .auth
            .login(with_token(
                pb::LoginRequest {
                    tenant_id: account.tenant.to_string(),
                    email: account.email.clone(),
                    password: "whatever it is".into(),
                    ip_address: "192.0.2.10".into(),
                    user_agent: String::new(),
                },
                &user_token,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        let status = h
            .auth
            .login(with_token(
                pb::LoginRequest {
                    tenant_id: "x".into(),
                    email: String::new(),
                    password: String::new(),
                    ip_address: "999.1.1.1".into(),
                    user_agent: "\u{7}".into(),
                },
                &h.frontend,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let mut fields: Vec<String> = status
            .get_error_details()
            .bad_request()
            .unwrap()
            .field_violations
            .iter()
            .map(|v| v.field.clone())
            .collect();
        fields.sort();
        assert_eq!(
            fields,
            ["email", "ip_address", "password", "tenant_id", "user_agent"]
        );
    }
}
