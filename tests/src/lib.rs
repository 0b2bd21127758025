//! The test fleet: real services on ephemeral ports with fresh databases, and typed
//! clients, for the fleet-level tests in `fleet/`.
//!
//! `TestFleet::builder()` chooses what to start; every server runs the same
//! `penny_platform::serve` stack as production. Databases are temporary SQLite files, or a
//! fresh PostgreSQL database per fleet when `PENNY_TEST_DATABASE_URL` names a server
//! (`postgres://postgres@127.0.0.1:5432/postgres`).

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod clamd;
pub mod echo;
pub mod s3;
pub mod tls;
pub mod tokens;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::Duration;

use penny_platform::principal::{PLATFORM_TENANT_ID, PrincipalKind, TokenVerifier};
use penny_platform::server::ServeConfig;
use penny_platform::signing::{SigningKey, TokenGrant};
use sea_orm::ConnectionTrait;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

/// Environment variable naming a PostgreSQL server for tests.
pub const TEST_DATABASE_ENV: &str = "PENNY_TEST_DATABASE_URL";

static INIT: Once = Once::new();

/// Process-wide test setup: crypto provider, and logs when `TEST_LOG=1`.
pub fn init() {
    INIT.call_once(|| {
        penny_platform::install_crypto_provider();
        if std::env::var("TEST_LOG").is_ok_and(|v| v == "1") {
            let _ = tracing_subscriber_init();
        }
    });
}

fn tracing_subscriber_init() -> anyhow::Result<()> {
    penny_platform::telemetry::init(penny_platform::telemetry::LogFormat::Text, "penny-tests")
        .map(std::mem::forget)
}

/// Polls `check` until it holds or `within` passes; for things that settle.
#[macro_export]
macro_rules! assert_eventually {
    ($within:expr, $check:expr) => {{
        let deadline = std::time::Instant::now() + $within;
        loop {
            if $check {
                break;
            }
            if std::time::Instant::now() >= deadline {
                panic!(
                    "condition did not hold within {:?}: {}",
                    $within,
                    stringify!($check)
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The role test servers use on PostgreSQL: owns nothing, neither superuser nor BYPASSRLS.
pub const TEST_APP_ROLE: &str = "penny_test_app";

/// A database for one service of one test.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    /// What the service serves through (on PostgreSQL, the unprivileged app role).
    pub url: String,
    /// The owner's URL for migrations (PostgreSQL only).
    pub migration_url: Option<String>,
}

impl TestDatabase {
    /// The URL that sees every row: the owner's on PostgreSQL (row level security does not
    /// bind it), the file on SQLite. For tests that inspect what a service stored.
    pub fn owner_url(&self) -> String {
        self.migration_url
            .clone()
            .unwrap_or_else(|| self.url.clone())
    }
}

/// A database for one service of one test: a SQLite file in `dir`, or a fresh PostgreSQL
/// database when [`TEST_DATABASE_ENV`] is set, served through [`TEST_APP_ROLE`] and migrated
/// through the admin URL, as production does.
pub async fn fresh_database(dir: &Path, name: &str) -> TestDatabase {
    match std::env::var(TEST_DATABASE_ENV) {
        Ok(admin_url) if !admin_url.is_empty() => {
            let db_name = format!("penny_t_{}_{}", name, Uuid::new_v4().simple());
            let admin = penny_platform::db::connect(&admin_url)
                .await
                .expect("connect to PENNY_TEST_DATABASE_URL");
            admin
                .execute_unprepared(&format!("CREATE DATABASE \"{db_name}\""))
                .await
                .expect("create test database");
            // Roles are cluster-wide: create the app role once, whoever gets there first.
            admin
                .execute_unprepared(&format!(
                    "DO $$ BEGIN CREATE ROLE {TEST_APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE; \
                     EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
                ))
                .await
                .expect("create the test app role");
            admin.close().await.ok();
            let migration_url = replace_database(&admin_url, &db_name);
            TestDatabase {
                url: replace_user(&migration_url, TEST_APP_ROLE),
                migration_url: Some(migration_url),
            }
        }
        _ => TestDatabase {
            url: penny_platform::db::sqlite_url(dir, name),
            migration_url: None,
        },
    }
}

/// The files rows no reader sees (uploads mid-commit, deletions half done), of every
/// tenant and whatever their age: what a sweep would remove sooner or later.
pub async fn hidden_file_rows(
    store: &penny_files::store::Store,
) -> Vec<penny_files::domain::StoredFile> {
    let far = time::OffsetDateTime::now_utc() + Duration::from_secs(3600);
    store
        .stale_uncommitted(far, None, 1000)
        .await
        .expect("read the files table")
}

/// The URL of a fresh database, for tests of the platform's database helpers.
pub async fn fresh_database_url(dir: &Path, name: &str) -> String {
    let database = fresh_database(dir, name).await;
    database.migration_url.unwrap_or(database.url)
}

/// `postgres://old@h/db` → `postgres://new@h/db` (no password: trust auth on loopback).
pub fn replace_user(url: &str, user: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let host_start = rest.find('@').map_or(0, |i| i + 1);
    format!("{}{user}@{}", &url[..scheme_end], &rest[host_start..])
}

/// `postgres://u@h:p/old?x` → `postgres://u@h:p/new?x`.
pub fn replace_database(url: &str, db_name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..].find('/').map(|i| i + scheme_end);
    let host_part = path_start.map_or(base, |i| &base[..i]);
    match query {
        Some(query) => format!("{host_part}/{db_name}?{query}"),
        None => format!("{host_part}/{db_name}"),
    }
}

/// One server of the fleet.
#[derive(Debug)]
pub struct RunningServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl RunningServer {
    /// Starts `serve` on an ephemeral port.
    pub async fn start<F, Fut>(serve: F) -> Self
    where
        F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(listener, serve)
    }

    /// Starts `serve` on a listener bound beforehand (so other servers can be told its
    /// address before it runs).
    pub fn start_on<F, Fut>(listener: TcpListener, serve: F) -> Self
    where
        F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, stopped));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A channel to it.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect")
    }

    /// Asks it to stop and waits until it has drained.
    pub async fn shutdown(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What a [`TestFleet`] runs.
#[derive(Debug, Default)]
pub struct TestFleetBuilder {
    echo: bool,
    keys: bool,
    authz: bool,
    authz_replicas: usize,
    tenants: bool,
    auth: bool,
    audit: bool,
    audit_checkpoint_every: Option<u64>,
    monitor_rules: Option<penny_audit::monitor::rules::RuleSet>,
    concurrency_limit: Option<usize>,
    tls: Option<penny_platform::server::TlsMaterial>,
    signing_key_rotation: Option<Duration>,
    service_token_lifetime: Option<Duration>,
    service_clients: Vec<penny_auth::service_tokens::ClientSpec>,
    files: bool,
    files_quarantine: bool,
    files_on_s3: bool,
    files_stale_after: Option<Duration>,
    files_rewrap_every: Option<Duration>,
}

impl TestFleetBuilder {
    /// Start the files service (with the keys and authz services it calls, and a clamd
    /// of its own).
    pub fn with_files(mut self) -> Self {
        self.files = true;
        self.keys = true;
        self.authz = true;
        self
    }

    /// Store files' objects in a bucket of an S3-compatible server (moto's) instead of a
    /// directory.
    pub fn files_on_s3(mut self) -> Self {
        self.files_on_s3 = true;
        self
    }

    /// Let files sweep only what is `age` old, at start and then every `age` (by default
    /// it sweeps everything, at start only).
    pub fn files_stale_after(mut self, age: Duration) -> Self {
        self.files_stale_after = Some(age);
        self
    }

    /// Let files look every `every` for tenants whose files are behind their key and
    /// rewrap them in the background (by default it never does).
    pub fn files_rewrap_every(mut self, every: Duration) -> Self {
        self.files_rewrap_every = Some(every);
        self
    }

    /// Let files keep unscannable uploads in quarantine instead of refusing them.
    pub fn files_quarantine_unscannable(mut self) -> Self {
        self.files_quarantine = true;
        self
    }

    /// Start the test-only echo service on the standard stack.
    pub fn with_echo(mut self) -> Self {
        self.echo = true;
        self
    }

    /// Start the keys service: the local engine, or Vault when
    /// `PENNY_TEST_KEYS_BACKEND=vault` (with `VAULT_ADDR` and `VAULT_TOKEN`).
    pub fn with_keys(mut self) -> Self {
        self.keys = true;
        self
    }

    /// Start the authz service.
    pub fn with_authz(mut self) -> Self {
        self.authz = true;
        self
    }

    /// Run a second authz replica on the same database, lagging (its feed follower polls
    /// once an hour), and let the platform's authorizer spread its calls over both.
    pub fn with_two_authz_replicas(mut self) -> Self {
        self.authz = true;
        self.authz_replicas = 2;
        self
    }

    /// Start the tenants service, with the keys and authz services it calls.
    pub fn with_tenants(mut self) -> Self {
        self.tenants = true;
        self.keys = true;
        self.authz = true;
        self
    }

    /// Start the auth service, with the tenants, keys and authz services it needs. Every
    /// server follows it (revocations, and the JWKS of the keys it signs with).
    pub fn with_auth(mut self) -> Self {
        self.auth = true;
        self.with_tenants()
    }

    /// Start the audit service (with authz, which decides who may read the trail).
    pub fn with_audit(mut self) -> Self {
        self.audit = true;
        self.authz = true;
        self
    }

    /// Run audit's monitor with these rules (instead of the guide's defaults).
    pub fn monitor_rules(mut self, rules: penny_audit::monitor::rules::RuleSet) -> Self {
        self.monitor_rules = Some(rules);
        self
    }

    /// Let audit sign a checkpoint every `every` events (tests of checkpoints).
    pub fn audit_checkpoint_every(mut self, every: u64) -> Self {
        self.audit_checkpoint_every = Some(every);
        self
    }

    /// Provision these service clients in auth.
    pub fn service_clients(mut self, clients: Vec<penny_auth::service_tokens::ClientSpec>) -> Self {
        self.service_clients = clients;
        self
    }

    /// Let auth's service tokens live this long (tests of renewal).
    pub fn service_token_lifetime(mut self, lifetime: Duration) -> Self {
        self.service_token_lifetime = Some(lifetime);
        self
    }

    /// Rotate auth's signing key this often (tests of rotation).
    pub fn signing_key_rotation(mut self, every: Duration) -> Self {
        self.signing_key_rotation = Some(every);
        self
    }

    /// Serve TLS (and mTLS when the material names a client CA).
    pub fn tls(mut self, material: penny_platform::server::TlsMaterial) -> Self {
        self.tls = Some(material);
        self
    }

    /// Override the concurrency limit of every server.
    pub fn concurrency_limit(mut self, limit: usize) -> Self {
        self.concurrency_limit = Some(limit);
        self
    }

    /// Starts the chosen services.
    pub async fn start(self) -> TestFleet {
        init();
        let data_dir = TempDir::new("penny-fleet");
        let signing = SigningKey::load_or_create(data_dir.path()).expect("signing key");
        let verifier = TokenVerifier::new(&signing.jwks()).expect("verifier");
        let mut config = ServeConfig::new_for_dev(verifier);
        config.readiness_interval = Duration::from_millis(100);
        if let Some(limit) = self.concurrency_limit {
            config.concurrency_limit = limit;
        }
        config.tls = self.tls;
        // With auth, every server follows its revocation stream, as in production: bind
        // auth's port first so the others know where it will be.
        let auth_listener = if self.auth {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            config.auth = Some(
                Endpoint::from_shared(format!("http://{addr}"))
                    .expect("endpoint")
                    .connect_lazy(),
            );
            Some(listener)
        } else {
            None
        };
        // With authz running, permission requirements are decided by it, in every server
        // (authz's own included, as in `penny dev`): bind its ports first, so every server
        // starts with the authorizer.
        let authz_listeners = if self.authz {
            let mut listeners = Vec::new();
            for _ in 0..self.authz_replicas.max(1) {
                listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
            }
            listeners
        } else {
            Vec::new()
        };
        if !authz_listeners.is_empty() {
            let service_token = signing
                .mint(&TokenGrant {
                    subject: "svc-platform".into(),
                    tenant_id: PLATFORM_TENANT_ID,
                    roles: vec![],
                    kind: PrincipalKind::Service,
                    session_id: None,
                    lifetime: Duration::from_secs(3600),
                })
                .expect("service token");
            let endpoints: Vec<Endpoint> = authz_listeners
                .iter()
                .map(|l| {
                    let addr = l.local_addr().expect("local addr");
                    Endpoint::from_shared(format!("http://{addr}")).expect("endpoint")
                })
                .collect();
            // With two replicas, calls (and the change feed) go to either, as behind a
            // balancer.
            let channel = if endpoints.len() > 1 {
                Channel::balance_list(endpoints.into_iter())
            } else {
                endpoints[0].connect_lazy()
            };
            config.authorizer = Some(penny_platform::Authorizer::new(
                channel,
                penny_platform::ServiceCredential::fixed(service_token),
            ));
        }
        // With audit, every server records its calls there (bound first, so they all know
        // where it will be).
        let audit_listener = if self.audit {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let token = signing
                .mint(&TokenGrant {
                    subject: "svc-audit-client".into(),
                    tenant_id: PLATFORM_TENANT_ID,
                    roles: vec![],
                    kind: PrincipalKind::Service,
                    session_id: None,
                    lifetime: Duration::from_secs(3600),
                })
                .expect("service token");
            config.audit = Some(
                penny_platform::AuditClient::new(
                    Endpoint::from_shared(format!("http://{addr}"))
                        .expect("endpoint")
                        .connect_lazy(),
                    penny_platform::ServiceCredential::fixed(token),
                    data_dir.path().join("audit-spool"),
                )
                .expect("audit spool"),
            );
            Some(listener)
        } else {
            None
        };
        let keys = if self.keys {
            Some(start_keys(&config, data_dir.path()).await)
        } else {
            None
        };
        let mut authz_listeners = authz_listeners.into_iter();
        let authz = match authz_listeners.next() {
            Some(listener) => {
                let database = fresh_database(data_dir.path(), "authz").await;
                Some(
                    start_authz_on(&config, database, penny_authz::service::FEED_POLL, listener)
                        .await,
                )
            }
            None => None,
        };
        let authz_replica = match (&authz, authz_listeners.next()) {
            // The second replica lags: its follower polls once an hour, so only a
            // caller's min_revision makes it catch up with changes made through the first.
            (Some(first), Some(listener)) => Some(
                start_authz_on(
                    &config,
                    first.database.clone(),
                    Duration::from_secs(3600),
                    listener,
                )
                .await,
            ),
            _ => None,
        };
        // With files, tenants removes a deleted tenant's files there: bind files' port
        // first so tenants knows where it will be.
        let files_listener = if self.files && self.tenants {
            Some(TcpListener::bind("127.0.0.1:0").await.expect("bind"))
        } else {
            None
        };
        let tenants = match &keys {
            Some(keys) if self.tenants => {
                let database = fresh_database(data_dir.path(), "tenants").await;
                let files_url = files_listener
                    .as_ref()
                    .map(|l| format!("http://{}", l.local_addr().expect("local addr")));
                Some(
                    start_tenants(
                        &config,
                        database,
                        format!("http://{}", keys.server.addr),
                        files_url,
                    )
                    .await,
                )
            }
            _ => None,
        };
        let auth = match (&tenants, auth_listener) {
            (Some(tenants), Some(listener)) => {
                let database = fresh_database(data_dir.path(), "auth").await;
                let auth_config = penny_auth::AuthConfig {
                    database_url: database.url.clone(),
                    migration_database_url: database.migration_url.clone(),
                    tenants_url: format!("http://{}", tenants.server.addr),
                    keys_url: format!(
                        "http://{}",
                        keys.as_ref().expect("keys run with auth").server.addr
                    ),
                    signing_key_rotation: self
                        .signing_key_rotation
                        .unwrap_or(penny_auth::keyring::DEFAULT_ROTATION),
                    service_clients: Some(self.service_clients.clone()),
                    service_token_lifetime: self
                        .service_token_lifetime
                        .unwrap_or(penny_auth::service_tokens::SERVICE_TOKEN_LIFETIME),
                };
                Some(start_auth_on(&config, database, auth_config, listener).await)
            }
            _ => None,
        };
        let audit = match audit_listener {
            Some(listener) => {
                let database = fresh_database(data_dir.path(), "audit").await;
                let key = Arc::new(SigningKey::generate().expect("checkpoint key"));
                // With auth and tenants to act through, the monitor runs the guide's
                // rules (or the test's); without them, only the test's.
                let monitor_rules = self.monitor_rules.clone().or_else(|| {
                    (auth.is_some() && tenants.is_some())
                        .then(penny_audit::monitor::rules::RuleSet::defaults)
                });
                let settings = AuditSettings {
                    checkpoint_every: self.audit_checkpoint_every.unwrap_or(1000),
                    monitor_rules,
                    tenants_url: tenants
                        .as_ref()
                        .map(|t| format!("http://{}", t.server.addr)),
                };
                Some(start_audit_on(&config, database, key, settings, listener).await)
            }
            None => None,
        };
        let files = match &keys {
            Some(keys) if self.files => {
                let settings = FilesSettings {
                    keys_url: format!("http://{}", keys.server.addr),
                    storage_dir: data_dir.path().join("files-storage"),
                    quarantine_unscannable: self.files_quarantine,
                    stale_after: self.files_stale_after.unwrap_or(Duration::ZERO),
                    rewrap_every: self.files_rewrap_every.unwrap_or(Duration::ZERO),
                    url_key: rand_key(),
                    s3: if self.files_on_s3 {
                        Some(Arc::new(s3::TestS3::start().await))
                    } else {
                        None
                    },
                };
                let database = fresh_database(data_dir.path(), "files").await;
                let clamd = tokio::task::spawn_blocking(clamd::TestClamd::start)
                    .await
                    .expect("clamd");
                Some(start_files(&config, database, clamd, settings, files_listener).await)
            }
            _ => None,
        };
        let echo = if self.echo {
            let config = config.clone();
            Some(
                RunningServer::start(move |listener, stopped| {
                    penny_platform::serve(config, echo::bundle(), listener, async move {
                        let _ = stopped.await;
                    })
                })
                .await,
            )
        } else {
            None
        };
        TestFleet {
            signing,
            config,
            echo,
            keys,
            authz,
            authz_replica,
            tenants,
            auth,
            audit,
            files,
            data_dir,
        }
    }
}

/// Running services plus what tests need to call them.
#[derive(Debug)]
pub struct TestFleet {
    /// The fleet's token-signing key.
    pub signing: SigningKey,
    /// The serve configuration every server got.
    pub config: ServeConfig,
    /// The echo server, when started.
    pub echo: Option<RunningServer>,
    /// The keys server, when started.
    pub keys: Option<KeysServer>,
    /// The authz server, when started.
    pub authz: Option<AuthzServer>,
    /// A second authz replica on the same database, when asked for.
    pub authz_replica: Option<AuthzServer>,
    /// The tenants server, when started.
    pub tenants: Option<TenantsServer>,
    /// The auth server, when started.
    pub auth: Option<AuthServer>,
    /// The audit server, when started.
    pub audit: Option<AuditServer>,
    /// The files server, when started.
    pub files: Option<FilesServer>,
    /// The fleet's data directory (databases, keys).
    pub data_dir: TempDir,
}

impl TestFleet {
    /// What to start.
    pub fn builder() -> TestFleetBuilder {
        TestFleetBuilder::default()
    }

    /// A token for any grant.
    pub fn token(&self, grant: &TokenGrant) -> String {
        self.signing.mint(grant).expect("mint")
    }

    /// A platform admin's token.
    pub fn admin_token(&self) -> String {
        self.token(&TokenGrant {
            subject: "test-admin".into(),
            tenant_id: PLATFORM_TENANT_ID,
            roles: vec!["admin".into()],
            kind: PrincipalKind::User,
            session_id: None,
            lifetime: Duration::from_secs(600),
        })
    }

    /// A fleet service's token.
    pub fn service_token(&self) -> String {
        self.token(&TokenGrant {
            subject: "svc-test".into(),
            tenant_id: PLATFORM_TENANT_ID,
            roles: vec![],
            kind: PrincipalKind::Service,
            session_id: None,
            lifetime: Duration::from_secs(600),
        })
    }

    /// A tenant user's token with the given roles.
    pub fn user_token(&self, tenant_id: Uuid, roles: &[&str]) -> String {
        self.token(&TokenGrant {
            subject: format!("user-{}", Uuid::new_v4()),
            tenant_id,
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            kind: PrincipalKind::User,
            session_id: Some(Uuid::new_v4().to_string()),
            lifetime: Duration::from_secs(600),
        })
    }

    /// The keys server; panics when it was not started.
    pub fn keys(&self) -> &KeysServer {
        self.keys.as_ref().expect("fleet started without keys")
    }

    /// The authz server; panics when it was not started.
    pub fn authz(&self) -> &AuthzServer {
        self.authz.as_ref().expect("fleet started without authz")
    }

    /// A second authz server on the first one's database: another replica.
    pub async fn start_authz_replica(&self) -> AuthzServer {
        start_authz(&self.config, self.authz().database.clone()).await
    }

    /// A second keys server sharing the first one's database (and master key or Vault):
    /// another replica, for tests that must not assume a single one.
    pub async fn start_keys_replica(&self) -> KeysServer {
        let first = self.keys();
        start_keys_on(
            &self.config,
            first.database.clone(),
            first.master_key_hex.clone(),
        )
        .await
    }

    /// The auth server; panics when it was not started.
    pub fn auth(&self) -> &AuthServer {
        self.auth.as_ref().expect("fleet started without auth")
    }

    /// The tenants server; panics when it was not started.
    pub fn tenants(&self) -> &TenantsServer {
        self.tenants
            .as_ref()
            .expect("fleet started without tenants")
    }

    /// Another tenants server on `database`, calling keys at `keys_url` (a replica, or one
    /// pointed at a keys service that is down).
    pub async fn start_tenants_on(
        &self,
        database: TestDatabase,
        keys_url: String,
    ) -> TenantsServer {
        start_tenants(&self.config, database, keys_url, None).await
    }

    /// Another tenants server on a fresh database that calls keys, authz and auth with
    /// `credential` (a service client's, say) instead of the fleet's fixed token. Its
    /// permission checks, revocation follower and API-key lookups use it too.
    pub async fn start_tenants_with_credential(
        &self,
        credential: penny_platform::ServiceCredential,
    ) -> TenantsServer {
        let mut config = self.config.clone();
        let authz = Endpoint::from_shared(format!("http://{}", self.authz().server.addr))
            .expect("endpoint")
            .connect_lazy();
        config.authorizer = Some(penny_platform::Authorizer::new(authz, credential));
        let database = fresh_database(self.data_dir.path(), "tenants-credential").await;
        start_tenants(
            &config,
            database,
            format!("http://{}", self.keys().server.addr),
            None,
        )
        .await
    }

    /// The audit server; panics when it was not started.
    pub fn audit(&self) -> &AuditServer {
        self.audit.as_ref().expect("fleet started without audit")
    }

    /// Stops the audit server (the others keep recording, into their spool).
    pub async fn stop_audit(&mut self) {
        self.audit
            .as_mut()
            .expect("fleet started without audit")
            .server
            .shutdown()
            .await
            .expect("stop audit");
    }

    /// Starts audit again on its database and address, with its checkpoint key.
    pub async fn restart_audit(&mut self) {
        let old = self.audit.take().expect("fleet started without audit");
        let listener = TcpListener::bind(old.server.addr)
            .await
            .expect("rebind audit");
        self.audit = Some(
            start_audit_on(
                &self.config,
                old.database.clone(),
                old.checkpoint_key.clone(),
                old.settings.clone(),
                listener,
            )
            .await,
        );
    }

    /// A second audit server on the same database, with the same key and rules (as
    /// replicas behind a balancer).
    pub async fn start_audit_replica(&self) -> AuditServer {
        let audit = self.audit();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        start_audit_on(
            &self.config,
            audit.database.clone(),
            audit.checkpoint_key.clone(),
            audit.settings.clone(),
            listener,
        )
        .await
    }

    /// The echo server; panics when it was not started.
    pub fn echo(&self) -> &RunningServer {
        self.echo.as_ref().expect("fleet started without echo")
    }

    /// The files server.
    pub fn files(&self) -> &FilesServer {
        self.files.as_ref().expect("fleet started without files")
    }

    /// The files server, to stop its clamd.
    pub fn files_mut(&mut self) -> &mut FilesServer {
        self.files.as_mut().expect("fleet started without files")
    }

    /// Stops the files server and starts it again on the same database, storage and clamd
    /// (as after a crash: what it left is swept at start).
    pub async fn restart_files(&mut self) {
        let old = self.files.take().expect("fleet started without files");
        let FilesServer {
            mut server,
            database,
            clamd,
            settings,
            ..
        } = old;
        server.shutdown().await.expect("stop files");
        self.files = Some(start_files(&self.config, database, clamd, settings, None).await);
    }
}

/// The files service of a test fleet.
#[derive(Debug)]
pub struct FilesServer {
    /// The server.
    pub server: RunningServer,
    /// Its database.
    pub database: TestDatabase,
    /// Its clamd.
    pub clamd: clamd::TestClamd,
    /// Where its HTTP listener (signed downloads) is; it stops with the server.
    pub http_addr: SocketAddr,
    settings: FilesSettings,
}

impl FilesServer {
    /// Where its sealed objects are (with a directory).
    pub fn storage_dir(&self) -> &Path {
        &self.settings.storage_dir
    }

    /// Its S3 server, when it stores objects there.
    pub fn s3(&self) -> Option<&s3::TestS3> {
        self.settings.s3.as_deref()
    }
}

#[derive(Debug, Clone)]
struct FilesSettings {
    keys_url: String,
    storage_dir: PathBuf,
    quarantine_unscannable: bool,
    stale_after: Duration,
    rewrap_every: Duration,
    url_key: [u8; 32],
    s3: Option<Arc<s3::TestS3>>,
}

async fn start_files(
    config: &ServeConfig,
    database: TestDatabase,
    clamd: clamd::TestClamd,
    settings: FilesSettings,
    listener: Option<TcpListener>,
) -> FilesServer {
    let clamd_addr = penny_files::scan::ClamdAddr::parse(&clamd.url()).expect("clamd address");
    let http_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let http_addr = http_listener.local_addr().expect("local addr");
    let files = penny_files::build(
        penny_files::FilesConfig {
            database_url: database.url.clone(),
            migration_database_url: database.migration_url.clone(),
            keys_url: settings.keys_url.clone(),
            storage: match &settings.s3 {
                Some(s3) => penny_files::StorageConfig::S3(s3.settings()),
                None => penny_files::StorageConfig::Filesystem(settings.storage_dir.clone()),
            },
            scanner: penny_files::ScannerConfig::Clamd(clamd_addr, Duration::from_secs(10)),
            quarantine_unscannable: settings.quarantine_unscannable,
            // Tests restart files to show what a crash leaves is swept: at once, unless
            // the test sweeps periodically.
            stale_after: settings.stale_after,
            rewrap_every: settings.rewrap_every,
            signed_urls: penny_files::SignedUrlConfig {
                key: zeroize::Zeroizing::new(settings.url_key.to_vec()),
                public_url: format!("http://{http_addr}"),
            },
        },
        config,
    )
    .await
    .expect("build files service");
    let config = config.clone();
    let listener = match listener {
        Some(listener) => listener,
        None => TcpListener::bind("127.0.0.1:0").await.expect("bind"),
    };
    // As `penny serve files` runs it: gRPC and the signed downloads together, and on
    // shutdown the wait for commits still under way.
    let server = RunningServer::start_on(listener, move |listener, stopped| {
        penny_files::serve_built(files, config, listener, http_listener, async move {
            let _ = stopped.await;
        })
    });
    FilesServer {
        server,
        database,
        clamd,
        http_addr,
        settings,
    }
}

fn rand_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    for (i, chunk) in key.chunks_mut(16).enumerate() {
        let random = Uuid::new_v4().as_u128() ^ (i as u128);
        chunk.copy_from_slice(&random.to_le_bytes());
    }
    key
}

/// The keys service of a test fleet, with what tests need to inspect it.
#[derive(Debug)]
pub struct KeysServer {
    /// The server.
    pub server: RunningServer,
    /// Its database, as the owner sees it (for tests that inspect it).
    pub database_url: String,
    /// Its database, as the service uses it.
    pub database: TestDatabase,
    /// The master key (local engine), hex.
    pub master_key_hex: Option<String>,
}

/// Environment variable choosing the keys backend of test fleets (`local` or `vault`).
pub const TEST_KEYS_BACKEND_ENV: &str = "PENNY_TEST_KEYS_BACKEND";

/// Whether test fleets run the keys service on Vault.
pub fn keys_on_vault() -> bool {
    std::env::var(TEST_KEYS_BACKEND_ENV).is_ok_and(|v| v == "vault")
}

async fn start_keys(config: &ServeConfig, dir: &Path) -> KeysServer {
    let database = fresh_database(dir, "keys").await;
    let master_key_hex =
        (!keys_on_vault()).then(|| penny_keys::local::MasterKey::generate_hex().to_string());
    start_keys_on(config, database, master_key_hex).await
}

async fn start_keys_on(
    config: &ServeConfig,
    database: TestDatabase,
    master_key_hex: Option<String>,
) -> KeysServer {
    use penny_keys::{BackendConfig, KeysConfig};
    let backend = if keys_on_vault() {
        let settings = penny_keys::vault::VaultSettings {
            address: std::env::var("VAULT_ADDR").expect("VAULT_ADDR for the vault backend"),
            mount: std::env::var("PENNY_VAULT_TRANSIT_MOUNT").unwrap_or_else(|_| "transit".into()),
            auth: penny_keys::vault::VaultAuth::Token(zeroize::Zeroizing::new(
                std::env::var("VAULT_TOKEN").expect("VAULT_TOKEN for the vault backend"),
            )),
            timeout: Duration::from_secs(3),
        };
        BackendConfig::Vault(settings)
    } else {
        let hex = master_key_hex
            .as_deref()
            .expect("master key for the local engine");
        BackendConfig::Local(penny_keys::local::MasterKey::parse(hex).expect("master key"))
    };
    let keys_config = KeysConfig {
        database_url: database.url.clone(),
        migration_database_url: database.migration_url.clone(),
        backend,
    };
    let keys = penny_keys::build(keys_config)
        .await
        .expect("build keys service");
    let bundle = penny_keys::bundle(keys, config);
    let config = config.clone();
    let server = RunningServer::start(move |listener, stopped| {
        penny_platform::serve(config, bundle, listener, async move {
            let _ = stopped.await;
        })
    })
    .await;
    KeysServer {
        server,
        database_url: database.owner_url(),
        database,
        master_key_hex,
    }
}

/// The authz service of a test fleet.
#[derive(Debug)]
pub struct AuthzServer {
    /// The server.
    pub server: RunningServer,
    /// Its database.
    pub database: TestDatabase,
}

async fn start_authz(config: &ServeConfig, database: TestDatabase) -> AuthzServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    start_authz_on(config, database, penny_authz::service::FEED_POLL, listener).await
}

/// An authz server on `listener` whose feed follower polls every `feed_poll` (a lagging
/// replica when long).
async fn start_authz_on(
    config: &ServeConfig,
    database: TestDatabase,
    feed_poll: Duration,
    listener: TcpListener,
) -> AuthzServer {
    let authz = penny_authz::build(penny_authz::AuthzConfig {
        database_url: database.url.clone(),
        migration_database_url: database.migration_url.clone(),
        feed_poll,
    })
    .await
    .expect("build authz service");
    let bundle = penny_authz::bundle(authz, config);
    let config = config.clone();
    let server = RunningServer::start_on(listener, move |listener, stopped| {
        penny_platform::serve(config, bundle, listener, async move {
            let _ = stopped.await;
        })
    });
    AuthzServer { server, database }
}

/// The audit service of a test fleet.
#[derive(Debug)]
pub struct AuditServer {
    /// The server.
    pub server: RunningServer,
    /// Its database.
    pub database: TestDatabase,
    /// The key that signs its checkpoints.
    pub checkpoint_key: Arc<SigningKey>,
    settings: AuditSettings,
}

/// How a test fleet's audit service is set up (kept to restart it, or start a replica).
#[derive(Debug, Clone)]
struct AuditSettings {
    checkpoint_every: u64,
    monitor_rules: Option<penny_audit::monitor::rules::RuleSet>,
    tenants_url: Option<String>,
}

async fn start_audit_on(
    config: &ServeConfig,
    database: TestDatabase,
    checkpoint_key: Arc<SigningKey>,
    settings: AuditSettings,
    listener: TcpListener,
) -> AuditServer {
    let mut audit_config =
        penny_audit::AuditConfig::new(database.url.clone(), checkpoint_key.clone());
    audit_config.migration_database_url = database.migration_url.clone();
    audit_config.checkpoint_every = settings.checkpoint_every;
    audit_config.monitor_rules = settings.monitor_rules.clone();
    audit_config.tenants_url = settings.tenants_url.clone();
    let audit = penny_audit::build(audit_config, config)
        .await
        .expect("build audit service");
    let bundle = penny_audit::bundle(audit, config);
    let config = config.clone();
    let server = RunningServer::start_on(listener, move |listener, stopped| {
        penny_platform::serve(config, bundle, listener, async move {
            let _ = stopped.await;
        })
    });
    AuditServer {
        server,
        database,
        checkpoint_key,
        settings,
    }
}

/// The tenants service of a test fleet.
#[derive(Debug)]
pub struct TenantsServer {
    /// The server.
    pub server: RunningServer,
    /// Its database.
    pub database: TestDatabase,
}

async fn start_tenants(
    config: &ServeConfig,
    database: TestDatabase,
    keys_url: String,
    files_url: Option<String>,
) -> TenantsServer {
    let tenants = penny_tenants::build(
        penny_tenants::TenantsConfig {
            database_url: database.url.clone(),
            migration_database_url: database.migration_url.clone(),
            keys_url,
            files_url,
        },
        config,
    )
    .await
    .expect("build tenants service");
    let bundle = penny_tenants::bundle(tenants, config);
    let config = config.clone();
    let server = RunningServer::start(move |listener, stopped| {
        penny_platform::serve(config, bundle, listener, async move {
            let _ = stopped.await;
        })
    })
    .await;
    TenantsServer { server, database }
}

/// The auth service of a test fleet.
#[derive(Debug)]
pub struct AuthServer {
    /// The server.
    pub server: RunningServer,
    /// Its database.
    pub database: TestDatabase,
    /// Where its HTTP listener (the JWKS) is.
    pub http_addr: std::net::SocketAddr,
    /// Stops the HTTP listener when the server is dropped.
    _http_stop: tokio::sync::oneshot::Sender<()>,
}

/// Starts auth on `listener` with `auth_config` (whose database URLs are `database`'s).
async fn start_auth_on(
    config: &ServeConfig,
    database: TestDatabase,
    auth_config: penny_auth::AuthConfig,
    listener: TcpListener,
) -> AuthServer {
    let auth = penny_auth::build(auth_config, config)
        .await
        .expect("build auth service");
    let http_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let http_addr = http_listener.local_addr().expect("local addr");
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(penny_platform::http::serve_http(
        "auth",
        penny_auth::http::router(auth.clone()),
        http_listener,
        async move {
            let _ = http_stopped.await;
        },
    ));
    let bundle = penny_auth::bundle(auth, config);
    let config = config.clone();
    let server = RunningServer::start_on(listener, move |listener, stopped| {
        penny_platform::serve(config, bundle, listener, async move {
            let _ = stopped.await;
        })
    });
    AuthServer {
        server,
        database,
        http_addr,
        _http_stop: http_stop,
    }
}

/// One HTTP/1.1 request over a fresh connection: (status, lower-cased headers, body).
/// The target is sent exactly as given, so tests can send what a client library would
/// normalize away.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
) -> (u16, std::collections::HashMap<String, String>, Vec<u8>) {
    http_request_to_host(addr, method, target, "penny.test").await
}

/// [`http_request`] with another `Host` header (servers that route by it, as moto does).
pub async fn http_request_to_host(
    addr: SocketAddr,
    method: &str,
    target: &str,
    host: &str,
) -> (u16, std::collections::HashMap<String, String>, Vec<u8>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!(
                "{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = Vec::new();
    // A response cut short (a body that failed its check) still returns what came.
    let _ = stream.read_to_end(&mut raw).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (status, headers, body)
}

/// The `ErrorInfo.reason` of a failed call (`""` when it has none).
pub fn error_reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// The fields a failed call's `BadRequest` names, in order.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

/// Adds `authorization: Bearer <token>` to a request.
pub fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    penny_platform::principal::bearer_request(message, token).expect("token as a header value")
}

#[cfg(test)]
mod tests {
    use super::replace_database;

    #[test]
    fn user_replacement() {
        assert_eq!(
            super::replace_user("postgres://postgres@127.0.0.1:5432/x", "app"),
            "postgres://app@127.0.0.1:5432/x"
        );
        assert_eq!(
            super::replace_user("postgres://h/x", "app"),
            "postgres://app@h/x"
        );
    }

    #[test]
    fn database_name_replacement() {
        assert_eq!(
            replace_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            replace_database("postgres://u:p@h/db?sslmode=disable", "y"),
            "postgres://u:p@h/y?sslmode=disable"
        );
        assert_eq!(replace_database("postgres://h:1", "z"), "postgres://h:1/z");
    }
}
