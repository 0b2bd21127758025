//! `penny bench`: the load tool every performance target is measured with.
//!
//! A scenario runs against a server this process starts itself (or `--target` for the
//! baseline), with N concurrent callers over a few HTTP/2 connections, for a fixed duration
//! or request count. It prints throughput, p50/p90/p99/max latency from an HDR histogram,
//! errors by status code, and the process's peak RSS. Targets are ratios to `baseline` (the
//! empty health `Check` on the same server) measured in the same run, never absolute times.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use penny_keys::local::MasterKey;
use penny_keys::{BackendConfig, KeysConfig};
use penny_platform::ServiceBundle;
use penny_platform::principal::TokenVerifier;
use penny_platform::principal::{PLATFORM_TENANT_ID, PrincipalKind};
use penny_platform::server::{ServeConfig, always_ready};
use penny_platform::signing::SigningKey;
use penny_platform::signing::TokenGrant;
use penny_platform::{AccessPolicy, serve};
use penny_proto::keys::v1 as pb;
use penny_proto::keys::v1::key_service_client::KeyServiceClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The empty gRPC health `Check` through the full standard stack: the ceiling.
    Baseline,
    /// `KeyService.GenerateDataKey` (256-bit, local engine), after a baseline phase.
    KeysDatakey,
    /// `KeyService.Decrypt` of one wrapped data key (local engine), after a baseline phase.
    KeysDecrypt,
    /// `keys-datakey` on two keys servers in this process, one after the other: one
    /// without audit (the ceiling), and one that records every call through the platform's
    /// audit client into an audit service, also in this process (SQLite, the monitor's
    /// default rules in dry run). The ratio is what the audit layer costs.
    KeysDatakeyAudited,
    /// `AuthzService.Check` of a viewer's permission (a decision from the cache), after a
    /// baseline phase.
    AuthzCheck,
    /// `AuthService.Login` with the right password (one user per caller, up to 64), through
    /// keys, authz, tenants and auth in this process; its ceiling is the bare argon2id
    /// verification rate on as many threads as there are cores, measured in the same run.
    AuthLogin,
    /// `AuditService.Append` with chaining, one producer per tenant, in batches; its
    /// ceiling is a plain multi-row INSERT of the same rows on the same database in the
    /// same run. Then `VerifyChain` over everything appended. PostgreSQL with
    /// `--database-url`, else SQLite.
    AuditAppend,
    /// `FileService.Upload` of large files with no scanner; its ceiling is SHA-256 and
    /// AES-256-GCM sealing of the same bytes on one thread in the same run. Then the peak
    /// RSS during 1 and 8 concurrent uploads; with `--clamd`, clamd's own INSTREAM rate
    /// and uploads scanned by it.
    FilesUpload,
}

/// `penny bench` options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The scenario.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Concurrent callers.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// Measured seconds per phase (ignored with --requests).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration_secs: u64,
    /// Stop each phase after this many requests instead of after a duration.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Unmeasured warm-up seconds before each phase.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=600))]
    pub warmup_secs: u64,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub connections: u32,
    /// Measure the baseline against an already running server (`host:port`) instead.
    #[arg(long)]
    pub target: Option<String>,
    /// Fail unless the scenario reaches this fraction of the baseline's throughput.
    #[arg(long)]
    pub min_throughput_ratio: Option<f64>,
    /// Fail unless the scenario's p99 is at most this multiple of the baseline's p99.
    #[arg(long)]
    pub max_p99_ratio: Option<f64>,
    /// Fail unless the scenario's p99 is at most this many microseconds.
    #[arg(long)]
    pub max_p99_us: Option<u64>,
    /// audit-append and keys-datakey-audited: a PostgreSQL admin URL; the bench makes a
    /// fresh database for audit on it (else audit uses SQLite).
    #[arg(long, env = "PENNY_BENCH_DATABASE_URL")]
    pub database_url: Option<String>,
    /// keys-datakey-audited: run the audit process on this CPU only (through `taskset`), so
    /// that, with this process pinned to the others (`taskset -c 0 penny bench …`), audit's
    /// own work does not take the CPU the measured server runs on, as on separate machines.
    #[arg(long)]
    pub audit_cpu: Option<u32>,
    /// audit-append: run audit without the security monitor (by default its rules run, in
    /// dry run), to see what the monitor costs.
    #[arg(long)]
    pub without_monitor: bool,
    /// audit-append: events per Append call (and per plain INSERT).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub batch: u32,
    /// audit-append: fail unless Append stores at least this many events per second.
    #[arg(long)]
    pub min_events_per_sec: Option<u64>,
    /// audit-append: fail unless VerifyChain checks at least this many events per second.
    #[arg(long)]
    pub min_verify_per_sec: Option<u64>,
    /// files-upload: also measure with this clamd (`tcp://host:port`).
    #[arg(long)]
    pub clamd: Option<String>,
    /// files-upload: put the stored objects under this directory (in a new subdirectory,
    /// removed at the end) instead of the bench's temporary directory; a tmpfs such as
    /// `/dev/shm` takes the disk's bandwidth out of the measurement.
    #[arg(long)]
    pub storage_dir: Option<std::path::PathBuf>,
    /// files-upload: the size of each file, in MiB.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=50))]
    pub file_mib: u64,
    /// files-upload: fail unless one upload's peak RSS stays this many MiB above idle.
    #[arg(long)]
    pub max_rss_mib: Option<u64>,
    /// files-upload: fail unless 8 concurrent uploads' peak RSS stays this many MiB above
    /// idle.
    #[arg(long)]
    pub max_rss_mib_8: Option<u64>,
}

/// Checks a scenario against the targets given on the command line.
fn check_targets(
    args: &BenchArgs,
    scenario: &PhaseReport,
    baseline: &PhaseReport,
) -> anyhow::Result<()> {
    let mut missed = Vec::new();
    let throughput = scenario.throughput() / baseline.throughput().max(f64::EPSILON);
    let p99 = scenario.p(0.99) as f64 / (baseline.p(0.99).max(1)) as f64;
    if let Some(min) = args.min_throughput_ratio
        && throughput < min
    {
        missed.push(format!("throughput {throughput:.2}x of baseline < {min}"));
    }
    if let Some(max) = args.max_p99_ratio
        && p99 > max
    {
        missed.push(format!("p99 {p99:.2}x of baseline > {max}"));
    }
    if let Some(max) = args.max_p99_us
        && scenario.p(0.99) > max
    {
        missed.push(format!("p99 {}us > {max}us", scenario.p(0.99)));
    }
    if !scenario.errors.is_empty() {
        missed.push(format!(
            "{} failed calls",
            scenario.errors.values().sum::<u64>()
        ));
    }
    if missed.is_empty() {
        println!("targets met");
        Ok(())
    } else {
        anyhow::bail!("targets missed: {}", missed.join("; "))
    }
}

/// How long a phase runs.
#[derive(Debug, Clone, Copy)]
enum Limit {
    Duration(Duration),
    Requests(u64),
}

/// What one phase measured.
#[derive(Debug)]
pub struct PhaseReport {
    name: &'static str,
    concurrency: u32,
    ok: u64,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    /// CPU time this process spent during the measured part (all its threads).
    cpu: Option<Duration>,
}

impl PhaseReport {
    /// CPU time of this process per call, in microseconds.
    fn cpu_per_call_us(&self) -> Option<f64> {
        let total = self.ok + self.errors.values().sum::<u64>();
        self.cpu
            .map(|cpu| cpu.as_secs_f64() * 1e6 / (total.max(1) as f64))
    }

    fn throughput(&self) -> f64 {
        let total = self.ok + self.errors.values().sum::<u64>();
        total as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    fn p(&self, quantile: f64) -> u64 {
        self.latency_us.value_at_quantile(quantile)
    }

    fn print(&self) {
        let errors = if self.errors.is_empty() {
            "none".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(code, n)| format!("{code}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "{:<14} c={:<4} ok={:<9} {:>10.0} req/s  p50={:>6}us p90={:>6}us p99={:>6}us max={:>7}us  errors: {}",
            self.name,
            self.concurrency,
            self.ok,
            self.throughput(),
            self.p(0.50),
            self.p(0.90),
            self.p(0.99),
            self.latency_us.max(),
            errors
        );
        if let Some(cpu) = self.cpu_per_call_us() {
            println!("{:<14} cpu {cpu:.1}us per call (this process)", self.name);
        }
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let limit = match args.requests {
        Some(n) => Limit::Requests(n),
        None => Limit::Duration(Duration::from_secs(args.duration_secs)),
    };
    if args.scenario == Scenario::AuditAppend {
        return crate::bench_audit::run(&args).await;
    }
    if args.scenario == Scenario::FilesUpload {
        return crate::bench_files::run(&args).await;
    }
    let warmup = Duration::from_secs(args.warmup_secs);
    println!(
        "penny bench {:?}: concurrency {}, {} connection(s), {}",
        args.scenario,
        args.concurrency,
        args.connections,
        match limit {
            Limit::Duration(d) => format!("{} s per phase", d.as_secs()),
            Limit::Requests(n) => format!("{n} requests per phase"),
        }
    );

    let (addr, server) = match &args.target {
        Some(target) => (target.clone(), None),
        None => {
            let (addr, server) = start_server(&args).await?;
            (addr, Some(server))
        }
    };
    let channels = connect(&addr, args.connections).await?;

    let baseline = phase(
        "baseline",
        &channels,
        args.concurrency,
        warmup,
        limit,
        |channel| async move {
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(drop)
        },
    )
    .await?;
    baseline.print();

    if let Some(server) = &server
        && args.scenario == Scenario::AuthLogin
    {
        let ceiling = argon2_phase(warmup, limit).await?;
        ceiling.print();
        let report = auth_login_phase(server, &channels, args.concurrency, warmup, limit).await?;
        report.print();
        print_ratio(&report, &ceiling);
        check_targets(&args, &report, &ceiling)?;
    } else if let Some(server) = &server
        && args.scenario == Scenario::KeysDatakeyAudited
    {
        // The ceiling is the same call on a keys server without audit, in this run.
        let plain = keys_phase(
            Scenario::KeysDatakey,
            server,
            &channels,
            args.concurrency,
            warmup,
            limit,
        )
        .await?;
        plain.print();
        let (audited_addr, audit_addr) = server
            .audited_addr
            .as_ref()
            .context("no audited keys server")?;
        let audited_channels = connect(audited_addr, args.connections).await?;
        let mut audited = keys_phase(
            Scenario::KeysDatakey,
            server,
            &audited_channels,
            args.concurrency,
            warmup,
            limit,
        )
        .await?;
        audited.name = "keys-datakey-audited";
        audited.print();
        print_ratio(&audited, &plain);
        // The calls really were recorded: audit's trail (the platform tenant's chain, where
        // a service's calls go) holds them once the client has sent its last batch.
        let stored = audited_events(server, audit_addr).await?;
        println!(
            "audit stored {stored} events; the audited phase made {} calls (plus its warm-up and the key's creation)",
            audited.ok
        );
        anyhow::ensure!(
            stored >= audited.ok,
            "audit stored fewer events than calls were made"
        );
        check_targets(&args, &audited, &plain)?;
    } else if let Some(server) = &server
        && args.scenario != Scenario::Baseline
    {
        let report = match args.scenario {
            Scenario::AuthzCheck => {
                authz_phase(server, &channels, args.concurrency, warmup, limit).await?
            }
            _ => {
                keys_phase(
                    args.scenario,
                    server,
                    &channels,
                    args.concurrency,
                    warmup,
                    limit,
                )
                .await?
            }
        };
        report.print();
        print_ratio(&report, &baseline);
        check_targets(&args, &report, &baseline)?;
    }

    if let Some(server) = server {
        server.stop().await?;
        if let Some(rss) = peak_rss_kib() {
            println!(
                "peak RSS {:.1} MiB (one process: server and load generator together)",
                rss as f64 / 1024.0
            );
        }
    }
    Ok(())
}

/// Prints how a scenario compares to its ceiling (the baseline, or for sign-in the bare
/// hash rate) measured in the same run.
fn print_ratio(scenario: &PhaseReport, baseline: &PhaseReport) {
    println!(
        "{} / {}: throughput {:.2}x, p99 {:.2}x",
        scenario.name,
        baseline.name,
        scenario.throughput() / baseline.throughput().max(f64::EPSILON),
        scenario.p(0.99) as f64 / (baseline.p(0.99).max(1)) as f64
    );
}

/// The in-process servers of a scenario, stopped gracefully at the end.
struct BenchServer {
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    signing: SigningKey,
    /// The tenants service, when the scenario runs one.
    tenants_addr: Option<String>,
    /// The keys server that records its calls in audit, and that audit service, when the
    /// scenario runs them.
    audited_addr: Option<(String, String)>,
    /// A service run as its own process (audit, in keys-datakey-audited), killed at stop,
    /// and its database, dropped then.
    child: Option<(std::process::Child, crate::bench_audit::Database)>,
    _data_dir: TempDir,
}

impl BenchServer {
    async fn stop(self) -> anyhow::Result<()> {
        for stop in self.stops {
            let _ = stop.send(());
        }
        for task in self.tasks {
            task.await.context("bench server task")??;
        }
        if let Some((mut child, database)) = self.child {
            let _ = child.kill();
            let _ = child.wait();
            database.drop_database().await?;
        }
        Ok(())
    }
}

/// Serves `bundle` on `listener` until stopped.
pub(crate) fn spawn_server(
    config: ServeConfig,
    bundle: ServiceBundle,
    listener: TcpListener,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(config, bundle, listener, async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

/// keys, authz, tenants and auth on ephemeral ports, wired as `penny dev` wires them; the
/// returned address is auth's.
async fn start_auth_fleet(
    data_dir: TempDir,
    signing: SigningKey,
    mut config: ServeConfig,
) -> anyhow::Result<(String, BenchServer)> {
    let listeners = [
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
    ];
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<Result<_, _>>()?;
    let service_token = service_token(&signing, "svc-bench")?;
    config.authorizer = Some(penny_platform::Authorizer::new(
        Endpoint::from_shared(format!("http://{}", addrs[1]))?.connect_lazy(),
        penny_platform::ServiceCredential::fixed(service_token),
    ));
    let [
        keys_listener,
        authz_listener,
        tenants_listener,
        auth_listener,
    ] = listeners;
    let keys = local_keys(&data_dir, "keys").await?;
    let authz = penny_authz::build(penny_authz::AuthzConfig {
        database_url: penny_platform::db::sqlite_url(&data_dir.0, "authz"),
        migration_database_url: None,
        feed_poll: penny_authz::service::FEED_POLL,
    })
    .await?;
    let tenants = penny_tenants::build(
        penny_tenants::TenantsConfig {
            database_url: penny_platform::db::sqlite_url(&data_dir.0, "tenants"),
            migration_database_url: None,
            keys_url: format!("http://{}", addrs[0]),
            files_url: None,
        },
        &config,
    )
    .await?;
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for (bundle, listener) in [
        (penny_keys::bundle(keys, &config), keys_listener),
        (penny_authz::bundle(authz, &config), authz_listener),
        (penny_tenants::bundle(tenants, &config), tenants_listener),
    ] {
        let (stop, task) = spawn_server(config.clone(), bundle, listener);
        stops.push(stop);
        tasks.push(task);
    }
    // Auth seals its signing key through keys at start: keys is serving by now.
    let auth = penny_auth::build(
        penny_auth::AuthConfig {
            database_url: penny_platform::db::sqlite_url(&data_dir.0, "auth"),
            migration_database_url: None,
            tenants_url: format!("http://{}", addrs[2]),
            keys_url: format!("http://{}", addrs[0]),
            signing_key_rotation: penny_auth::keyring::DEFAULT_ROTATION,
            service_clients: None,
            service_token_lifetime: penny_auth::service_tokens::SERVICE_TOKEN_LIFETIME,
        },
        &config,
    )
    .await?;
    let (stop, task) = spawn_server(
        config.clone(),
        penny_auth::bundle(auth, &config),
        auth_listener,
    );
    stops.push(stop);
    tasks.push(task);
    Ok((
        addrs[3].clone(),
        BenchServer {
            stops,
            tasks,
            signing,
            tenants_addr: Some(addrs[2].clone()),
            audited_addr: None,
            child: None,
            _data_dir: data_dir,
        },
    ))
}

async fn start_server(args: &BenchArgs) -> anyhow::Result<(String, BenchServer)> {
    let scenario = args.scenario;
    let data_dir = TempDir::new()?;
    let signing = SigningKey::load_or_create(&data_dir.0)?;
    let verifier = TokenVerifier::new(&signing.jwks())?;
    let config = ServeConfig::new_for_dev(verifier);
    if scenario == Scenario::AuthLogin {
        return start_auth_fleet(data_dir, signing, config).await;
    }
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    let mut child = None;
    let audited_addr = if scenario == Scenario::KeysDatakeyAudited {
        let (addr, audit_addr, audit, keys_stop, keys_task) =
            start_audited_keys(args, &data_dir, &signing, &config).await?;
        stops.push(keys_stop);
        tasks.push(keys_task);
        child = Some(audit);
        Some((addr, audit_addr))
    } else {
        None
    };
    let bundle = match scenario {
        Scenario::AuditAppend | Scenario::FilesUpload => {
            anyhow::bail!("audit-append and files-upload start their own servers")
        }
        Scenario::Baseline => ServiceBundle {
            name: "bench",
            routes: tonic::service::Routes::default(),
            grpc_services: Vec::new(),
            policy: AccessPolicy::new(),
            descriptors: Vec::new(),
            readiness: always_ready(),
        },
        Scenario::KeysDatakey | Scenario::KeysDecrypt | Scenario::KeysDatakeyAudited => {
            let keys = local_keys(&data_dir, "keys").await?;
            penny_keys::bundle(keys, &config)
        }
        Scenario::AuthzCheck => {
            let authz = penny_authz::build(penny_authz::AuthzConfig {
                database_url: penny_platform::db::sqlite_url(&data_dir.0, "authz"),
                migration_database_url: None,
                feed_poll: penny_authz::service::FEED_POLL,
            })
            .await?;
            penny_authz::bundle(authz, &config)
        }
        Scenario::AuthLogin => anyhow::bail!("auth-login starts a fleet"),
    };
    let (stop, task) = spawn_server(config, bundle, listener);
    stops.insert(0, stop);
    tasks.insert(0, task);
    Ok((
        addr,
        BenchServer {
            stops,
            tasks,
            signing,
            tenants_addr: None,
            audited_addr,
            child,
            _data_dir: data_dir,
        },
    ))
}

/// An audit service and a keys server that records its calls there, on ephemeral ports:
/// the keys server's address, and how to stop each.
async fn start_audited_keys(
    args: &BenchArgs,
    data_dir: &TempDir,
    signing: &SigningKey,
    config: &ServeConfig,
) -> anyhow::Result<(
    String,
    String,
    (std::process::Child, crate::bench_audit::Database),
    oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    // Audit runs as its own process (`penny serve audit`), as in production, so that this
    // process's CPU time is the keys server's and the load's alone.
    crate::audit::load_or_create_checkpoint_key(&data_dir.0)?;
    let jwks = data_dir.0.join("bench-jwks.json");
    std::fs::write(&jwks, serde_json::to_vec(&signing.jwks())?)?;
    let rules = data_dir.0.join("bench-monitor-rules.json");
    std::fs::write(&rules, br#"{"rules": []}"#)?;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let audit_addr = format!("127.0.0.1:{port}");
    // With --database-url, audit's trail is a fresh PostgreSQL database, as in production.
    let database = crate::bench_audit::fresh_database(args, data_dir).await?;
    let mut command = match args.audit_cpu {
        Some(cpu) => {
            let mut taskset = std::process::Command::new("taskset");
            taskset
                .arg("-c")
                .arg(cpu.to_string())
                .arg(std::env::current_exe()?);
            taskset
        }
        None => std::process::Command::new(std::env::current_exe()?),
    };
    if let Some(owner) = &database.owner_url {
        command.env("PENNY_AUDIT_MIGRATION_DATABASE_URL", owner);
    }
    let child = command
        .args(["serve", "audit"])
        .env("PENNY_AUDIT_LISTEN", &audit_addr)
        .env("PENNY_AUDIT_DATABASE_URL", &database.serve_url)
        .env(
            "PENNY_AUDIT_CHECKPOINT_KEY_FILE",
            data_dir.0.join("audit-checkpoint.pk8"),
        )
        .env("PENNY_AUDIT_MONITOR_RULES_FILE", &rules)
        .env("PENNY_JWKS_FILE", &jwks)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(std::fs::File::create(
            data_dir.0.join("audit.log"),
        )?))
        .spawn()
        .context("cannot start `penny serve audit`")?;
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(channels) = connect(&audit_addr, 1).await
            && HealthClient::new(channels[0].clone())
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::ensure!(ready, "`penny serve audit` did not start");
    let token = service_token(signing, "svc-bench-keys")?;
    let mut keys_config = config.clone();
    keys_config.audit = Some(penny_platform::AuditClient::new(
        Endpoint::from_shared(format!("http://{audit_addr}"))?.connect_lazy(),
        penny_platform::ServiceCredential::fixed(token),
        data_dir.0.join("audit-spool"),
    )?);
    let keys = local_keys(data_dir, "keys-audited").await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let bundle = penny_keys::bundle(keys, &keys_config);
    let (keys_stop, keys_task) = spawn_server(keys_config, bundle, listener);
    Ok((addr, audit_addr, (child, database), keys_stop, keys_task))
}

/// How many events audit's platform chain holds, once it has stopped growing (the audit
/// client sends a batch every 50 ms).
async fn audited_events(server: &BenchServer, audit_addr: &str) -> anyhow::Result<u64> {
    let token = bench_service_token(server)?;
    let channel = connect(audit_addr, 1).await?.remove(0);
    let mut last = u64::MAX;
    loop {
        let reply =
            penny_proto::audit::v1::audit_service_client::AuditServiceClient::new(channel.clone())
                .verify_chain(authorized(
                    penny_proto::audit::v1::VerifyChainRequest {
                        tenant_id: PLATFORM_TENANT_ID.to_string(),
                        ..Default::default()
                    },
                    &token,
                )?)
                .await
                .map_err(|s| anyhow::anyhow!("verify chain: {s:?}"))?
                .into_inner();
        anyhow::ensure!(
            reply.valid,
            "audit's chain did not verify: {}",
            reply.message
        );
        if reply.verified_count == last {
            return Ok(last);
        }
        last = reply.verified_count;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub(crate) async fn connect(addr: &str, connections: u32) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::new();
    for _ in 0..connections {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Creates a tenant key, then measures the keys scenario through the full stack with a
/// service token (verified once, then served from the verifier's cache like production).
async fn keys_phase(
    scenario: Scenario,
    server: &BenchServer,
    channels: &[Channel],
    concurrency: u32,
    warmup: Duration,
    limit: Limit,
) -> anyhow::Result<PhaseReport> {
    let token = bench_service_token(server)?;
    let tenant = uuid::Uuid::new_v4().to_string();
    let context = pb::EncryptionContext {
        purpose: "file".to_owned(),
        object_id: "bench-object".to_owned(),
    };
    let channel = channels.first().context("no connection")?.clone();
    let mut client = KeyServiceClient::new(channel);
    client
        .create_key(authorized(
            pb::CreateKeyRequest {
                tenant_id: tenant.clone(),
            },
            &token,
        )?)
        .await
        .map_err(|s| anyhow::anyhow!("create key: {s:?}"))?;
    let datakey = pb::GenerateDataKeyRequest {
        tenant_id: tenant.clone(),
        context: Some(context.clone()),
        key_bits: 256,
    };
    match scenario {
        Scenario::Baseline
        | Scenario::AuthzCheck
        | Scenario::AuthLogin
        | Scenario::AuditAppend
        | Scenario::FilesUpload => {
            anyhow::bail!("not a keys scenario")
        }
        Scenario::KeysDatakey | Scenario::KeysDatakeyAudited => {
            phase(
                "keys-datakey",
                channels,
                concurrency,
                warmup,
                limit,
                move |channel| {
                    let request = authorized(datakey.clone(), &token);
                    async move {
                        let request =
                            request.map_err(|e| tonic::Status::internal(e.to_string()))?;
                        KeyServiceClient::new(channel)
                            .generate_data_key(request)
                            .await
                            .map(drop)
                    }
                },
            )
            .await
        }
        Scenario::KeysDecrypt => {
            let wrapped = client
                .generate_data_key(authorized(datakey, &token)?)
                .await
                .map_err(|s| anyhow::anyhow!("generate data key: {s:?}"))?
                .into_inner()
                .wrapped_key;
            let decrypt = pb::DecryptRequest {
                tenant_id: tenant,
                items: vec![pb::DecryptItem {
                    ciphertext: wrapped,
                    context: Some(context),
                }],
            };
            phase(
                "keys-decrypt",
                channels,
                concurrency,
                warmup,
                limit,
                move |channel| {
                    let request = authorized(decrypt.clone(), &token);
                    async move {
                        let request =
                            request.map_err(|e| tonic::Status::internal(e.to_string()))?;
                        let reply = KeyServiceClient::new(channel)
                            .decrypt(request)
                            .await?
                            .into_inner();
                        match reply.results.first().and_then(|r| r.result.as_ref()) {
                            Some(pb::decrypt_result::Result::Plaintext(_)) => Ok(()),
                            _ => Err(tonic::Status::internal("decrypt item failed")),
                        }
                    }
                },
            )
            .await
        }
    }
}

fn bench_service_token(server: &BenchServer) -> anyhow::Result<Arc<String>> {
    Ok(Arc::new(service_token(&server.signing, "svc-bench")?))
}

/// A fleet service's token for `subject`, valid for an hour.
pub(crate) fn service_token(signing: &SigningKey, subject: &str) -> anyhow::Result<String> {
    Ok(signing.mint(&TokenGrant {
        subject: subject.to_owned(),
        tenant_id: PLATFORM_TENANT_ID,
        roles: Vec::new(),
        kind: PrincipalKind::Service,
        session_id: None,
        lifetime: Duration::from_secs(3600),
    })?)
}

/// The keys service on the local engine with a fresh master key, its SQLite file `name` in
/// `data_dir`.
pub(crate) async fn local_keys(data_dir: &TempDir, name: &str) -> anyhow::Result<penny_keys::Keys> {
    let hex = MasterKey::generate_hex();
    penny_keys::build(KeysConfig {
        database_url: penny_platform::db::sqlite_url(&data_dir.0, name),
        migration_database_url: None,
        backend: BackendConfig::Local(
            MasterKey::parse(&hex).map_err(|why| anyhow::anyhow!("master key: {why}"))?,
        ),
    })
    .await
}

/// Grants a viewer role, then measures `Check` of a permission the role grants, as the
/// platform's enforcement layer asks it (a service token, a cached decision).
async fn authz_phase(
    server: &BenchServer,
    channels: &[Channel],
    concurrency: u32,
    warmup: Duration,
    limit: Limit,
) -> anyhow::Result<PhaseReport> {
    use penny_proto::authz::v1 as authz_pb;
    use penny_proto::authz::v1::authz_service_client::AuthzServiceClient;
    let token = bench_service_token(server)?;
    let tenant = uuid::Uuid::new_v4().to_string();
    let subject = authz_pb::Subject {
        kind: penny_proto::common::v1::PrincipalKind::User as i32,
        id: "bench-user".to_owned(),
        tenant_id: tenant.clone(),
    };
    let channel = channels.first().context("no connection")?.clone();
    AuthzServiceClient::new(channel)
        .grant_role(authorized(
            authz_pb::GrantRoleRequest {
                tenant_id: tenant.clone(),
                subject: Some(subject.clone()),
                role: "viewer".to_owned(),
                workspace_id: String::new(),
            },
            &token,
        )?)
        .await
        .map_err(|s| anyhow::anyhow!("grant role: {s:?}"))?;
    let check = authz_pb::CheckRequest {
        tenant_id: tenant,
        subject: Some(subject),
        permission: "file:read".to_owned(),
        workspace_id: String::new(),
        min_revision: 0,
    };
    phase(
        "authz-check",
        channels,
        concurrency,
        warmup,
        limit,
        move |channel| {
            let request = authorized(check.clone(), &token);
            async move {
                let request = request.map_err(|e| tonic::Status::internal(e.to_string()))?;
                let reply = AuthzServiceClient::new(channel)
                    .check(request)
                    .await?
                    .into_inner();
                if reply.allowed {
                    Ok(())
                } else {
                    Err(tonic::Status::internal("check denied a granted permission"))
                }
            }
        },
    )
    .await
}

/// The password the benchmark's user signs in with.
const BENCH_PASSWORD: &str = "a long benchmark passphrase";

/// The ceiling of sign-in: bare argon2id verifications of the right password, on one thread
/// per core (what the auth service's hasher pool allows at once), nothing else.
async fn argon2_phase(warmup: Duration, limit: Limit) -> anyhow::Result<PhaseReport> {
    let phc: Arc<str> = penny_auth::domain::password::hash_blocking(BENCH_PASSWORD.as_bytes())
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .into();
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let run = |limit: Limit| {
        let phc = phc.clone();
        async move {
            let deadline = match limit {
                Limit::Duration(d) => Some(Instant::now() + d),
                Limit::Requests(_) => None,
            };
            let budget = Arc::new(std::sync::atomic::AtomicU64::new(match limit {
                Limit::Requests(n) => n,
                Limit::Duration(_) => u64::MAX,
            }));
            let mut handles = Vec::new();
            for _ in 0..threads {
                let (phc, budget) = (phc.clone(), budget.clone());
                handles.push(tokio::task::spawn_blocking(move || {
                    let mut latencies = Vec::new();
                    loop {
                        if deadline.is_some_and(|d| Instant::now() >= d)
                            || budget
                                .fetch_update(
                                    std::sync::atomic::Ordering::AcqRel,
                                    std::sync::atomic::Ordering::Acquire,
                                    |n| n.checked_sub(1),
                                )
                                .is_err()
                        {
                            break;
                        }
                        let started = Instant::now();
                        let ok = penny_auth::domain::password::verify_blocking(
                            BENCH_PASSWORD.as_bytes(),
                            &phc,
                        );
                        latencies.push((ok, started.elapsed()));
                    }
                    latencies
                }));
            }
            let mut all = Vec::new();
            for handle in handles {
                all.extend(handle.await?);
            }
            anyhow::Ok(all)
        }
    };
    if !warmup.is_zero() {
        run(Limit::Duration(warmup)).await?;
    }
    let started = Instant::now();
    let results = run(limit).await?;
    let elapsed = started.elapsed();
    let mut latency_us = new_histogram()?;
    let mut ok = 0;
    let mut errors = BTreeMap::new();
    for (matched, took) in results {
        if matched {
            ok += 1;
            let _ = latency_us.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
        } else {
            *errors.entry("mismatch".to_owned()).or_insert(0) += 1;
        }
    }
    Ok(PhaseReport {
        name: "argon2id",
        concurrency: u32::try_from(threads).unwrap_or(u32::MAX),
        ok,
        errors,
        elapsed,
        latency_us,
        cpu: None,
    })
}

/// Creates a tenant with one user per caller and sets their passwords, then measures
/// `Login` with the right password, called as the trusted front end (a service token).
async fn auth_login_phase(
    server: &BenchServer,
    channels: &[Channel],
    concurrency: u32,
    warmup: Duration,
    limit: Limit,
) -> anyhow::Result<PhaseReport> {
    use penny_proto::auth::v1 as auth_pb;
    use penny_proto::auth::v1::auth_service_client::AuthServiceClient;
    use penny_proto::tenants::v1 as tenants_pb;
    use penny_proto::tenants::v1::tenant_service_client::TenantServiceClient;
    let admin = server.signing.mint(&TokenGrant {
        subject: "bench-admin".to_owned(),
        tenant_id: PLATFORM_TENANT_ID,
        roles: vec!["admin".to_owned()],
        kind: PrincipalKind::User,
        session_id: None,
        lifetime: Duration::from_secs(3600),
    })?;
    let tenants_addr = server
        .tenants_addr
        .as_deref()
        .context("no tenants service")?;
    let tenants = connect(tenants_addr, 1).await?;
    let created = TenantServiceClient::new(tenants.first().context("no connection")?.clone())
        .create_tenant(authorized(
            tenants_pb::CreateTenantRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                name: "Bench".to_owned(),
                slug: "bench".to_owned(),
                owner: Some(tenants_pb::OwnerSpec {
                    email: "owner@bench.test".to_owned(),
                    display_name: "Owner".to_owned(),
                }),
                ..Default::default()
            },
            &admin,
        )?)
        .await
        .map_err(|s| anyhow::anyhow!("create tenant: {s:?}"))?
        .into_inner();
    let tenant_id = created.tenant.context("no tenant")?.id;
    // One user per caller: a single account admits only as many sign-ins in flight as its
    // lockout threshold allows, which is the point of the lockout, not its cost.
    let mut tenants_client =
        TenantServiceClient::new(tenants.first().context("no connection")?.clone());
    let mut auth_client =
        AuthServiceClient::new(channels.first().context("no connection")?.clone());
    let mut logins = Vec::new();
    for i in 0..concurrency.min(64) {
        let user = tenants_client
            .create_user(authorized(
                tenants_pb::CreateUserRequest {
                    tenant_id: tenant_id.clone(),
                    email: format!("user{i}@bench.test"),
                    display_name: format!("User {i}"),
                    role: "member".to_owned(),
                },
                &admin,
            )?)
            .await
            .map_err(|s| anyhow::anyhow!("create user: {s:?}"))?
            .into_inner()
            .user
            .context("no user")?;
        auth_client
            .set_password(authorized(
                auth_pb::SetPasswordRequest {
                    grant: Some(auth_pb::set_password_request::Grant::User(
                        auth_pb::UserRef {
                            tenant_id: tenant_id.clone(),
                            user_id: user.id.clone(),
                        },
                    )),
                    new_password: BENCH_PASSWORD.to_owned(),
                    ..Default::default()
                },
                &admin,
            )?)
            .await
            .map_err(|s| anyhow::anyhow!("set password: {s:?}"))?;
        logins.push(auth_pb::LoginRequest {
            tenant_id: tenant_id.clone(),
            email: user.email,
            password: BENCH_PASSWORD.to_owned(),
            ip_address: "192.0.2.1".to_owned(),
            user_agent: "penny-bench".to_owned(),
        });
    }
    let logins = Arc::new(logins);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let token = bench_service_token(server)?;
    phase(
        "auth-login",
        channels,
        concurrency,
        warmup,
        limit,
        move |channel| {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % logins.len();
            let request = authorized(logins[i].clone(), &token);
            async move {
                let request = request.map_err(|e| tonic::Status::internal(e.to_string()))?;
                AuthServiceClient::new(channel)
                    .login(request)
                    .await
                    .map(drop)
            }
        },
    )
    .await
}

pub(crate) fn authorized<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    Ok(penny_platform::principal::bearer_request(message, token)?)
}

/// Runs `call` from `concurrency` tasks: first unmeasured for `warmup`, then measured.
async fn phase<F, Fut>(
    name: &'static str,
    channels: &[Channel],
    concurrency: u32,
    warmup: Duration,
    limit: Limit,
    call: F,
) -> anyhow::Result<PhaseReport>
where
    F: Fn(Channel) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    if !warmup.is_zero() {
        drive(channels, concurrency, Limit::Duration(warmup), call.clone()).await?;
    }
    let started = Instant::now();
    let cpu_before = process_cpu();
    let (ok, errors, latency_us) = drive(channels, concurrency, limit, call).await?;
    let cpu = process_cpu()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    Ok(PhaseReport {
        cpu,
        name,
        concurrency,
        ok,
        errors,
        elapsed: started.elapsed(),
        latency_us,
    })
}

async fn drive<F, Fut>(
    channels: &[Channel],
    concurrency: u32,
    limit: Limit,
    call: F,
) -> anyhow::Result<(u64, BTreeMap<String, u64>, Histogram<u64>)>
where
    F: Fn(Channel) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let deadline = match limit {
        Limit::Duration(d) => Some(Instant::now() + d),
        Limit::Requests(_) => None,
    };
    let budget = Arc::new(std::sync::atomic::AtomicU64::new(match limit {
        Limit::Requests(n) => n,
        Limit::Duration(_) => u64::MAX,
    }));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let channel = channels[worker as usize % channels.len()].clone();
        let call = call.clone();
        let budget = budget.clone();
        let mut histogram = new_histogram()?;
        tasks.spawn(async move {
            let mut ok = 0u64;
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let taken = budget.fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |left| left.checked_sub(1),
                );
                if taken.is_err() {
                    break;
                }
                let start = Instant::now();
                let result = call(channel.clone()).await;
                let micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                histogram.saturating_record(micros.max(1));
                match result {
                    Ok(()) => ok += 1,
                    Err(status) => *errors.entry(format!("{:?}", status.code())).or_default() += 1,
                }
            }
            (ok, errors, histogram)
        });
    }
    let mut ok = 0;
    let mut errors = BTreeMap::new();
    let mut histogram = new_histogram()?;
    while let Some(joined) = tasks.join_next().await {
        let (task_ok, task_errors, task_histogram) = joined.context("load task")?;
        ok += task_ok;
        for (code, n) in task_errors {
            *errors.entry(code).or_default() += n;
        }
        histogram.add(&task_histogram)?;
    }
    Ok((ok, errors, histogram))
}

/// 1 µs to 60 s at 3 significant figures; slower calls are clamped to the top.
fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// Peak resident set size of this process, in KiB (Linux).
/// CPU time (user and system) of this process so far, from `/proc/self/stat` (in clock
/// ticks of 10 ms, Linux's USER_HZ).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces): state is the first, utime the
    // 12th and stime the 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

pub(crate) fn peak_rss_kib() -> Option<u64> {
    status_kib("VmHWM:")
}

/// A `kB` field of `/proc/self/status` (`VmRSS:`, `VmHWM:`), in KiB (Linux).
pub(crate) fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A temporary directory removed on drop.
pub(crate) struct TempDir(pub(crate) std::path::PathBuf);

impl TempDir {
    pub(crate) fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("penny-bench-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
