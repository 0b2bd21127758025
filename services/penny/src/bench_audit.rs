//! `penny bench audit-append`: sustained `AuditService.Append` with chaining, against its
//! ceiling measured in the same run on the same database — a plain multi-row INSERT of the
//! same rows (events and payloads, one transaction per batch, same indexes) with no head
//! lock, no duplicate lookup, no hashing and no gRPC — then `VerifyChain` over what was
//! appended. PostgreSQL with `--database-url` (an admin URL: the bench makes a fresh
//! database and serves through an unprivileged role, as production does), else SQLite.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use penny_platform::db::Sql;
use penny_platform::principal::TokenVerifier;
use penny_platform::server::ServeConfig;
use penny_platform::signing::SigningKey;
use penny_proto::audit::v1 as pb;
use penny_proto::audit::v1::audit_service_client::AuditServiceClient;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, TransactionTrait, Value};
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::bench::{BenchArgs, TempDir, connect, spawn_server};

/// The unprivileged role the bench serves PostgreSQL through.
const BENCH_APP_ROLE: &str = "penny_bench_app";

pub(crate) struct Database {
    /// The PostgreSQL admin URL and the fresh database's name, to drop it at the end.
    admin: Option<(String, String)>,
    /// The serving role's URL.
    pub(crate) serve_url: String,
    /// The owner's URL (PostgreSQL), for migrations and the plain-insert ceiling.
    pub(crate) owner_url: Option<String>,
}

impl Database {
    /// Drops the fresh PostgreSQL database (nothing on SQLite).
    pub(crate) async fn drop_database(&self) -> anyhow::Result<()> {
        if let Some((admin_url, name)) = &self.admin {
            let admin = penny_platform::db::connect(admin_url).await?;
            admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await?;
            admin.close().await.ok();
        }
        Ok(())
    }
}

fn with_path_and_user(admin: &str, database: &str, user: Option<&str>) -> anyhow::Result<String> {
    let mut url = url::Url::parse(admin).context("--database-url: not a URL")?;
    url.set_path(&format!("/{database}"));
    if let Some(user) = user {
        url.set_username(user)
            .map_err(|()| anyhow::anyhow!("--database-url: cannot set the user"))?;
        url.set_password(None)
            .map_err(|()| anyhow::anyhow!("--database-url: cannot clear the password"))?;
    }
    Ok(url.to_string())
}

pub(crate) async fn fresh_database(args: &BenchArgs, dir: &TempDir) -> anyhow::Result<Database> {
    let Some(admin_url) = &args.database_url else {
        return Ok(Database {
            admin: None,
            serve_url: penny_platform::db::sqlite_url(&dir.0, "audit"),
            owner_url: None,
        });
    };
    let name = format!("penny_bench_audit_{}", Uuid::new_v4().simple());
    let admin = penny_platform::db::connect(admin_url)
        .await
        .context("--database-url: cannot connect")?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
        .await?;
    admin
        .execute_unprepared(&format!(
            "DO $$ BEGIN CREATE ROLE {BENCH_APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ))
        .await?;
    admin.close().await.ok();
    Ok(Database {
        serve_url: with_path_and_user(admin_url, &name, Some(BENCH_APP_ROLE))?,
        owner_url: Some(with_path_and_user(admin_url, &name, None)?),
        admin: Some((admin_url.clone(), name)),
    })
}

fn event(tenant: Uuid, n: u64) -> pb::AuditEvent {
    pb::AuditEvent {
        id: Uuid::new_v4().to_string(),
        tenant_id: tenant.to_string(),
        // A thousand users, as the monitor would see them.
        user_id: Uuid::from_u128(0x5e11_0000_0000_4000_8000_0000_0000_0000 | u128::from(n % 1000))
            .to_string(),
        principal_kind: penny_proto::common::v1::PrincipalKind::User as i32,
        action: "keys.generate_data_key".into(),
        resource: "key".into(),
        resource_id: format!("key-{}", n % 97),
        metadata: Some(pb::RequestMetadata {
            method: "/penny.keys.v1.KeyService/GenerateDataKey".into(),
            path: String::new(),
            duration: Some(prost_types::Duration {
                seconds: 0,
                nanos: 420_000,
            }),
            status: 0,
        }),
        ip_address: "203.0.113.10".into(),
        user_agent: "penny-bench/1".into(),
        event_time: Some(prost_types::Timestamp {
            seconds: 1_764_900_000,
            nanos: 0,
        }),
        service: "keys".into(),
        outcome: pb::Outcome::Success as i32,
        trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
        attributes: [("purpose".to_owned(), "file".to_owned())].into(),
        ..Default::default()
    }
}

fn random32() -> Vec<u8> {
    let mut bytes = vec![0u8; 32];
    for chunk in bytes.chunks_mut(16) {
        chunk.copy_from_slice(Uuid::new_v4().as_bytes());
    }
    bytes
}

/// The ceiling's tables: the audit tables' shapes and indexes, nothing else.
async fn create_plain_tables(db: &DatabaseConnection) -> anyhow::Result<()> {
    let statements: &[&str] = if db.get_database_backend() == DbBackend::Postgres {
        &[
            "CREATE TABLE bench_plain_events (LIKE audit_events INCLUDING ALL)",
            "CREATE TABLE bench_plain_payloads (LIKE audit_payloads INCLUDING ALL)",
        ]
    } else {
        &[
            "CREATE TABLE bench_plain_events AS SELECT * FROM audit_events WHERE 0",
            "CREATE UNIQUE INDEX bench_plain_events_pk ON bench_plain_events (tenant_id, sequence)",
            "CREATE UNIQUE INDEX bench_plain_events_id ON bench_plain_events (tenant_id, event_id)",
            "CREATE INDEX bench_plain_events_action ON bench_plain_events (tenant_id, action, sequence)",
            "CREATE INDEX bench_plain_events_time ON bench_plain_events (tenant_id, event_time_micros)",
            "CREATE TABLE bench_plain_payloads AS SELECT * FROM audit_payloads WHERE 0",
            "CREATE UNIQUE INDEX bench_plain_payloads_pk ON bench_plain_payloads (tenant_id, sequence)",
            "CREATE INDEX bench_plain_payloads_user ON bench_plain_payloads (tenant_id, user_id, sequence)",
        ]
    };
    for sql in statements {
        db.execute_unprepared(sql).await?;
    }
    Ok(())
}

/// One plain multi-row INSERT of a batch (events, then payloads) in one transaction.
async fn insert_plain(
    db: &DatabaseConnection,
    tenant: Uuid,
    first: u64,
    batch: &[pb::AuditEvent],
) -> anyhow::Result<()> {
    let backend = db.get_database_backend();
    let mut events = Sql::new(
        backend,
        "INSERT INTO bench_plain_events (tenant_id, sequence, event_id, service, action, resource, \
         resource_id, principal_kind, outcome, method, duration_micros, status, trace_id, \
         event_time_micros, receive_time_micros, payload_digest, prev_hash, hash, producer_id) VALUES ",
    );
    let mut payloads = Sql::new(
        backend,
        "INSERT INTO bench_plain_payloads (tenant_id, sequence, user_id, ip_address, user_agent, \
         path, attributes, salt) VALUES ",
    );
    for (i, e) in batch.iter().enumerate() {
        let sequence = i64::try_from(first + i as u64).unwrap_or(i64::MAX);
        if i > 0 {
            events.push(", ");
            payloads.push(", ");
        }
        events.bind_list::<Value>([
            tenant.into(),
            sequence.into(),
            Uuid::parse_str(&e.id)?.into(),
            e.service.clone().into(),
            e.action.clone().into(),
            e.resource.clone().into(),
            e.resource_id.clone().into(),
            e.principal_kind.into(),
            e.outcome.into(),
            "/penny.keys.v1.KeyService/GenerateDataKey"
                .to_owned()
                .into(),
            420i64.into(),
            0i32.into(),
            e.trace_id.clone().into(),
            1_764_900_000_000_000i64.into(),
            1_764_900_000_000_000i64.into(),
            random32().into(),
            random32().into(),
            random32().into(),
            "svc-bench".to_owned().into(),
        ]);
        payloads.bind_list::<Value>([
            tenant.into(),
            sequence.into(),
            e.user_id.clone().into(),
            e.ip_address.clone().into(),
            e.user_agent.clone().into(),
            String::new().into(),
            "{\"purpose\":\"file\"}".to_owned().into(),
            random32()[..16].to_vec().into(),
        ]);
    }
    let txn = db.begin().await?;
    txn.execute_raw(events.build()).await?;
    txn.execute_raw(payloads.build()).await?;
    txn.commit().await?;
    Ok(())
}

struct Rate {
    name: &'static str,
    events: u64,
    elapsed: Duration,
}

impl Rate {
    fn per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    fn print(&self) {
        println!(
            "{:<14} {:>10} events in {:>6.2} s  {:>10.0} events/s",
            self.name,
            self.events,
            self.elapsed.as_secs_f64(),
            self.per_sec()
        );
    }
}

/// Runs `work(worker)` on `concurrency` workers until `duration` has passed (after
/// `warmup`, unmeasured); each call returns how many events it stored.
async fn sustained<F, Fut>(
    name: &'static str,
    concurrency: u32,
    warmup: Duration,
    duration: Duration,
    work: F,
) -> anyhow::Result<Rate>
where
    F: Fn(u32) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<u64>> + Send,
{
    let counted = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(warmup.is_zero()));
    let start = Instant::now();
    let end = start + warmup + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let work = work.clone();
        let counted = counted.clone();
        let measuring = measuring.clone();
        tasks.spawn(async move {
            while Instant::now() < end {
                let stored = work(worker).await?;
                if measuring.load(Ordering::Relaxed) {
                    counted.fetch_add(stored, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        });
    }
    if !warmup.is_zero() {
        tokio::time::sleep(warmup).await;
        measuring.store(true, Ordering::Relaxed);
    }
    let measured_from = Instant::now();
    while let Some(joined) = tasks.join_next().await {
        joined.context("bench worker")??;
    }
    Ok(Rate {
        name,
        events: counted.load(Ordering::Relaxed),
        elapsed: measured_from.elapsed(),
    })
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let database = fresh_database(args, &dir).await?;
    let batch = args.batch as usize;
    let warmup = Duration::from_secs(args.warmup_secs);
    let duration = Duration::from_secs(args.duration_secs);
    println!(
        "penny bench audit-append: {} on a fresh database, {} producers (one tenant each), batches of {batch}, {} s per phase",
        if database.owner_url.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        args.concurrency,
        duration.as_secs()
    );

    // The audit service, in this process, on the database.
    let signing = SigningKey::generate()?;
    let config = ServeConfig::new_for_dev(TokenVerifier::new(&signing.jwks())?);
    let mut audit_config = penny_audit::AuditConfig::new(
        database.serve_url.clone(),
        Arc::new(SigningKey::generate()?),
    );
    audit_config.migration_database_url = database.owner_url.clone();
    // The monitor counts every event by the guide's rules, as in production; its actions
    // are not carried out (nothing to carry them out here).
    let mut rules = penny_audit::monitor::rules::RuleSet::defaults();
    for rule in &mut rules.rules {
        rule.dry_run = true;
    }
    audit_config.monitor_rules = (!args.without_monitor).then_some(rules);
    let audit = penny_audit::build(audit_config, &config).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (stop, task) = spawn_server(
        config.clone(),
        penny_audit::bundle(audit, &config),
        listener,
    );
    let token = crate::bench::service_token(&signing, "svc-bench")?;
    let channels = connect(&addr, args.connections).await?;

    // The ceiling: the same rows, plainly inserted.
    let owner =
        penny_platform::db::connect(database.owner_url.as_deref().unwrap_or(&database.serve_url))
            .await?;
    create_plain_tables(&owner).await?;
    let plain_tenants: Arc<Vec<Uuid>> =
        Arc::new((0..args.concurrency).map(|_| Uuid::new_v4()).collect());
    let plain_next: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.concurrency).map(|_| AtomicU64::new(1)).collect());
    let plain = {
        let owner = owner.clone();
        sustained(
            "plain-insert",
            args.concurrency,
            warmup,
            duration,
            move |worker| {
                let owner = owner.clone();
                let tenants = plain_tenants.clone();
                let next = plain_next.clone();
                async move {
                    let tenant = tenants[worker as usize];
                    let events: Vec<pb::AuditEvent> =
                        (0..batch as u64).map(|n| event(tenant, n)).collect();
                    let first = next[worker as usize].fetch_add(batch as u64, Ordering::Relaxed);
                    insert_plain(&owner, tenant, first, &events).await?;
                    Ok(batch as u64)
                }
            },
        )
        .await?
    };
    plain.print();

    // Append, chained, through the service.
    let tenants: Arc<Vec<Uuid>> = Arc::new((0..args.concurrency).map(|_| Uuid::new_v4()).collect());
    let appended = {
        let tenants = tenants.clone();
        let channels = channels.clone();
        let token = token.clone();
        sustained(
            "audit-append",
            args.concurrency,
            warmup,
            duration,
            move |worker| {
                let tenant = tenants[worker as usize];
                let channel = channels[worker as usize % channels.len()].clone();
                let token = token.clone();
                async move {
                    let events: Vec<pb::AuditEvent> =
                        (0..batch as u64).map(|n| event(tenant, n)).collect();
                    let mut request = tonic::Request::new(pb::AppendRequest { events });
                    request
                        .metadata_mut()
                        .insert("authorization", format!("Bearer {token}").parse()?);
                    let results = AuditServiceClient::new(channel)
                        .append(request)
                        .await?
                        .into_inner()
                        .results;
                    let stored = results
                        .iter()
                        .filter(|r| {
                            matches!(r.result, Some(pb::append_result::Result::Sequence(_)))
                        })
                        .count() as u64;
                    anyhow::ensure!(
                        stored == batch as u64,
                        "{} events refused",
                        batch as u64 - stored
                    );
                    Ok(stored)
                }
            },
        )
        .await?
    };
    appended.print();

    // VerifyChain over every producer's chain, one after another.
    let mut verified = 0;
    let started = Instant::now();
    for tenant in tenants.iter() {
        let mut request = tonic::Request::new(pb::VerifyChainRequest {
            tenant_id: tenant.to_string(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        let reply = AuditServiceClient::new(channels[0].clone())
            .verify_chain(request)
            .await?
            .into_inner();
        anyhow::ensure!(
            reply.valid,
            "chain of {tenant} did not verify: {}",
            reply.message
        );
        verified += reply.verified_count;
    }
    let verify = Rate {
        name: "verify-chain",
        events: verified,
        elapsed: started.elapsed(),
    };
    verify.print();

    let ratio = appended.per_sec() / plain.per_sec().max(f64::EPSILON);
    println!("audit-append / plain-insert: {ratio:.2}x");
    let _ = stop.send(());
    task.await.context("audit server")??;
    owner.close().await.ok();
    database.drop_database().await?;
    if let Some(rss) = crate::bench::peak_rss_kib() {
        println!(
            "peak RSS {:.1} MiB (one process: server and load generator together)",
            rss as f64 / 1024.0
        );
    }
    let mut missed = Vec::new();
    if let Some(min) = args.min_throughput_ratio
        && ratio < min
    {
        missed.push(format!("append {ratio:.2}x of plain insert < {min}"));
    }
    if let Some(min) = args.min_events_per_sec
        && appended.per_sec() < min as f64
    {
        missed.push(format!("append {:.0} events/s < {min}", appended.per_sec()));
    }
    if let Some(min) = args.min_verify_per_sec
        && verify.per_sec() < min as f64
    {
        missed.push(format!("verify {:.0} events/s < {min}", verify.per_sec()));
    }
    if missed.is_empty() {
        println!("targets met");
        Ok(())
    } else {
        anyhow::bail!("targets missed: {}", missed.join("; "))
    }
}
