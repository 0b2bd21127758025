//! `penny dev`: the whole fleet in one process on embedded defaults.
//!
//! Everything lives under the data directory: the token-signing key and its JWKS, audit's
//! checkpoint key and its JWKS, one SQLite file per service, and `dev.env` with a
//! platform-admin token, a service client's id and secret (for `IssueServiceToken`) and
//! each service's address, ready for `source` and `grpcurl`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use penny_keys::local::MasterKey;
use penny_keys::{BackendConfig, KeysConfig};
use penny_platform::ServeConfig;
use penny_platform::principal::{PLATFORM_TENANT_ID, PrincipalKind, TokenVerifier};
use penny_platform::signing::{SigningKey, TokenGrant};
use penny_platform::telemetry::{self, LogFormat};

/// `penny dev` options.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Where keys, databases and dev.env live.
    #[arg(long, env = "PENNY_DATA_DIR", default_value = ".penny")]
    pub data_dir: PathBuf,
    /// Address the services listen on.
    #[arg(long, env = "PENNY_DEV_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Log format.
    #[arg(long, env = "PENNY_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// clamd for the files service (`tcp://host:port` or `unix:///path`); without it
    /// uploads are not scanned, and files says so at start.
    #[arg(long, env = "PENNY_FILES_CLAMD")]
    pub files_clamd: Option<String>,
    /// How clients reach files' HTTP listener, the base of signed URLs; by default the
    /// listen address (loopback when that is `0.0.0.0` or `::`).
    #[arg(long, env = "PENNY_FILES_PUBLIC_URL")]
    pub files_public_url: Option<String>,
}

/// The developer's token lives this long.
const DEV_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// One running service: its name, the env variable naming its address, and the address.
struct Running {
    env_name: &'static str,
    addr: std::net::SocketAddr,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let _telemetry = telemetry::init(args.log_format, "penny-dev")?;
    create_private_dir(&args.data_dir)?;
    let signing = SigningKey::load_or_create(&args.data_dir)
        .context("token-signing key in the data directory")?;
    let token = signing.mint(&TokenGrant {
        subject: "dev-admin".to_owned(),
        tenant_id: PLATFORM_TENANT_ID,
        roles: vec!["admin".to_owned()],
        kind: PrincipalKind::User,
        session_id: None,
        lifetime: DEV_TOKEN_LIFETIME,
    })?;

    let mut serve_config = ServeConfig::new_for_dev(TokenVerifier::new(&signing.jwks())?);
    // Every service follows auth's revocation stream: a revoked session or suspended user
    // is refused everywhere within moments.
    let auth_url = local_url(&args.host, AUTH_PORT);
    let auth_channel = tonic::transport::Endpoint::from_shared(auth_url)?.connect_lazy();
    serve_config.auth = Some(auth_channel.clone());
    // Permission requirements are decided by the in-process authz service, which the
    // services call with a credential of their own. Keys, authz and tenants hold a
    // service client and trade it with auth for tokens they renew. Auth itself cannot ask
    // itself before it has unsealed its signing keys through keys, so it holds a token
    // minted here with the data directory's key (which every service trusts), renewed at
    // every start.
    let authz_url = local_url(&args.host, AUTHZ_PORT);
    let authz_channel = tonic::transport::Endpoint::from_shared(authz_url)?.connect_lazy();
    let (fleet_secret, fleet_secret_hash) = penny_auth::service_tokens::new_client_secret();
    let fleet_client_id = uuid::Uuid::new_v4();
    let fleet_credential =
        penny_platform::ServiceCredential::issued(auth_channel, fleet_client_id, fleet_secret);
    serve_config.authorizer = Some(penny_platform::Authorizer::new(
        authz_channel.clone(),
        fleet_credential.clone(),
    ));
    // Every service records its calls in the audit service below, spooling them in the
    // data directory while it cannot.
    let audit_url = local_url(&args.host, AUDIT_PORT);
    serve_config.audit = Some(
        penny_platform::AuditClient::new(
            tonic::transport::Endpoint::from_shared(audit_url)?.connect_lazy(),
            fleet_credential,
            args.data_dir.join("audit-spool"),
        )
        .context("audit spool in the data directory")?,
    );
    let mut auth_serve_config = serve_config.clone();
    let auth_token = signing.mint(&TokenGrant {
        subject: "svc-penny-dev-auth".to_owned(),
        tenant_id: PLATFORM_TENANT_ID,
        roles: Vec::new(),
        kind: PrincipalKind::Service,
        session_id: None,
        lifetime: DEV_TOKEN_LIFETIME,
    })?;
    auth_serve_config.authorizer = Some(penny_platform::Authorizer::new(
        authz_channel,
        penny_platform::ServiceCredential::fixed(auth_token),
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop = move || {
        let mut stop_rx = stop_rx.clone();
        async move {
            let _ = stop_rx.wait_for(|stopped| *stopped).await;
        }
    };
    let mut running: Vec<Running> = Vec::new();
    let mut tasks: tokio::task::JoinSet<anyhow::Result<()>> = tokio::task::JoinSet::new();

    // keys: the local engine, its master key generated into the data directory.
    let master = load_or_create_master_key(&args.data_dir)?;
    let keys_config = KeysConfig {
        database_url: penny_platform::db::sqlite_url(&args.data_dir, "keys"),
        migration_database_url: None,
        backend: BackendConfig::Local(master),
    };
    let listener = bind(&args.host, KEYS_PORT, "keys").await?;
    running.push(Running {
        env_name: "PENNY_KEYS_ADDR",
        addr: listener.local_addr()?,
    });
    tasks.spawn(penny_keys::serve(
        keys_config,
        serve_config.clone(),
        listener,
        stop(),
    ));

    // authz: roles and bindings in its own SQLite file.
    let authz_config = penny_authz::AuthzConfig {
        database_url: penny_platform::db::sqlite_url(&args.data_dir, "authz"),
        migration_database_url: None,
        feed_poll: penny_authz::service::FEED_POLL,
    };
    let listener = bind(&args.host, AUTHZ_PORT, "authz").await?;
    running.push(Running {
        env_name: "PENNY_AUTHZ_ADDR",
        addr: listener.local_addr()?,
    });
    tasks.spawn(penny_authz::serve(
        authz_config,
        serve_config.clone(),
        listener,
        stop(),
    ));

    // audit: the trail, in its own SQLite file.
    let checkpoint_key = crate::audit::load_or_create_checkpoint_key(&args.data_dir)?;
    let mut audit_config = penny_audit::AuditConfig::new(
        penny_platform::db::sqlite_url(&args.data_dir, "audit"),
        std::sync::Arc::new(checkpoint_key),
    );
    // Quick checkpoints, so a developer sees them within seconds.
    audit_config.checkpoint_interval = Duration::from_secs(5);
    // The security monitor with the guide's rules, acting through auth and tenants.
    audit_config.monitor_rules = Some(penny_audit::monitor::rules::RuleSet::defaults());
    audit_config.tenants_url = Some(local_url(&args.host, TENANTS_PORT));
    let listener = bind(&args.host, AUDIT_PORT, "audit").await?;
    running.push(Running {
        env_name: "PENNY_AUDIT_ADDR",
        addr: listener.local_addr()?,
    });
    tasks.spawn(penny_audit::serve(
        audit_config,
        serve_config.clone(),
        listener,
        stop(),
    ));

    // tenants: creates each tenant's key in keys and its owner's binding in authz.
    let tenants_config = penny_tenants::TenantsConfig {
        database_url: penny_platform::db::sqlite_url(&args.data_dir, "tenants"),
        migration_database_url: None,
        keys_url: local_url(&args.host, KEYS_PORT),
        files_url: Some(local_url(&args.host, FILES_PORT)),
    };
    let listener = bind(&args.host, TENANTS_PORT, "tenants").await?;
    running.push(Running {
        env_name: "PENNY_TENANTS_ADDR",
        addr: listener.local_addr()?,
    });
    tasks.spawn(penny_tenants::serve(
        tenants_config,
        serve_config.clone(),
        listener,
        stop(),
    ));

    // files: uploads sealed under data keys from keys, in a directory of the data dir;
    // scanned by clamd when one is named, else (dev only) not at all.
    let scanner = match &args.files_clamd {
        Some(addr) => penny_files::ScannerConfig::Clamd(
            penny_files::scan::ClamdAddr::parse(addr).with_context(|| {
                format!("PENNY_FILES_CLAMD: {addr:?} is not tcp://host:port or unix:///path")
            })?,
            Duration::from_secs(20),
        ),
        None => penny_files::ScannerConfig::None,
    };
    let files_config = penny_files::FilesConfig {
        database_url: penny_platform::db::sqlite_url(&args.data_dir, "files"),
        migration_database_url: None,
        keys_url: local_url(&args.host, KEYS_PORT),
        storage: penny_files::StorageConfig::Filesystem(args.data_dir.join("files")),
        scanner,
        quarantine_unscannable: false,
        stale_after: penny_files::service::DEFAULT_STALE_AFTER,
        rewrap_every: penny_files::rewrap::DEFAULT_REWRAP_EVERY,
        signed_urls: penny_files::SignedUrlConfig {
            key: load_or_create_url_key(&args.data_dir)?,
            public_url: args
                .files_public_url
                .clone()
                .unwrap_or_else(|| local_url(&args.host, FILES_HTTP_PORT)),
        },
    };
    let listener = bind(&args.host, FILES_PORT, "files").await?;
    running.push(Running {
        env_name: "PENNY_FILES_ADDR",
        addr: listener.local_addr()?,
    });
    let http_listener = bind(&args.host, FILES_HTTP_PORT, "files (HTTP)").await?;
    running.push(Running {
        env_name: "PENNY_FILES_HTTP_ADDR",
        addr: http_listener.local_addr()?,
    });
    tasks.spawn(penny_files::serve(
        files_config,
        serve_config.clone(),
        listener,
        http_listener,
        stop(),
    ));

    // auth: signs with keys it seals through the keys service above; every service here
    // trusts them through auth's JWKS (serve_config.auth).
    let (client_secret, client_secret_hash) = penny_auth::service_tokens::new_client_secret();
    let dev_client_id = uuid::Uuid::new_v4();
    let auth_config = penny_auth::AuthConfig {
        database_url: penny_platform::db::sqlite_url(&args.data_dir, "auth"),
        migration_database_url: None,
        tenants_url: local_url(&args.host, TENANTS_PORT),
        keys_url: local_url(&args.host, KEYS_PORT),
        signing_key_rotation: penny_auth::keyring::DEFAULT_ROTATION,
        // Two service clients, new at every start (the previous ones are revoked and
        // their tokens refused): the fleet's own, and the developer's (IssueServiceToken
        // with PENNY_CLIENT_ID and PENNY_CLIENT_SECRET from dev.env).
        service_clients: Some(vec![
            penny_auth::service_tokens::ClientSpec {
                client_id: fleet_client_id,
                name: "penny-dev-fleet".to_owned(),
                secret_sha256: fleet_secret_hash,
                scopes: Vec::new(),
            },
            penny_auth::service_tokens::ClientSpec {
                client_id: dev_client_id,
                name: "penny-dev".to_owned(),
                secret_sha256: client_secret_hash,
                scopes: Vec::new(),
            },
        ]),
        service_token_lifetime: penny_auth::service_tokens::SERVICE_TOKEN_LIFETIME,
    };
    let listener = bind(&args.host, AUTH_PORT, "auth").await?;
    running.push(Running {
        env_name: "PENNY_AUTH_ADDR",
        addr: listener.local_addr()?,
    });
    let http_listener = bind(&args.host, AUTH_HTTP_PORT, "auth (HTTP)").await?;
    running.push(Running {
        env_name: "PENNY_AUTH_HTTP_ADDR",
        addr: http_listener.local_addr()?,
    });
    tasks.spawn(penny_auth::serve(
        auth_config,
        auth_serve_config,
        listener,
        Some(http_listener),
        stop(),
    ));

    tokio::spawn(async move {
        penny_platform::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let env_path = args.data_dir.join("dev.env");
    let mut env = format!(
        "PENNY_TOKEN={token}\nPENNY_CLIENT_ID={dev_client_id}\nPENNY_CLIENT_SECRET={}\n",
        client_secret.as_str()
    );
    for service in &running {
        let _ = writeln!(env, "{}={}", service.env_name, reachable(service.addr));
    }
    write_replacing_private(&env_path, env.as_bytes())?;

    print_walkthrough(&env_path, &running);
    wait(tasks).await
}

async fn wait(mut tasks: tokio::task::JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
    while let Some(joined) = tasks.join_next().await {
        joined.context("service task")??;
    }
    Ok(())
}

/// The fixed dev port of the auth service.
const AUTH_PORT: u16 = 50051;
/// The fixed dev port of auth's HTTP listener (the JWKS at `/.well-known/jwks.json`).
const AUTH_HTTP_PORT: u16 = 50061;
/// The fixed dev port of the keys service.
const KEYS_PORT: u16 = 50052;
/// The fixed dev port of the authz service.
const AUTHZ_PORT: u16 = 50053;
/// The fixed dev port of the audit service.
const AUDIT_PORT: u16 = 50054;
/// The fixed dev port of the files service.
const FILES_PORT: u16 = 50055;
/// The fixed dev port of files' HTTP listener (signed downloads).
const FILES_HTTP_PORT: u16 = 50065;
/// The fixed dev port of the tenants service.
const TENANTS_PORT: u16 = 50056;

/// `http://host:port` for reaching a service listening on `host` from this machine: an
/// unspecified address (`0.0.0.0`, `::`) becomes loopback, and IPv6 gets its brackets.
fn local_url(host: &str, port: u16) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() && ip.is_ipv4() => format!("http://127.0.0.1:{port}"),
        Ok(ip) if ip.is_unspecified() => format!("http://[::1]:{port}"),
        Ok(std::net::IpAddr::V6(ip)) => format!("http://[{ip}]:{port}"),
        _ => format!("http://{host}:{port}"),
    }
}

/// The address a client on this machine reaches a listener on `addr` at: the loopback
/// address when the listener took every interface (`0.0.0.0` or `::`), which is no address
/// to connect to.
fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

async fn bind(host: &str, port: u16, service: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| {
            format!("{service}: cannot listen on {host}:{port} (is another penny dev running?)")
        })
}

/// The dev master key: created once, owner-only, reused on every start.
fn load_or_create_master_key(dir: &Path) -> anyhow::Result<MasterKey> {
    let path = dir.join("master.key");
    if !path.exists() {
        let hex = MasterKey::generate_hex();
        penny_platform::signing::write_private(&path, hex.as_bytes())?;
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    );
    MasterKey::parse(&text).map_err(|why| anyhow::anyhow!("{}: {why}", path.display()))
}

/// The key that signs files' download URLs: 32 random bytes, made once (mode 0600).
fn load_or_create_url_key(dir: &Path) -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>> {
    let path = dir.join("files-url.key");
    if !path.exists() {
        let key: zeroize::Zeroizing<[u8; 32]> = zeroize::Zeroizing::new(rand::random());
        penny_platform::signing::write_private(&path, key.as_slice())?;
    }
    Ok(zeroize::Zeroizing::new(std::fs::read(&path).with_context(
        || format!("cannot read {}", path.display()),
    )?))
}

fn print_walkthrough(env_path: &Path, running: &[Running]) {
    println!("penny dev: {} service(s) running", running.len());
    for service in running {
        println!("  {:<18} {}", service.env_name, reachable(service.addr));
    }
    let tenant = uuid::Uuid::new_v4();
    let request = uuid::Uuid::new_v4();
    println!(
        "\nTry it (another terminal):\n  \
         set -a; source {env}; set +a\n  \
         grpcurl -plaintext $PENNY_KEYS_ADDR list\n  \
         curl -s http://$PENNY_AUTH_HTTP_ADDR/.well-known/jwks.json\n  \
         grpcurl -plaintext $PENNY_KEYS_ADDR grpc.health.v1.Health/Check\n  \
         grpcurl -plaintext -H \"authorization: Bearer $PENNY_TOKEN\" -d '{{\"tenant_id\":\"{tenant}\"}}' \\\n    \
         $PENNY_KEYS_ADDR penny.keys.v1.KeyService/CreateKey\n  \
         grpcurl -plaintext -H \"authorization: Bearer $PENNY_TOKEN\" \\\n    \
         -d '{{\"tenant_id\":\"{tenant}\",\"context\":{{\"purpose\":\"file\",\"object_id\":\"doc-1\"}}}}' \\\n    \
         $PENNY_KEYS_ADDR penny.keys.v1.KeyService/GenerateDataKey\n  \
         grpcurl -plaintext -H \"authorization: Bearer $PENNY_TOKEN\" \\\n    \
         -d '{{\"request_id\":\"{request}\",\"name\":\"Acme\",\"slug\":\"acme\",\"owner\":{{\"email\":\"ada@acme.test\",\"display_name\":\"Ada\"}}}}' \\\n    \
         $PENNY_TENANTS_ADDR penny.tenants.v1.TenantService/CreateTenant\n\n\
         Ctrl-C stops the fleet; the data directory keeps keys and databases.",
        env = env_path.display()
    );
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("PENNY_DATA_DIR: cannot create {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("PENNY_DATA_DIR: cannot restrict {}", dir.display()))?;
    }
    Ok(())
}

/// dev.env carries a token: owner-only, replaced atomically.
fn write_replacing_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    penny_platform::signing::write_private(&tmp, bytes)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::{local_url, reachable};

    #[test]
    fn local_urls_reach_the_listener_from_this_machine() {
        assert_eq!(local_url("127.0.0.1", 50055), "http://127.0.0.1:50055");
        assert_eq!(local_url("0.0.0.0", 50065), "http://127.0.0.1:50065");
        assert_eq!(local_url("::", 50065), "http://[::1]:50065");
        assert_eq!(local_url("::1", 50065), "http://[::1]:50065");
        assert_eq!(local_url("localhost", 50061), "http://localhost:50061");
    }

    #[test]
    fn dev_env_names_addresses_a_client_can_connect_to() {
        let addr = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert_eq!(reachable(addr("0.0.0.0:50051")), addr("127.0.0.1:50051"));
        assert_eq!(reachable(addr("[::]:50051")), addr("[::1]:50051"));
        assert_eq!(reachable(addr("192.0.2.7:50051")), addr("192.0.2.7:50051"));
        assert_eq!(reachable(addr("127.0.0.1:50051")), addr("127.0.0.1:50051"));
    }
}
