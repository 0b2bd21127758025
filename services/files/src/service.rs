//! The files service's operations: the upload pipeline (limit, sniff, hash, scan, seal in
//! one pass; commit only clean, complete files), reads, downloads and deletion.

use std::sync::Arc;
use std::time::{Duration, Instant};

use penny_platform::error::reason_name;
use penny_platform::{ApiError, AuditClient, Authorizer, Principal, Reason};
use penny_proto::audit::v1 as audit_pb;
use penny_proto::keys::v1 as keys_pb;
use penny_proto::keys::v1::key_service_client::KeyServiceClient;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tonic::transport::Channel;
use tracing::Instrument as _;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::content::{ContentRefusal, ContentType, Sniffer};
use crate::domain::{MAX_FILE_BYTES, ScanStatus, StoredFile, display_name, storage_key};
use crate::scan::{ScanSession, Scanner, Verdict};
use crate::seal::{Opener, SealError, Sealer};
use crate::signed::{SignedRef, UrlRefusal, UrlSigner};
use crate::storage::{IncomingObject, ObjectStorage, StorageError};
use crate::store::{ListFilter, Store};

/// The encryption context purpose of file data keys.
pub const KEY_PURPOSE: &str = "file";
/// Sealed bytes gathered before a write to storage.
const WRITE_BUFFER: usize = 1 << 20;
/// Plaintext bytes per Download message.
pub const DOWNLOAD_CHUNK: usize = 256 * 1024;
/// How old an interrupted commit, incoming object or half-done deletion must be before the
/// sweep removes it; the sweep also runs this often (and at start).
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(3600);
/// How long one `PurgeTenantFiles` call starts new pages for (well inside the default
/// 30 s request deadline).
const PURGE_BUDGET: Duration = Duration::from_secs(5);
/// Files hidden and removed per page of a purge.
const PURGE_PAGE: u64 = 500;
/// Objects of a purge page removed at once.
const PURGE_CONCURRENCY: usize = 16;

/// The files service: cheap to clone.
#[derive(Clone, Debug)]
pub struct Files {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    storage: Arc<dyn ObjectStorage>,
    scanner: Scanner,
    keys: KeyServiceClient<Channel>,
    authorizer: Authorizer,
    audit: Option<AuditClient>,
    quarantine_unscannable: bool,
    signer: UrlSigner,
    /// Uploads in progress at once on this server (each holds a clamd connection, a
    /// hashing thread and a few MiB of buffers).
    uploads: Arc<tokio::sync::Semaphore>,
    /// When the last refusal of an unsigned or malformed URL was logged (Unix seconds).
    last_bad_url_log: std::sync::atomic::AtomicU64,
}

/// What a sweep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepCounts {
    /// Incoming objects removed.
    pub objects: u64,
    /// Rows not visible removed, with their objects.
    pub rows: u64,
    /// Rows kept because their object could not be removed.
    pub kept: u64,
}

impl SweepCounts {
    /// Logs what the sweep did, if anything.
    pub fn log(&self) {
        if self.objects + self.rows > 0 {
            tracing::info!(
                objects = self.objects,
                rows = self.rows,
                "files: removed what interrupted uploads and deletions left"
            );
        }
        if self.kept > 0 {
            tracing::warn!(
                rows = self.kept,
                "files: the sweep could not remove some objects; their rows stay for the next sweep"
            );
        }
    }
}

/// Rows whose object a sweep cannot remove that are logged one by one; the rest are only
/// counted.
const SWEEP_WARNINGS: u64 = 10;

/// Most uploads in progress at once on one server; more are refused (UNAVAILABLE,
/// `OVERLOADED`, retry shortly).
pub const MAX_CONCURRENT_UPLOADS: usize = 64;

/// What the service is built from.
#[derive(Debug)]
pub struct Parts {
    /// The metadata database.
    pub store: Store,
    /// Where sealed objects go.
    pub storage: Arc<dyn ObjectStorage>,
    /// clamd, or none.
    pub scanner: Scanner,
    /// The keys service (data keys).
    pub keys: Channel,
    /// Permission decisions, and this service's own credential.
    pub authorizer: Authorizer,
    /// Where per-file events go.
    pub audit: Option<AuditClient>,
    /// Keep unscannable files (as UNSCANNABLE, never downloadable) instead of refusing them.
    pub quarantine_unscannable: bool,
    /// Makes and checks signed download URLs.
    pub signer: UrlSigner,
}

/// Why a signed download was not served.
#[derive(Debug)]
pub enum SignedDownloadError {
    /// The URL is not valid, or no longer names a clean file at its key version: 403,
    /// whatever the reason.
    Refused,
    /// A dependency failed: 503.
    Unavailable,
}

/// The declared part of one file of an upload, validated.
#[derive(Debug, Clone)]
pub struct Header {
    /// The tenant.
    pub tenant: Uuid,
    /// The workspace, if any.
    pub workspace: Option<Uuid>,
    /// The filename as sent (1..1024 bytes).
    pub filename: String,
    /// The declared type, when it is an allowed one.
    pub declared: Option<ContentType>,
    /// The declared type as sent.
    pub declared_text: String,
    /// The SHA-256 the client expects, if any.
    pub expected_sha256: Option<[u8; 32]>,
}

/// How one file of an upload ended.
#[derive(Debug)]
pub struct FileResult {
    /// The filename from the header.
    pub filename: String,
    /// The stored file, or why it was refused (with the file's metadata when it was
    /// quarantined).
    pub outcome: Result<StoredFile, (Reason, String)>,
}

pub(crate) fn dependency(service: &str, status: &tonic::Status) -> ApiError {
    if penny_platform::error::is_transient(status) {
        unavailable(service)
    } else {
        ApiError::internal(&format!("{service} answered {:?}", status.code()))
    }
}

/// A failed call to keys: NOT_FOUND (the tenant has no key, or no longer) is for good,
/// FAILED_PRECONDITION with `no_key`; the rest as [`dependency`] says.
pub(crate) fn keys_failure(status: &tonic::Status, no_key: &str) -> ApiError {
    if status.code() == tonic::Code::NotFound {
        ApiError::failed_precondition(Reason::FailedPrecondition, no_key)
    } else {
        dependency("the keys service", status)
    }
}

/// The encryption context of file `id`'s data key.
pub(crate) fn key_context(id: Uuid) -> keys_pb::EncryptionContext {
    keys_pb::EncryptionContext {
        purpose: KEY_PURPOSE.into(),
        object_id: id.to_string(),
    }
}

fn unavailable(what: &str) -> ApiError {
    ApiError::unavailable(
        Reason::DependencyUnavailable,
        format!("{what} is unavailable; nothing from this request was stored; retry later"),
        Duration::from_secs(1),
    )
}

fn storage_failure(err: &StorageError) -> ApiError {
    tracing::error!(error = %err, "file storage failed");
    unavailable("file storage")
}

fn db_failure(err: &sea_orm::DbErr) -> ApiError {
    ApiError::database(err)
}

/// A data key for one file: the raw key (zeroized on drop) and its wrapped form.
struct DataKey {
    plaintext: Zeroizing<Vec<u8>>,
    wrapped: String,
    version: u32,
}

/// One file going through the pipeline.
struct Ingest {
    header: Header,
    id: Uuid,
    size: u64,
    stage: Stage,
}

enum Stage {
    /// Refused from its header (a type not allowed): its bytes are only counted.
    Refused(Reason, String),
    /// Flowing through the checks into storage.
    Flowing(Box<Flow>),
}

struct Flow {
    declared: ContentType,
    sniffer: Sniffer,
    sha: Hasher,
    scan: ScanSession,
    sealer: Sealer,
    object: Box<dyn IncomingObject>,
    out: Vec<u8>,
    key: DataKey,
}

/// SHA-256 of a file, computed on a thread of the blocking pool while the upload's task
/// seals and stores the same chunks (shared, not copied): hashing and sealing each take
/// about half the pipeline's time, and here they overlap.
struct Hasher {
    chunks: tokio::sync::mpsc::Sender<bytes::Bytes>,
    digest: tokio::task::JoinHandle<[u8; 32]>,
}

/// Chunks waiting for the hasher (at most 1 MiB each).
const HASH_QUEUE: usize = 4;

impl Hasher {
    fn start() -> Self {
        let (chunks, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(HASH_QUEUE);
        let digest = tokio::task::spawn_blocking(move || {
            let mut sha = Sha256::new();
            while let Some(chunk) = rx.blocking_recv() {
                sha.update(&chunk);
            }
            sha.finalize().into()
        });
        Self { chunks, digest }
    }

    async fn update(&self, chunk: bytes::Bytes) -> Result<(), ApiError> {
        self.chunks
            .send(chunk)
            .await
            .map_err(|_| ApiError::internal(&"the hasher stopped"))
    }

    async fn finish(self) -> Result<[u8; 32], ApiError> {
        drop(self.chunks);
        self.digest.await.map_err(|e| ApiError::internal(&e))
    }
}

/// A file ready to commit.
struct Staged {
    file: StoredFile,
    object: Box<dyn IncomingObject>,
}

impl Files {
    /// The service over its parts.
    pub fn new(parts: Parts) -> Self {
        Self {
            inner: Arc::new(Inner {
                store: parts.store,
                storage: parts.storage,
                scanner: parts.scanner,
                keys: KeyServiceClient::new(parts.keys),
                authorizer: parts.authorizer,
                audit: parts.audit,
                quarantine_unscannable: parts.quarantine_unscannable,
                signer: parts.signer,
                uploads: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_UPLOADS)),
                last_bad_url_log: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Whether the database and the scanner answer (readiness).
    pub async fn ready(&self) -> bool {
        self.inner.store.ping().await && self.inner.scanner.version().await.is_ok()
    }

    /// Whether uploads are scanned.
    pub fn scans(&self) -> bool {
        self.inner.scanner.scans()
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(crate) fn authorizer(&self) -> &Authorizer {
        &self.inner.authorizer
    }

    pub(crate) fn keys(&self) -> KeyServiceClient<Channel> {
        self.inner.keys.clone()
    }

    /// An event of the files service about a tenant as a whole (a rewrap job).
    pub(crate) fn record_tenant_event(
        &self,
        caller: Option<&Principal>,
        tenant: Uuid,
        action: &str,
        outcome: audit_pb::Outcome,
        attributes: Vec<(&str, String)>,
    ) {
        if let (Some(audit), Some(mut event)) = (
            &self.inner.audit,
            self.event(caller, None, tenant, action, None, outcome, attributes),
        ) {
            event.resource = "tenant".into();
            event.resource_id = tenant.to_string();
            audit.record(event);
        }
    }

    /// Waits, at most `limit`, for the uploads in progress to end, commits whose client
    /// went away included; whether they all did.
    pub async fn wait_for_uploads(&self, limit: Duration) -> bool {
        let all = u32::try_from(MAX_CONCURRENT_UPLOADS).unwrap_or(u32::MAX);
        tokio::time::timeout(limit, self.inner.uploads.acquire_many(all))
            .await
            .is_ok_and(|permits| permits.is_ok())
    }

    /// Sweeps every `every` for as long as the service lives (the task holds only a weak
    /// reference to it), so that what deletions and failed removals leave goes within twice
    /// `every`, not only at the next start. Any replica may sweep at any time: a sweep
    /// touches only what is older than `every`, far older than any upload runs.
    pub fn sweep_periodically(&self, every: Duration) {
        self.periodically(every, move |files| async move {
            match files.sweep(every).await {
                Ok(swept) => swept.log(),
                Err(err) => {
                    tracing::warn!(error = %err, "files: a periodic sweep failed; the next one tries again");
                }
            }
        });
    }

    /// Runs `pass` every `every` (the first after `every`) for as long as the service lives:
    /// the task holds only a weak reference to it between passes.
    pub(crate) fn periodically<F, Fut>(&self, every: Duration, pass: F)
    where
        F: Fn(Files) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                pass(Files { inner }).await;
            }
        });
    }

    /// Removes what interrupted uploads, commits and deletions left (older than `age`):
    /// incoming objects, and rows not visible, with their objects. A row whose object
    /// cannot be removed is kept for the next sweep (the first few logged one by one).
    pub async fn sweep(&self, age: Duration) -> anyhow::Result<SweepCounts> {
        let objects = self.inner.storage.sweep_incoming(age).await?;
        let cutoff = OffsetDateTime::now_utc() - age;
        let mut rows = 0;
        let mut kept = 0;
        let mut after = None;
        loop {
            let stale = self
                .inner
                .store
                .stale_uncommitted(cutoff, after, 500)
                .await?;
            let Some(last) = stale.last() else {
                break;
            };
            after = Some(last.id);
            for file in &stale {
                if let Err(err) = self.inner.storage.delete(&file.storage_key).await {
                    if kept < SWEEP_WARNINGS {
                        tracing::warn!(file = %file.id, error = %err, "sweep: an object could not be removed; its row stays for the next sweep");
                    }
                    kept += 1;
                    continue;
                }
                self.inner
                    .store
                    .delete_uncommitted(file.tenant_id, &[file.id])
                    .await?;
                rows += 1;
            }
        }
        Ok(SweepCounts {
            objects,
            rows,
            kept,
        })
    }

    async fn data_key(&self, tenant: Uuid, file: Uuid) -> Result<DataKey, ApiError> {
        let request = self
            .inner
            .authorizer
            .service_request(keys_pb::GenerateDataKeyRequest {
                tenant_id: tenant.to_string(),
                context: Some(key_context(file)),
                key_bits: 256,
            })
            .await?;
        let reply = self
            .inner
            .keys
            .clone()
            .generate_data_key(request)
            .await
            .map_err(|s| keys_failure(&s, "the tenant has no key to encrypt files with"))?
            .into_inner();
        Ok(DataKey {
            plaintext: Zeroizing::new(reply.plaintext_key),
            wrapped: reply.wrapped_key,
            version: reply.key_version,
        })
    }

    async fn open_key(&self, file: &StoredFile) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        let request = self
            .inner
            .authorizer
            .service_request(keys_pb::DecryptRequest {
                tenant_id: file.tenant_id.to_string(),
                items: vec![keys_pb::DecryptItem {
                    ciphertext: file.wrapped_key.clone(),
                    context: Some(key_context(file.id)),
                }],
            })
            .await?;
        // NOT_FOUND: the tenant's key was destroyed (crypto-shredding), for good.
        let reply = self
            .inner
            .keys
            .clone()
            .decrypt(request)
            .await
            .map_err(|s| {
                keys_failure(
                    &s,
                    "the tenant's key no longer exists, so the file cannot be opened",
                )
            })?
            .into_inner();
        match reply.results.into_iter().next().and_then(|r| r.result) {
            Some(keys_pb::decrypt_result::Result::Plaintext(key)) => Ok(Zeroizing::new(key)),
            Some(keys_pb::decrypt_result::Result::Error(error)) => {
                tracing::error!(file = %file.id, reason = error.reason, "the keys service would not unwrap a file's data key");
                Err(ApiError::failed_precondition(
                    Reason::FailedPrecondition,
                    "the file's key cannot be opened (its key version may be below the tenant's minimum)",
                ))
            }
            None => Err(ApiError::internal(&"keys answered no result")),
        }
    }

    /// Starts a file of an upload.
    async fn begin(&self, header: Header) -> Result<Ingest, ApiError> {
        let id = Uuid::now_v7();
        let Some(declared) = header.declared else {
            let message = format!(
                "{} is not an allowed type; allowed: {}",
                header.declared_text,
                ContentType::ALL.map(ContentType::mime).join(", ")
            );
            return Ok(Ingest {
                header,
                id,
                size: 0,
                stage: Stage::Refused(Reason::FileTypeNotAllowed, message),
            });
        };
        let key = self.data_key(header.tenant, id).await?;
        let sealer = Sealer::new(&key.plaintext, id)
            .map_err(|e| ApiError::internal(&format!("data key: {e}")))?;
        let object = self
            .inner
            .storage
            .create()
            .await
            .map_err(|e| storage_failure(&e))?;
        let scan = self.inner.scanner.start().await;
        Ok(Ingest {
            header,
            id,
            size: 0,
            stage: Stage::Flowing(Box::new(Flow {
                declared,
                sniffer: Sniffer::new(declared),
                sha: Hasher::start(),
                scan,
                sealer,
                object,
                out: Vec::with_capacity(WRITE_BUFFER + 128 * 1024),
                key,
            })),
        })
    }

    /// The next bytes of a file; RESOURCE_EXHAUSTED once it passes the limit.
    async fn feed(&self, ingest: &mut Ingest, chunk: bytes::Bytes) -> Result<(), ApiError> {
        let bytes: &[u8] = &chunk;
        ingest.size += bytes.len() as u64;
        if ingest.size > MAX_FILE_BYTES {
            return Err(too_large());
        }
        let Stage::Flowing(flow) = &mut ingest.stage else {
            return Ok(());
        };
        flow.sniffer.update(bytes);
        flow.sha.update(chunk.clone()).await?;
        flow.scan.update(bytes).await;
        flow.sealer
            .update(bytes, &mut flow.out)
            .map_err(|e| ApiError::internal(&e))?;
        if flow.out.len() >= WRITE_BUFFER {
            let out = std::mem::take(&mut flow.out);
            flow.out = flow
                .object
                .write(out)
                .await
                .map_err(|e| storage_failure(&e))?;
        }
        Ok(())
    }

    /// Ends a file: decides, from the scan, the content and the checksum, whether it is
    /// kept.
    async fn end(
        &self,
        caller: &Principal,
        ingest: Ingest,
        scanner_version: &str,
    ) -> Result<(FileResult, Option<Staged>), ApiError> {
        let Ingest {
            header,
            id,
            size,
            stage,
        } = ingest;
        let mut flow = match stage {
            Stage::Refused(reason, message) => {
                self.record_refused_unread(caller, id, &header, size, reason);
                return Ok((
                    FileResult {
                        filename: header.filename,
                        outcome: Err((reason, message)),
                    },
                    None,
                ));
            }
            Stage::Flowing(flow) => flow,
        };
        let verdict = flow.scan.finish().await;
        let scan_time = now_micros();
        let sealer = flow.sealer;
        sealer
            .finish(&mut flow.out)
            .map_err(|e| ApiError::internal(&e))?;
        let out = std::mem::take(&mut flow.out);
        flow.object
            .write(out)
            .await
            .map_err(|e| storage_failure(&e))?;
        let content = flow.sniffer.finish();
        let sha256: [u8; 32] = flow.sha.finish().await?;
        let refusal: Option<(Reason, String)> = match (&verdict, &content) {
            (Verdict::Infected(signature), _) => Some((
                Reason::FileInfected,
                format!("malware found ({signature}); the file was not stored"),
            )),
            (_, Err(ContentRefusal::Empty)) => {
                Some((Reason::FileEmpty, "the file is empty".into()))
            }
            (_, Err(ContentRefusal::NotAllowed)) => Some((
                Reason::FileTypeNotAllowed,
                "the content is not of an allowed type".into(),
            )),
            (_, Err(ContentRefusal::Mismatch { detected })) => Some((
                Reason::FileTypeMismatch,
                format!("declared {}, but the content is {detected}", flow.declared),
            )),
            (_, Err(ContentRefusal::NotJson)) => Some((
                Reason::FileTypeMismatch,
                "declared application/json, but the content does not parse as JSON".into(),
            )),
            _ if header
                .expected_sha256
                .is_some_and(|expected| !bool::from(constant_time_eq(&expected, &sha256))) =>
            {
                Some((
                    Reason::FileChecksumMismatch,
                    "the content's SHA-256 is not the expected one".into(),
                ))
            }
            (Verdict::Unscannable(_), _) if !self.inner.quarantine_unscannable => Some((
                Reason::FileUnscannable,
                "the file could not be scanned for malware, so it was not stored; retry later"
                    .into(),
            )),
            _ => None,
        };
        let (status, signature) = match &verdict {
            Verdict::Clean => (ScanStatus::Clean, String::new()),
            Verdict::Infected(signature) => (ScanStatus::Infected, signature.clone()),
            Verdict::Unscannable(why) => {
                tracing::warn!(file = %id, reason = %why, "a file could not be scanned");
                (ScanStatus::Unscannable, String::new())
            }
        };
        let content_type = content.as_ref().map_or(flow.declared, |t| *t);
        let file = StoredFile {
            id,
            tenant_id: header.tenant,
            workspace_id: header.workspace,
            owner_id: caller.id.clone(),
            display_name: display_name(&header.filename),
            content_type: content_type.mime().to_owned(),
            size_bytes: size,
            sha256,
            scan_status: status,
            scan_signature: signature,
            scanner_version: scanner_version.to_owned(),
            scan_time: Some(scan_time),
            key_version: flow.key.version,
            wrapped_key: flow.key.wrapped.clone(),
            storage_key: storage_key(
                header.tenant,
                &caller.id,
                scan_time,
                content_type.extension(),
            ),
            created_at: scan_time,
        };
        if let Some(refusal) = refusal {
            self.record_refusal(caller, &file, &header.filename, &refusal.0);
            return Ok((
                FileResult {
                    filename: header.filename,
                    outcome: Err(refusal),
                },
                None,
            ));
        }
        flow.object
            .complete()
            .await
            .map_err(|e| storage_failure(&e))?;
        let result = if status == ScanStatus::Unscannable {
            Err((
                Reason::FileUnscannable,
                "the file could not be scanned for malware; it is kept in quarantine and cannot be downloaded".into(),
            ))
        } else {
            Ok(file.clone())
        };
        Ok((
            FileResult {
                filename: header.filename,
                outcome: result,
            },
            Some(Staged {
                file,
                object: flow.object,
            }),
        ))
    }

    /// Takes an upload stream to its end: each file through the pipeline, then, if the
    /// stream ended cleanly, the accepted files are committed together. Any stream-level
    /// failure leaves nothing stored.
    pub async fn upload<S>(
        &self,
        caller: &Principal,
        parts: &mut S,
    ) -> Result<Vec<FileResult>, ApiError>
    where
        S: UploadParts,
    {
        let started = Instant::now();
        let Ok(slot) = self.inner.uploads.clone().try_acquire_owned() else {
            return Err(ApiError::unavailable(
                Reason::Overloaded,
                format!(
                    "{MAX_CONCURRENT_UPLOADS} uploads are in progress on this server; retry shortly"
                ),
                Duration::from_secs(1),
            ));
        };
        let scanner_version = if self.inner.scanner.scans() {
            match self.inner.scanner.version().await {
                Ok(version) => version,
                // The files will be unscannable; the scan of each says why.
                Err(_) => "unavailable".to_owned(),
            }
        } else {
            "none".to_owned()
        };
        let mut results = Vec::new();
        let mut staged: Vec<Staged> = Vec::new();
        let mut current: Option<Ingest> = None;
        let outcome: Result<(), ApiError> = async {
            while let Some(part) = parts.next_part().await? {
                match part {
                    UploadPart::Header(header) => {
                        if let Some(done) = current.take() {
                            let (result, ready) = self.end(caller, done, &scanner_version).await?;
                            results.push(result);
                            staged.extend(ready);
                        }
                        current = Some(self.begin(header).await?);
                    }
                    UploadPart::Chunk(bytes) => {
                        let Some(ingest) = current.as_mut() else {
                            return Err(ApiError::invalid_field(
                                "chunk",
                                "the first message of an upload must be a header",
                            ));
                        };
                        if let Err(err) = self.feed(ingest, bytes).await {
                            if err.reason() == Reason::FileTooLarge {
                                self.record_refused_unread(
                                    caller,
                                    ingest.id,
                                    &ingest.header,
                                    ingest.size,
                                    Reason::FileTooLarge,
                                );
                            }
                            return Err(err);
                        }
                    }
                }
            }
            if let Some(done) = current.take() {
                let (result, ready) = self.end(caller, done, &scanner_version).await?;
                results.push(result);
                staged.extend(ready);
            }
            Ok(())
        }
        .await;
        // On failure the incoming objects are dropped, which removes them.
        outcome?;
        if results.is_empty() {
            return Err(ApiError::invalid_field(
                "header",
                "an upload must hold at least one file",
            ));
        }
        // The commit runs to its end in a task of its own: a client that goes away (or a
        // deadline that passes) mid-commit must leave neither half-made rows nor a stored
        // file without its `files.file_stored` event. The task holds the upload's slot,
        // so that it still counts against the limit, and shutdown waits for it.
        let files = self.clone();
        let committer = caller.clone();
        tokio::spawn(
            async move {
                let _slot = slot;
                files.commit(&committer, staged).await
            }
            .instrument(tracing::Span::current()),
        )
        .await
        .map_err(|e| ApiError::internal(&e))??;
        tracing::debug!(files = results.len(), took = ?started.elapsed(), "upload done");
        Ok(results)
    }

    /// Records the files, moves their objects into place, then makes them visible; on any
    /// failure undoes what was done.
    async fn commit(&self, caller: &Principal, staged: Vec<Staged>) -> Result<(), ApiError> {
        let Some(tenant) = staged.first().map(|s| s.file.tenant_id) else {
            return Ok(());
        };
        let files: Vec<StoredFile> = staged.iter().map(|s| s.file.clone()).collect();
        let ids: Vec<Uuid> = files.iter().map(|f| f.id).collect();
        self.inner
            .store
            .insert_uncommitted(tenant, &files)
            .await
            .map_err(|e| db_failure(&e))?;
        // Every key a publish was tried for: one that failed half-way may have left its
        // object at the key.
        let mut published: Vec<String> = Vec::new();
        let mut failure = None;
        for Staged { file, object } in staged {
            published.push(file.storage_key.clone());
            if let Err(err) = object.publish(&file.storage_key).await {
                failure = Some(storage_failure(&err));
                break;
            }
        }
        if failure.is_none()
            && let Err(err) = self.inner.store.mark_committed(tenant, &ids).await
        {
            failure = Some(db_failure(&err));
        }
        if let Some(failure) = failure {
            // Rows first (visible ones too: a commit whose answer was lost may have
            // happened), then the objects, so that no row is left naming a missing object.
            let _ = self.inner.store.delete_failed(tenant, &ids).await;
            for key in &published {
                let _ = self.inner.storage.delete(key).await;
            }
            return Err(failure);
        }
        for file in &files {
            self.record_stored(caller, file);
        }
        Ok(())
    }

    /// A visible file of `tenant`.
    pub async fn get(&self, tenant: Uuid, id: Uuid) -> Result<StoredFile, ApiError> {
        self.inner
            .store
            .get(tenant, id)
            .await
            .map_err(|e| db_failure(&e))?
            .ok_or_else(not_found)
    }

    /// A page of `tenant`'s files, newest first.
    pub async fn list(
        &self,
        tenant: Uuid,
        filter: &ListFilter,
        before: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<StoredFile>, ApiError> {
        self.inner
            .store
            .list(tenant, filter, before, limit)
            .await
            .map_err(|e| db_failure(&e))
    }

    /// Deletes a file: hides its row and drops its wrapped data key, then removes its
    /// object, then the row. When removing the object fails the call still succeeds: the
    /// file is gone for every reader, and the hidden row lets a later sweep
    /// remove the object.
    pub async fn delete(&self, caller: &Principal, tenant: Uuid, id: Uuid) -> Result<(), ApiError> {
        let file = self
            .inner
            .store
            .hide_for_deletion(tenant, id)
            .await
            .map_err(|e| db_failure(&e))?
            .ok_or_else(not_found)?;
        match self.inner.storage.delete(&file.storage_key).await {
            Ok(()) => {
                if let Err(err) = self.inner.store.delete_uncommitted(tenant, &[id]).await {
                    tracing::warn!(file = %id, error = %err, "a deleted file's row could not be removed; a later sweep removes it");
                }
            }
            Err(err) => {
                tracing::error!(file = %id, error = %err, "a deleted file's object could not be removed; a later sweep retries");
            }
        }
        self.record_file_event(
            Some(caller),
            None,
            &file,
            "files.file_deleted",
            audit_pb::Outcome::Success,
            vec![],
        );
        Ok(())
    }

    /// Deletes `tenant`'s files, for the tenant's deletion, once keys has shredded the
    /// tenant's key (so what goes was already unreadable; while the key exists this is
    /// FAILED_PRECONDITION and nothing goes): page by page, each file hidden with its
    /// wrapped data key dropped, its object removed, then its row, for as long as
    /// [`PURGE_BUDGET`] allows (pages already begun are finished). Returns how many went and
    /// whether none is left. An object storage will not remove keeps its hidden row, for
    /// the sweep: the file is gone for every reader either way.
    pub async fn purge_tenant(
        &self,
        caller: &Principal,
        tenant: Uuid,
    ) -> Result<(u64, bool), ApiError> {
        use futures_util::StreamExt;
        match self.latest_key_version(tenant).await {
            Err(err) if err.code() == tonic::Code::NotFound => {}
            Err(err) => return Err(err),
            Ok(_) => {
                return Err(ApiError::failed_precondition(
                    Reason::FailedPrecondition,
                    "the tenant's key still exists: files are purged only after the tenant's key is deleted",
                ));
            }
        }
        let until = tokio::time::Instant::now() + PURGE_BUDGET;
        let store = &self.inner.store;
        let mut deleted = 0u64;
        let mut kept = 0u64;
        let mut done = false;
        while tokio::time::Instant::now() < until {
            let page = store
                .hide_tenant_files(tenant, PURGE_PAGE)
                .await
                .map_err(|e| db_failure(&e))?;
            if page.is_empty() {
                done = true;
                break;
            }
            let targets: Vec<(Uuid, String)> = page
                .iter()
                .map(|file| (file.id, file.storage_key.clone()))
                .collect();
            let removals: Vec<_> = futures_util::stream::iter(targets)
                .map(|(id, key)| {
                    let storage = self.inner.storage.clone();
                    async move { (id, storage.delete(&key).await) }
                })
                .buffer_unordered(PURGE_CONCURRENCY)
                .collect()
                .await;
            let mut removed = Vec::with_capacity(removals.len());
            for (id, result) in removals {
                match result {
                    Ok(()) => removed.push(id),
                    Err(err) => {
                        kept += 1;
                        if kept <= 10 {
                            tracing::error!(%tenant, file = %id, error = %err, "a purged file's object could not be removed; a later sweep retries");
                        }
                    }
                }
            }
            if let Err(err) = store.delete_uncommitted(tenant, &removed).await {
                tracing::warn!(%tenant, error = %err, "purged files' rows could not be removed; a later sweep removes them");
            }
            deleted += u64::try_from(page.len()).unwrap_or(u64::MAX);
        }
        self.record_tenant_event(
            Some(caller),
            tenant,
            "files.tenant_purged",
            audit_pb::Outcome::Success,
            vec![
                ("deleted_files", deleted.to_string()),
                ("objects_left_to_the_sweep", kept.to_string()),
                ("done", done.to_string()),
            ],
        );
        Ok((deleted, done))
    }

    /// Opens a clean file for download: its metadata and a reader of its plaintext.
    pub async fn open(
        &self,
        caller: &Principal,
        tenant: Uuid,
        id: Uuid,
    ) -> Result<(StoredFile, PlainReader), ApiError> {
        let file = self.get(tenant, id).await?;
        if file.scan_status != ScanStatus::Clean {
            return Err(not_clean());
        }
        let reader = self.reader(&file).await?;
        self.record_file_event(
            Some(caller),
            None,
            &file,
            "files.file_downloaded",
            audit_pb::Outcome::Success,
            vec![],
        );
        Ok((file, reader))
    }

    /// A signed URL for a clean file of `tenant`, valid for `ttl`.
    pub async fn create_signed_url(
        &self,
        caller: &Principal,
        tenant: Uuid,
        id: Uuid,
        ttl: Duration,
    ) -> Result<(String, OffsetDateTime), ApiError> {
        let file = self.get(tenant, id).await?;
        if file.scan_status != ScanStatus::Clean {
            return Err(not_clean());
        }
        let expires = unix_now() + ttl.as_secs();
        let url = self.inner.signer.url(tenant, id, expires, file.key_version);
        let expire_time =
            OffsetDateTime::from_unix_timestamp(i64::try_from(expires).unwrap_or(i64::MAX))
                .map_err(|e| ApiError::internal(&e))?;
        self.record_file_event(
            Some(caller),
            None,
            &file,
            "files.signed_url_created",
            audit_pb::Outcome::Success,
            vec![("expires", expires.to_string())],
        );
        Ok((url, expire_time))
    }

    /// Serves a signed URL's request (its raw path and query) from `peer`: the file and a
    /// reader of its plaintext. Refused unless the URL is valid and still names a clean
    /// file at the key version it was made for (a deleted or rewrapped file ends its URLs).
    pub async fn open_signed(
        &self,
        path: &str,
        query: Option<&str>,
        peer: Option<std::net::IpAddr>,
    ) -> Result<(StoredFile, PlainReader), SignedDownloadError> {
        let signed = match self.inner.signer.verify(path, query, unix_now()) {
            Ok(signed) => signed,
            // An expired URL was signed by this service: a use of it is audited.
            Err(UrlRefusal::Expired) => {
                self.record_url_refusal(peer, None, UrlRefusal::Expired);
                return Err(SignedDownloadError::Refused);
            }
            // Anyone can send a malformed or unsigned URL without credentials: one audit
            // event each would let them flood the trail, so these are only logged, at
            // most once a second.
            Err(refusal) => {
                let now = unix_now();
                let last = self
                    .inner
                    .last_bad_url_log
                    .swap(now, std::sync::atomic::Ordering::Relaxed);
                if last != now {
                    tracing::info!(
                        reason = refusal.as_str(),
                        ?peer,
                        "refused a download URL that this service did not sign"
                    );
                }
                return Err(SignedDownloadError::Refused);
            }
        };
        let file = match self.inner.store.get(signed.tenant, signed.file).await {
            Ok(Some(file)) => file,
            Ok(None) => {
                self.record_url_refusal(peer, Some(&signed), UrlRefusal::Gone);
                return Err(SignedDownloadError::Refused);
            }
            Err(err) => {
                tracing::error!(error = %err, "the files database failed serving a signed URL");
                return Err(SignedDownloadError::Unavailable);
            }
        };
        if file.scan_status != ScanStatus::Clean || file.key_version != signed.key_version {
            self.record_url_refusal(peer, Some(&signed), UrlRefusal::Gone);
            return Err(SignedDownloadError::Refused);
        }
        let reader = match self.reader(&file).await {
            Ok(reader) => reader,
            // For good: the tenant's key is gone or below its minimum, or the object is
            // missing. The URL will never work again.
            Err(err)
                if matches!(
                    err.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::DataLoss
                ) =>
            {
                self.record_url_refusal(peer, Some(&signed), UrlRefusal::Gone);
                return Err(SignedDownloadError::Refused);
            }
            Err(_) => return Err(SignedDownloadError::Unavailable),
        };
        self.record_file_event(
            None,
            peer,
            &file,
            "files.file_downloaded",
            audit_pb::Outcome::Success,
            vec![("via", "signed_url".to_owned())],
        );
        Ok((file, reader))
    }

    /// A reader of a file's plaintext.
    async fn reader(&self, file: &StoredFile) -> Result<PlainReader, ApiError> {
        let key = self.open_key(file).await?;
        let opener = Opener::new(&key, file.id).map_err(|e| ApiError::internal(&e))?;
        let object = match self.inner.storage.read(&file.storage_key).await {
            Ok(object) => object,
            Err(StorageError::NotFound) => {
                tracing::error!(file = %file.id, "a file's object is missing");
                return Err(integrity_failed());
            }
            Err(err) => return Err(storage_failure(&err)),
        };
        Ok(PlainReader {
            object,
            opener: Some(opener),
            buf: vec![0; DOWNLOAD_CHUNK],
        })
    }

    /// An event of the files service: by `caller` (nobody, for a signed URL) from `peer`,
    /// in `tenant`, about file `file_id`; `None` without an audit client.
    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        caller: Option<&Principal>,
        peer: Option<std::net::IpAddr>,
        tenant: Uuid,
        action: &str,
        file_id: Option<Uuid>,
        outcome: audit_pb::Outcome,
        attributes: Vec<(&str, String)>,
    ) -> Option<audit_pb::AuditEvent> {
        self.inner.audit.as_ref()?;
        let mut event = penny_platform::audit_layer::call_event(
            "files",
            "",
            caller,
            peer,
            "",
            Instant::now(),
            tonic::Code::Ok,
        );
        event.tenant_id = tenant.to_string();
        event.action = action.to_owned();
        event.resource = "file".into();
        event.resource_id = file_id.map(|id| id.to_string()).unwrap_or_default();
        event.outcome = outcome as i32;
        event.metadata = None;
        for (name, value) in attributes {
            event.attributes.insert(name.to_owned(), value);
        }
        Some(event)
    }

    /// A refused signed URL. Only a URL whose signature held names a tenant worth
    /// believing; the others are recorded in the platform tenant's chain.
    fn record_url_refusal(
        &self,
        peer: Option<std::net::IpAddr>,
        signed: Option<&SignedRef>,
        refusal: UrlRefusal,
    ) {
        let tenant = signed.map_or(penny_platform::principal::PLATFORM_TENANT_ID, |s| s.tenant);
        if let (Some(audit), Some(event)) = (
            &self.inner.audit,
            self.event(
                None,
                peer,
                tenant,
                "files.signed_url_refused",
                signed.map(|s| s.file),
                audit_pb::Outcome::Denied,
                vec![("reason", refusal.as_str().to_owned())],
            ),
        ) {
            audit.record(event);
        }
    }

    fn record_file_event(
        &self,
        caller: Option<&Principal>,
        peer: Option<std::net::IpAddr>,
        file: &StoredFile,
        action: &str,
        outcome: audit_pb::Outcome,
        attributes: Vec<(&str, String)>,
    ) {
        let (Some(audit), Some(mut event)) = (
            &self.inner.audit,
            self.event(
                caller,
                peer,
                file.tenant_id,
                action,
                Some(file.id),
                outcome,
                attributes,
            ),
        ) else {
            return;
        };
        event
            .attributes
            .insert("content_type".into(), file.content_type.clone());
        event
            .attributes
            .insert("size_bytes".into(), file.size_bytes.to_string());
        event.attributes.insert("sha256".into(), hex(&file.sha256));
        event
            .attributes
            .insert("scan_status".into(), file.scan_status.as_str().into());
        if !file.scan_signature.is_empty() {
            event
                .attributes
                .insert("scan_signature".into(), file.scan_signature.clone());
        }
        audit.record(event);
    }

    fn record_stored(&self, caller: &Principal, file: &StoredFile) {
        self.record_file_event(
            Some(caller),
            None,
            file,
            "files.file_stored",
            audit_pb::Outcome::Success,
            vec![],
        );
    }

    fn record_refusal(
        &self,
        caller: &Principal,
        file: &StoredFile,
        filename: &str,
        reason: &Reason,
    ) {
        self.record_file_event(
            Some(caller),
            None,
            file,
            "files.file_refused",
            audit_pb::Outcome::Denied,
            vec![
                ("reason", reason_name(*reason).to_owned()),
                ("display_name", display_name(filename)),
            ],
        );
    }

    /// A file refused before its content was judged (too large, or a type not allowed
    /// from its header).
    fn record_refused_unread(
        &self,
        caller: &Principal,
        id: Uuid,
        header: &Header,
        size: u64,
        reason: Reason,
    ) {
        let file = StoredFile {
            id,
            tenant_id: header.tenant,
            workspace_id: header.workspace,
            owner_id: caller.id.clone(),
            display_name: display_name(&header.filename),
            content_type: String::new(),
            size_bytes: size,
            sha256: [0; 32],
            scan_status: ScanStatus::Pending,
            scan_signature: String::new(),
            scanner_version: String::new(),
            scan_time: None,
            key_version: 0,
            wrapped_key: String::new(),
            storage_key: String::new(),
            created_at: OffsetDateTime::now_utc(),
        };
        self.record_refusal(caller, &file, &header.filename, &reason);
    }
}

/// The parts of an upload stream, decoded and validated by the gRPC layer.
#[derive(Debug)]
pub enum UploadPart {
    /// A new file.
    Header(Header),
    /// The current file's next bytes.
    Chunk(bytes::Bytes),
}

/// A source of upload parts.
#[async_trait::async_trait]
pub trait UploadParts: Send {
    /// The next part; `None` at the end of the stream.
    async fn next_part(&mut self) -> Result<Option<UploadPart>, ApiError>;
}

/// A clean file's plaintext, authenticated segment by segment as it is read.
pub struct PlainReader {
    object: crate::storage::ObjectReader,
    opener: Option<Opener>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for PlainReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainReader").finish_non_exhaustive()
    }
}

impl PlainReader {
    /// The next plaintext bytes (empty when a read completed no segment); `None` at the
    /// end. DATA_LOSS when the object fails its integrity check.
    pub async fn next(&mut self) -> Option<Result<Vec<u8>, ApiError>> {
        use tokio::io::AsyncReadExt as _;
        let opener = self.opener.as_mut()?;
        let mut out = Vec::new();
        match self.object.read(&mut self.buf).await {
            Ok(0) => {
                let opener = self.opener.take()?;
                Some(
                    opener
                        .finish(&mut out)
                        .map(|()| out)
                        .map_err(|_| integrity_failed()),
                )
            }
            Ok(n) => match opener.update(&self.buf[..n], &mut out) {
                Ok(()) => Some(Ok(out)),
                Err(SealError::Integrity | SealError::KeyLength | SealError::TooLarge) => {
                    self.opener = None;
                    Some(Err(integrity_failed()))
                }
            },
            Err(err) => {
                self.opener = None;
                Some(Err(storage_failure(&StorageError::Io(err))))
            }
        }
    }
}

/// Now, to the microsecond: what PostgreSQL stores, so an upload's answer and later reads
/// agree.
fn now_micros() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1000 * 1000)
        .unwrap_or(now)
}

fn not_clean() -> ApiError {
    ApiError::failed_precondition(
        Reason::FileNotClean,
        "only files scanned clean can be downloaded",
    )
}

/// Now, in Unix seconds.
fn unix_now() -> u64 {
    OffsetDateTime::now_utc()
        .unix_timestamp()
        .max(0)
        .unsigned_abs()
}

fn too_large() -> ApiError {
    ApiError::new(
        tonic::Code::ResourceExhausted,
        Reason::FileTooLarge,
        format!(
            "a file passed the {MAX_FILE_BYTES}-byte limit; nothing from this upload was stored"
        ),
    )
}

fn not_found() -> ApiError {
    ApiError::not_found(Reason::NotFound, "file not found")
}

fn integrity_failed() -> ApiError {
    ApiError::new(
        tonic::Code::DataLoss,
        Reason::FileIntegrityFailed,
        "the stored file failed its integrity check; discard what was received",
    )
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> subtle::Choice {
    use subtle::ConstantTimeEq as _;
    a.ct_eq(b)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
