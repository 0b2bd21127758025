//! `penny bench files-upload`: `FileService.Upload` of large files (50 MiB by default, in
//! 1 MiB chunks), against its ceiling measured in the same run: the raw pipeline — SHA-256
//! and the AES-256-GCM segment sealing files uses — over the same bytes on one thread,
//! without gRPC, scanning or storage. With `--clamd`, also clamd's own `INSTREAM` rate on
//! the same bytes, and uploads through a files server that scans with that clamd. Then the
//! peak RSS of this process (files, keys and the load, all in it) during one upload and
//! during 8 concurrent ones, above its idle RSS.
//!
//! Every file is the same bytes: a PNG signature, then one pseudo-random 1 MiB block
//! repeated (the client holds one block, so the load adds no memory of its own). Each
//! upload's file is deleted after it, so storage does not fill up; the delete is inside the
//! measured time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use penny_platform::principal::TokenVerifier;
use penny_platform::server::ServeConfig;
use penny_platform::signing::SigningKey;
use penny_proto::files::v1 as pb;
use penny_proto::files::v1::file_service_client::FileServiceClient;
use penny_proto::keys::v1 as keys_pb;
use penny_proto::keys::v1::key_service_client::KeyServiceClient;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::bench::{BenchArgs, TempDir, connect, service_token, spawn_server, status_kib};

const MIB: usize = 1024 * 1024;

/// The bytes of every file: `chunks` chunks of one 1 MiB block, the first starting with
/// a PNG signature.
#[derive(Clone)]
struct Content {
    first: Bytes,
    rest: Bytes,
    chunks: usize,
}

impl Content {
    fn new(mib: usize) -> Self {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let block: Vec<u8> = (0..MIB)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect();
        let mut first = block.clone();
        first[..8].copy_from_slice(b"\x89PNG\r\n\x1a\n");
        Self {
            first: first.into(),
            rest: block.into(),
            chunks: mib,
        }
    }

    fn bytes(&self) -> u64 {
        (self.chunks * MIB) as u64
    }

    fn chunk(&self, i: usize) -> Bytes {
        if i == 0 {
            self.first.clone()
        } else {
            self.rest.clone()
        }
    }
}

/// A files server (and the keys server it calls) in this process.
struct Fleet {
    files: Vec<Channel>,
    token: Arc<String>,
    tenant: Uuid,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    _dir: TempDir,
    _storage: Option<TempDir>,
}

async fn start(
    clamd: Option<&str>,
    connections: u32,
    storage_dir: Option<&std::path::Path>,
) -> anyhow::Result<Fleet> {
    let dir = TempDir::new()?;
    let storage = match storage_dir {
        Some(parent) => {
            let path = parent.join(format!("penny-bench-files-{}", Uuid::new_v4()));
            std::fs::create_dir_all(&path)
                .with_context(|| format!("--storage-dir {}", parent.display()))?;
            Some(TempDir(path))
        }
        None => None,
    };
    let objects = storage
        .as_ref()
        .map_or_else(|| dir.0.join("objects"), |s| s.0.clone());
    let signing = SigningKey::generate()?;
    let token = Arc::new(service_token(&signing, "svc-bench")?);
    let mut config = ServeConfig::new_for_dev(TokenVerifier::new(&signing.jwks())?);
    // Files calls keys with its own credential through the authorizer; the bench calls
    // files as a fleet service, so authz itself is never asked.
    config.authorizer = Some(penny_platform::Authorizer::new(
        tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy(),
        penny_platform::ServiceCredential::fixed(token.as_str()),
    ));
    let keys = crate::bench::local_keys(&dir, "keys").await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let keys_addr = listener.local_addr()?;
    let (keys_stop, _keys_task) =
        spawn_server(config.clone(), penny_keys::bundle(keys, &config), listener);
    let scanner = match clamd {
        Some(addr) => penny_files::ScannerConfig::Clamd(
            penny_files::scan::ClamdAddr::parse(addr)
                .with_context(|| format!("--clamd {addr}: not tcp://host:port or unix:///path"))?,
            Duration::from_secs(20),
        ),
        None => penny_files::ScannerConfig::None,
    };
    let files = penny_files::build(
        penny_files::FilesConfig {
            database_url: penny_platform::db::sqlite_url(&dir.0, "files"),
            migration_database_url: None,
            keys_url: format!("http://{keys_addr}"),
            storage: penny_files::StorageConfig::Filesystem(objects),
            scanner,
            quarantine_unscannable: false,
            stale_after: penny_files::service::DEFAULT_STALE_AFTER,
            rewrap_every: Duration::ZERO,
            signed_urls: penny_files::SignedUrlConfig {
                key: zeroize::Zeroizing::new(vec![7; 32]),
                public_url: "http://127.0.0.1:9".into(),
            },
        },
        &config,
    )
    .await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let files_addr = listener.local_addr()?.to_string();
    let (files_stop, _files_task) = spawn_server(
        config.clone(),
        penny_files::bundle(files, &config),
        listener,
    );
    let tenant = Uuid::new_v4();
    let keys_channel = connect(&keys_addr.to_string(), 1).await?;
    KeyServiceClient::new(keys_channel[0].clone())
        .create_key(crate::bench::authorized(
            keys_pb::CreateKeyRequest {
                tenant_id: tenant.to_string(),
            },
            &token,
        )?)
        .await?;
    Ok(Fleet {
        files: connect(&files_addr, connections).await?,
        token,
        tenant,
        stops: vec![keys_stop, files_stop],
        _dir: dir,
        _storage: storage,
    })
}

impl Fleet {
    /// Uploads one file and deletes it; its plaintext bytes.
    async fn upload(&self, channel: Channel, content: &Content) -> anyhow::Result<u64> {
        let tenant = self.tenant.to_string();
        let header = pb::UploadRequest {
            part: Some(pb::upload_request::Part::Header(pb::FileHeader {
                tenant_id: tenant.clone(),
                filename: "bench.png".into(),
                declared_content_type: "image/png".into(),
                ..Default::default()
            })),
        };
        let content_stream = content.clone();
        let messages = tokio_stream::iter(std::iter::once(header).chain((0..content.chunks).map(
            move |i| pb::UploadRequest {
                part: Some(pb::upload_request::Part::Chunk(content_stream.chunk(i))),
            },
        )));
        let mut client = FileServiceClient::new(channel);
        let results = client
            .upload(crate::bench::authorized(messages, &self.token)?)
            .await?
            .into_inner()
            .results;
        let file = match results.into_iter().next().and_then(|r| r.result) {
            Some(pb::upload_result::Result::File(file)) => file,
            other => anyhow::bail!("the upload was refused: {other:?}"),
        };
        client
            .delete_file(crate::bench::authorized(
                pb::DeleteFileRequest {
                    tenant_id: tenant,
                    file_id: file.id,
                },
                &self.token,
            )?)
            .await?;
        Ok(file.size_bytes)
    }

    async fn stop(self) {
        for stop in self.stops {
            let _ = stop.send(());
        }
    }
}

/// Bytes per second over `duration` with `concurrency` uploaders (each upload, and its
/// delete, counted whole), and the p50 and max of one upload's time.
async fn upload_phase(
    name: &str,
    fleet: &Arc<Fleet>,
    content: &Content,
    concurrency: u32,
    duration: Duration,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..concurrency {
        let fleet = fleet.clone();
        let content = content.clone();
        let done = done.clone();
        let channel = fleet.files[i as usize % fleet.files.len()].clone();
        workers.spawn(async move {
            let mut times = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                done.fetch_add(
                    fleet.upload(channel.clone(), &content).await?,
                    Ordering::Relaxed,
                );
                times.push(t.elapsed());
            }
            anyhow::Ok(times)
        });
    }
    let mut times = Vec::new();
    while let Some(worker) = workers.join_next().await {
        times.extend(worker??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = done.load(Ordering::Relaxed) as f64 / elapsed;
    times.sort();
    let p50 = times.get(times.len() / 2).copied().unwrap_or_default();
    let max = times.last().copied().unwrap_or_default();
    println!(
        "{name:<28} c={concurrency:<3} {:>4} uploads {:>8.1} MiB/s  per upload p50={:>6.0} ms max={:>6.0} ms",
        times.len(),
        rate / MIB as f64,
        p50.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    Ok(rate)
}

/// The raw pipeline on this thread: SHA-256 and AES-256-GCM sealing of the same bytes.
fn pipeline_phase(content: &Content, duration: Duration) -> anyhow::Result<f64> {
    let key = [7u8; 32];
    let mut out = Vec::with_capacity(2 * MIB);
    let started = Instant::now();
    let mut bytes = 0u64;
    while started.elapsed() < duration {
        let mut sha = sha2::Sha256::new();
        let mut sealer = penny_files::seal::Sealer::new(&key, Uuid::nil())?;
        for i in 0..content.chunks {
            let chunk = content.chunk(i);
            sha.update(&chunk);
            sealer.update(&chunk, &mut out)?;
            out.clear();
        }
        sealer.finish(&mut out)?;
        out.clear();
        std::hint::black_box(sha.finalize());
        bytes += content.bytes();
    }
    let rate = bytes as f64 / started.elapsed().as_secs_f64();
    println!(
        "{:<28} 1 thread      {:>8.1} MiB/s",
        "pipeline (SHA-256 + seal)",
        rate / MIB as f64
    );
    Ok(rate)
}

/// clamd's own INSTREAM rate on the same bytes, one stream at a time.
async fn clamd_phase(addr: &str, content: &Content, duration: Duration) -> anyhow::Result<f64> {
    let target = addr
        .strip_prefix("tcp://")
        .context("--clamd: the clamd-only measurement needs tcp://host:port")?;
    let started = Instant::now();
    let mut bytes = 0u64;
    while started.elapsed() < duration {
        let mut stream = tokio::net::TcpStream::connect(target).await?;
        stream.write_all(b"zINSTREAM\0").await?;
        for i in 0..content.chunks {
            let chunk = content.chunk(i);
            stream
                .write_all(&u32::try_from(chunk.len())?.to_be_bytes())
                .await?;
            stream.write_all(&chunk).await?;
        }
        stream.write_all(&[0, 0, 0, 0]).await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        let reply = String::from_utf8_lossy(&reply);
        anyhow::ensure!(reply.contains("OK"), "clamd answered {reply}");
        bytes += content.bytes();
    }
    let rate = bytes as f64 / started.elapsed().as_secs_f64();
    println!(
        "{:<28} 1 stream      {:>8.1} MiB/s",
        "clamd INSTREAM alone",
        rate / MIB as f64
    );
    Ok(rate)
}

/// Resets this process's peak RSS to its current RSS (Linux `clear_refs` 5); false when
/// the kernel does not allow it (the peak then counts from the process's start).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", b"5").is_ok()
}

/// The peak RSS above the RSS before, during `uploads` concurrent uploads, in MiB.
async fn rss_phase(fleet: &Arc<Fleet>, content: &Content, uploads: u32) -> anyhow::Result<f64> {
    let idle = status_kib("VmRSS:").context("VmRSS")?;
    let reset = reset_peak_rss();
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..uploads {
        let fleet = fleet.clone();
        let content = content.clone();
        let channel = fleet.files[i as usize % fleet.files.len()].clone();
        workers.spawn(async move { fleet.upload(channel, &content).await });
    }
    while let Some(worker) = workers.join_next().await {
        worker??;
    }
    let peak = status_kib("VmHWM:").context("VmHWM")?;
    let above = peak.saturating_sub(idle) as f64 / 1024.0;
    println!(
        "{:<28} {uploads} upload(s)   peak RSS {:.1} MiB above idle ({:.1} MiB idle, peak {:.1} MiB{})",
        "memory",
        above,
        idle as f64 / 1024.0,
        peak as f64 / 1024.0,
        if reset {
            ""
        } else {
            "; peak since start: clear_refs refused"
        }
    );
    Ok(above)
}

pub(crate) async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    // The servers' logs, only when asked for (`RUST_LOG=warn`, say).
    let _telemetry = match std::env::var_os("RUST_LOG") {
        Some(_) => Some(penny_platform::telemetry::init(
            penny_platform::telemetry::LogFormat::Text,
            "penny-bench",
        )?),
        None => None,
    };
    let content = Content::new(usize::try_from(args.file_mib)?);
    let duration = Duration::from_secs(args.duration_secs);
    println!(
        "penny bench FilesUpload: {} MiB files in 1 MiB chunks, concurrency {}, {} connection(s), {} s per phase, objects in {}{}",
        args.file_mib,
        args.concurrency,
        args.connections,
        duration.as_secs(),
        args.storage_dir.as_deref().map_or_else(
            || "the bench's temporary directory".to_owned(),
            |d| d.display().to_string()
        ),
        args.clamd
            .as_deref()
            .map(|c| format!(", clamd {c}"))
            .unwrap_or_default()
    );
    let mut missed = Vec::new();

    let storage = args.storage_dir.as_deref();
    let fleet = Arc::new(start(None, args.connections, storage).await?);
    // Warm-up: the first uploads grow the allocator's pools and the connections' windows.
    upload_phase(
        "warm-up",
        &fleet,
        &content,
        args.concurrency,
        Duration::from_secs(args.warmup_secs.max(1)),
    )
    .await?;
    let ceiling = tokio::task::spawn_blocking({
        let content = content.clone();
        move || pipeline_phase(&content, duration)
    })
    .await??;
    let upload = upload_phase(
        "upload, scanner none",
        &fleet,
        &content,
        args.concurrency,
        duration,
    )
    .await?;
    let ratio = upload / ceiling;
    println!("upload / pipeline: {ratio:.2}x");
    if let Some(min) = args.min_throughput_ratio
        && ratio < min
    {
        missed.push(format!("upload {ratio:.2}x of the pipeline < {min}"));
    }
    let one = rss_phase(&fleet, &content, 1).await?;
    let eight = rss_phase(&fleet, &content, 8).await?;
    if let Some(max) = args.max_rss_mib
        && one > max as f64
    {
        missed.push(format!("one upload: {one:.1} MiB above idle > {max}"));
    }
    if let Some(max) = args.max_rss_mib_8
        && eight > max as f64
    {
        missed.push(format!("8 uploads: {eight:.1} MiB above idle > {max}"));
    }
    if let Ok(fleet) = Arc::try_unwrap(fleet) {
        fleet.stop().await;
    }

    if let Some(clamd) = &args.clamd {
        let alone = clamd_phase(clamd, &content, duration).await?;
        let fleet = Arc::new(start(Some(clamd), args.connections, storage).await?);
        upload_phase(
            "warm-up",
            &fleet,
            &content,
            args.concurrency,
            Duration::from_secs(args.warmup_secs.max(1)),
        )
        .await?;
        let scanned = upload_phase(
            "upload, scanned by clamd",
            &fleet,
            &content,
            args.concurrency,
            duration,
        )
        .await?;
        println!(
            "upload with clamd / clamd INSTREAM alone: {:.2}x",
            scanned / alone
        );
        if let Ok(fleet) = Arc::try_unwrap(fleet) {
            fleet.stop().await;
        }
    }
    if missed.is_empty() {
        println!("targets met");
        Ok(())
    } else {
        anyhow::bail!("targets missed: {}", missed.join("; "))
    }
}
