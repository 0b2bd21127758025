//! The audit client every server uses: events go to the audit service in batches, and
//! when it cannot take them they wait in a spool on local disk and are replayed in order
//! later — never dropped, never duplicated (audit is idempotent on event id).
//!
//! Two ways in:
//! - [`AuditClient::record`]: queued, batched (up to [`BATCH`] events or [`LINGER`]), for
//!   the stack's record of every mutating or refused call. It never blocks a call: a full
//!   queue goes to the spool.
//! - [`AuditClient::record_critical`]: appended at once and awaited, for security-critical
//!   actions (sign-in outcomes, MFA changes, role grants, key rotation and deletion,
//!   erasure). When the event cannot be made durable in audit the caller gets UNAVAILABLE
//!   (`AUDIT_UNAVAILABLE`) and must not report success.
//!
//! One task owns the spool and the queue, so batches reach audit in the order they were
//! recorded: while the spool holds anything, new batches are written behind it. A spooled
//! batch is one file (`<counter>.batch`, the encoded `AppendRequest`), written to a
//! temporary name, synced and renamed, and deleted only after audit stored it; a crash in
//! between replays it, and audit answers the replayed events as duplicates.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use penny_proto::audit::v1 as pb;
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::credential::ServiceCredential;
use crate::error::{ApiError, Reason};

/// Most events per Append.
pub const BATCH: usize = 500;
/// How long a partial batch waits for more events.
pub const LINGER: Duration = Duration::from_millis(50);
/// Events queued in memory before new ones go straight to the spool.
const QUEUE: usize = 20_000;
/// How long one Append may take.
const APPEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait before trying audit again after it failed.
const RETRY: Duration = Duration::from_millis(500);

/// Sends events to the audit service. Cheap to clone.
#[derive(Clone)]
pub struct AuditClient {
    inner: Arc<Inner>,
}

struct Inner {
    client: tonic::client::Grpc<Channel>,
    credential: ServiceCredential,
    /// Encoded `AuditEvent`s.
    queue: mpsc::Sender<Vec<u8>>,
    spool: Arc<Spool>,
    /// Asks the task to put what is queued on disk (a count of requests).
    flush: tokio::sync::watch::Sender<u64>,
    /// The last request the task has done.
    flushed: tokio::sync::watch::Receiver<u64>,
}

/// How long [`AuditClient::flush_to_spool`] waits for the queue to reach the spool.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

impl std::fmt::Debug for AuditClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditClient")
            .field("spool", &self.inner.spool.dir)
            .finish_non_exhaustive()
    }
}

/// Why an Append did not store a batch.
enum SendError {
    /// Audit could not be reached or could not store it: try again later.
    Unavailable,
    /// Audit refused the request as a whole (never retried unchanged).
    Refused(tonic::Code),
}

impl AuditClient {
    /// A client of the audit service at `channel`, calling it with `credential`, spooling
    /// to `spool_dir` (created if missing; one directory per process). Starts the task
    /// that sends batches and replays the spool; [`Self::flush_to_spool`] puts what is
    /// queued on disk (the standard server calls it when it stops).
    pub fn new(
        channel: Channel,
        credential: ServiceCredential,
        spool_dir: PathBuf,
    ) -> std::io::Result<Self> {
        let spool = Arc::new(Spool::open(spool_dir)?);
        let (queue, events) = mpsc::channel(QUEUE);
        let client = tonic::client::Grpc::new(channel);
        let (flush, flush_rx) = tokio::sync::watch::channel(0);
        let (flushed_tx, flushed) = tokio::sync::watch::channel(0);
        tokio::spawn(run(
            client.clone(),
            credential.clone(),
            spool.clone(),
            events,
            (flush_rx, flushed_tx),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                credential,
                queue,
                spool,
                flush,
                flushed,
            }),
        })
    }

    /// At shutdown: puts every event queued so far in the spool, without waiting for
    /// audit, so a process that ends next loses none; they are sent by this client while
    /// it still runs, or by the next process with this spool directory.
    pub async fn flush_to_spool(&self) {
        let mut asked = 0;
        self.inner.flush.send_modify(|n| {
            *n += 1;
            asked = *n;
        });
        let mut flushed = self.inner.flushed.clone();
        let _ = tokio::time::timeout(SHUTDOWN_WAIT, flushed.wait_for(|done| *done >= asked)).await;
    }

    /// Queues `event` (batched; spooled while audit is unreachable). Never blocks.
    pub fn record(&self, event: pb::AuditEvent) {
        self.record_encoded(event.encode_to_vec());
    }

    /// [`Self::record`] for an event already encoded (the audit layer's hot path).
    pub(crate) fn record_encoded(&self, event: Vec<u8>) {
        match self.inner.queue.try_send(event) {
            Ok(()) => {}
            Err(
                mpsc::error::TrySendError::Full(event) | mpsc::error::TrySendError::Closed(event),
            ) => {
                // Behind the queue in time, and written now: order within what is spooled
                // is kept, and nothing is lost.
                if let Err(err) = self.inner.spool.push(&Batch::encode(vec![event])) {
                    tracing::error!(error = %err, "audit spool is not writable; an event is lost");
                }
            }
        }
    }

    /// Appends `event` now and waits until audit has stored it; UNAVAILABLE
    /// (`AUDIT_UNAVAILABLE`) when it cannot, and the caller must then fail too.
    pub async fn record_critical(&self, event: pb::AuditEvent) -> Result<(), ApiError> {
        let batch = Batch::encode(vec![event.encode_to_vec()]);
        match send(&self.inner.client, &self.inner.credential, &batch).await {
            Ok(()) => Ok(()),
            Err(SendError::Unavailable | SendError::Refused(_)) => Err(ApiError::unavailable(
                Reason::AuditUnavailable,
                "this action cannot be audited right now, so it was not done; retry later",
                Duration::from_secs(1),
            )),
        }
    }

    /// Batches waiting in the spool (for tests and metrics).
    pub fn spooled(&self) -> usize {
        self.inner.spool.len()
    }
}

/// A batch of events encoded once as an `AppendRequest`: sent (and, when audit cannot
/// take it, spooled and sent again) from the same bytes, without copying the events.
#[derive(Clone, Debug, Default)]
struct Batch {
    bytes: Bytes,
    events: usize,
}

impl Batch {
    /// The `AppendRequest` of these encoded `AuditEvent`s (field 1, repeated).
    fn encode(events: Vec<Vec<u8>>) -> Self {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
        let len: usize = events
            .iter()
            .map(|e| 1 + encoded_len_varint(e.len() as u64) + e.len())
            .sum();
        let mut bytes = Vec::with_capacity(len);
        for event in &events {
            encode_key(1, WireType::LengthDelimited, &mut bytes);
            encode_varint(event.len() as u64, &mut bytes);
            bytes.extend_from_slice(event);
        }
        Self {
            bytes: bytes.into(),
            events: events.len(),
        }
    }

    /// A spooled batch read back; `None` when the bytes are not an `AppendRequest`.
    fn decode(bytes: Vec<u8>) -> Option<Self> {
        let events = pb::AppendRequest::decode(bytes.as_slice())
            .ok()?
            .events
            .len();
        Some(Self {
            bytes: bytes.into(),
            events,
        })
    }
}

/// Written as the `AppendRequest` it holds; never decoded (replies are [`AppendErrors`]).
impl prost::Message for Batch {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.bytes);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// The part of an `AppendResponse` the client acts on: which events audit refused. The
/// ids and sequence numbers of the stored ones are skipped while decoding.
#[derive(Clone, PartialEq, prost::Message)]
struct AppendErrors {
    #[prost(message, repeated, tag = "1")]
    results: Vec<ResultError>,
}

/// `AppendResult` without its id, sequence and duplicate flag.
#[derive(Clone, PartialEq, prost::Message)]
struct ResultError {
    #[prost(message, optional, tag = "3")]
    error: Option<penny_proto::common::v1::BatchItemError>,
}

const APPEND_PATH: &str = "/penny.audit.v1.AuditService/Append";

/// Appends one batch; `Ok` once audit stored every event (or knew it already).
async fn send(
    client: &tonic::client::Grpc<Channel>,
    credential: &ServiceCredential,
    batch: &Batch,
) -> Result<(), SendError> {
    let mut call = credential
        .request(batch.clone())
        .await
        .map_err(|_| SendError::Unavailable)?;
    call.set_timeout(APPEND_TIMEOUT);
    call.extensions_mut().insert(tonic::GrpcMethod::new(
        "penny.audit.v1.AuditService",
        "Append",
    ));
    let mut client = client.clone();
    client.ready().await.map_err(|_| SendError::Unavailable)?;
    let codec = tonic_prost::ProstCodec::<Batch, AppendErrors>::default();
    let path = http::uri::PathAndQuery::from_static(APPEND_PATH);
    let reply = match client.unary(call, path, codec).await {
        Ok(reply) => reply.into_inner(),
        Err(status) if crate::error::is_transient(&status) => return Err(SendError::Unavailable),
        // A malformed request as a whole cannot be fixed by sending it again.
        Err(status) if status.code() == tonic::Code::InvalidArgument => {
            return Err(SendError::Refused(status.code()));
        }
        // Refused for who we are (a credential not yet renewed, a grant missing) or for a
        // fault on audit's side: kept, and tried again, until someone fixes it.
        Err(status) => {
            tracing::warn!(code = ?status.code(), "audit refused a batch; keeping it to retry");
            return Err(SendError::Unavailable);
        }
    };
    // An event audit refused on its own (invalid, or its id reused with other content)
    // cannot be fixed by sending it again: it is reported, and the rest are stored.
    for (position, result) in reply.results.iter().enumerate() {
        if let Some(error) = &result.error {
            tracing::error!(
                position,
                events = batch.events,
                field = %error.field,
                reason = error.reason,
                "audit refused an event of a batch"
            );
        }
    }
    Ok(())
}

/// The task behind a client: batches the queue, sends, spools, replays.
async fn run(
    client: tonic::client::Grpc<Channel>,
    credential: ServiceCredential,
    spool: Arc<Spool>,
    mut events: mpsc::Receiver<Vec<u8>>,
    (mut flush, flushed): (
        tokio::sync::watch::Receiver<u64>,
        tokio::sync::watch::Sender<u64>,
    ),
) {
    let mut open = true;
    let mut retry_at: Option<tokio::time::Instant> = None;
    // Whether audit was unreachable last time: said once per outage, not per retry.
    let mut outage = false;
    while open || !spool.is_empty() {
        let asked = *flush.borrow_and_update();
        if asked > *flushed.borrow() {
            spool_queue(&spool, &mut events);
            let _ = flushed.send(asked);
        }
        if outage && retry_at.is_none() && spool.is_empty() {
            tracing::info!("audit answers again; the spooled events have been sent");
            outage = false;
        }
        if retry_at.is_some() && !outage {
            tracing::warn!(
                spooled = spool.len(),
                "audit is unreachable; events are kept in the spool and sent when it answers"
            );
            outage = true;
        }
        // Replay first: the oldest spooled batch goes before anything newer.
        let audit_may_answer = retry_at.is_none_or(|at| tokio::time::Instant::now() >= at);
        if audit_may_answer && let Some((path, batch)) = spool.oldest() {
            match send(&client, &credential, &batch).await {
                Ok(()) => {
                    spool.remove(&path);
                    retry_at = None;
                    continue;
                }
                Err(SendError::Refused(code)) => {
                    tracing::error!(
                        ?code,
                        events = batch.events,
                        "audit refused a spooled batch as malformed; removed"
                    );
                    spool.remove(&path);
                    retry_at = None;
                    continue;
                }
                Err(SendError::Unavailable) => {
                    retry_at = Some(tokio::time::Instant::now() + RETRY);
                }
            }
        }
        if !open {
            // The client is gone and audit does not answer: the spool keeps the rest.
            break;
        }
        // Collect a batch: the first event (or a wake-up to retry), then what else comes
        // within the linger time. Events that arrive while the task lingers do not wake
        // it: they are taken from the queue together afterwards.
        let wait = retry_at.map_or(Duration::from_secs(3600), |at| {
            at.saturating_duration_since(tokio::time::Instant::now())
        });
        let first = tokio::select! {
            event = events.recv() => event,
            () = tokio::time::sleep(wait) => continue,
            _ = flush.changed() => continue,
        };
        let Some(first) = first else {
            open = false;
            continue;
        };
        let mut events_batch = vec![first];
        open = take_queued(&mut events, &mut events_batch);
        if open && events_batch.len() < BATCH {
            tokio::select! {
                () = tokio::time::sleep(LINGER) => {}
                _ = flush.changed() => {}
            }
            open = take_queued(&mut events, &mut events_batch);
        }
        let batch = Batch::encode(events_batch);
        let direct = spool.is_empty() && retry_at.is_none();
        if direct {
            match send(&client, &credential, &batch).await {
                Ok(()) => continue,
                Err(SendError::Refused(code)) => {
                    tracing::error!(
                        ?code,
                        events = batch.events,
                        "audit refused a batch as malformed; dropped"
                    );
                    continue;
                }
                Err(SendError::Unavailable) => {
                    retry_at = Some(tokio::time::Instant::now() + RETRY);
                }
            }
        }
        if let Err(err) = spool.push(&batch) {
            tracing::error!(error = %err, events = batch.events, "audit spool is not writable; events are lost");
        }
    }
}

/// Moves what is queued into `batch`, up to [`BATCH`] events; `false` once every sender
/// is gone and the queue is empty.
fn take_queued(events: &mut mpsc::Receiver<Vec<u8>>, batch: &mut Vec<Vec<u8>>) -> bool {
    while batch.len() < BATCH {
        match events.try_recv() {
            Ok(event) => batch.push(event),
            Err(mpsc::error::TryRecvError::Empty) => return true,
            Err(mpsc::error::TryRecvError::Disconnected) => return false,
        }
    }
    true
}

/// Writes everything queued so far to the spool, in batches, in order (shutdown).
fn spool_queue(spool: &Spool, events: &mut mpsc::Receiver<Vec<u8>>) {
    let mut batch = Vec::new();
    while let Ok(event) = events.try_recv() {
        batch.push(event);
        if batch.len() == BATCH {
            push_or_report(spool, std::mem::take(&mut batch));
        }
    }
    if !batch.is_empty() {
        push_or_report(spool, batch);
    }
}

fn push_or_report(spool: &Spool, events: Vec<Vec<u8>>) {
    let count = events.len();
    if let Err(err) = spool.push(&Batch::encode(events)) {
        tracing::error!(error = %err, events = count, "audit spool is not writable; events are lost");
    }
}

/// Batches on disk, oldest first.
struct Spool {
    dir: PathBuf,
    state: std::sync::Mutex<SpoolState>,
}

struct SpoolState {
    /// The next file number.
    next: u64,
    /// Spooled files, oldest first.
    files: std::collections::VecDeque<(u64, PathBuf)>,
}

const SPOOL_SUFFIX: &str = "batch";

impl Spool {
    /// Opens `dir`, picking up what an earlier process left (in order) and removing
    /// half-written files.
    fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let number = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok());
            match (path.extension().and_then(|e| e.to_str()), number) {
                (Some(SPOOL_SUFFIX), Some(number)) => files.push((number, path)),
                // A batch whose writing did not finish was never acknowledged to anyone.
                (Some("tmp"), _) => {
                    let _ = std::fs::remove_file(&path);
                }
                _ => {}
            }
        }
        files.sort();
        let next = files.last().map_or(0, |(n, _)| n + 1);
        if !files.is_empty() {
            tracing::info!(batches = files.len(), dir = %dir.display(), "audit spool holds batches from before; replaying them");
        }
        Ok(Self {
            dir,
            state: std::sync::Mutex::new(SpoolState {
                next,
                files: files.into(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpoolState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn len(&self) -> usize {
        self.lock().files.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes a batch behind the others, durably.
    fn push(&self, batch: &Batch) -> std::io::Result<()> {
        let mut state = self.lock();
        let number = state.next;
        state.next += 1;
        let path = self.dir.join(format!("{number:020}.{SPOOL_SUFFIX}"));
        let tmp = self.dir.join(format!("{number:020}.tmp"));
        write_synced(&tmp, &batch.bytes)?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(&self.dir);
        state.files.push_back((number, path));
        Ok(())
    }

    /// The oldest batch, read back. A file that cannot be read is set aside (renamed
    /// `.bad`) and reported, not replayed forever.
    fn oldest(&self) -> Option<(PathBuf, Batch)> {
        loop {
            let path = self.lock().files.front().map(|(_, p)| p.clone())?;
            match std::fs::read(&path).ok().and_then(Batch::decode) {
                Some(batch) => return Some((path, batch)),
                None => {
                    tracing::error!(file = %path.display(), "audit spool file is unreadable; set aside");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                    self.lock().files.pop_front();
                }
            }
        }
    }

    /// Forgets the oldest batch once audit stored it.
    fn remove(&self, path: &Path) {
        let mut state = self.lock();
        if state.files.front().is_some_and(|(_, p)| p == path) {
            state.files.pop_front();
        }
        drop(state);
        let _ = std::fs::remove_file(path);
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) {
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> pb::AuditEvent {
        pb::AuditEvent {
            id: format!("event-{n}"),
            action: "keys.rotate_key".into(),
            user_agent: "x".repeat(n * 40),
            ..Default::default()
        }
    }

    /// A batch is the `AppendRequest` of its events, however long each one is.
    #[test]
    fn a_batch_is_the_append_request_of_its_events() {
        let events: Vec<pb::AuditEvent> = (0..10).map(event).collect();
        let batch = Batch::encode(events.iter().map(prost::Message::encode_to_vec).collect());
        assert_eq!(batch.events, 10);
        let decoded = pb::AppendRequest::decode(batch.bytes.as_ref()).unwrap();
        assert_eq!(decoded.events, events);
        assert_eq!(
            batch.bytes.as_ref(),
            pb::AppendRequest { events }.encode_to_vec()
        );
        let read_back = Batch::decode(batch.bytes.to_vec()).unwrap();
        assert_eq!(read_back.events, 10);
        assert!(Batch::decode(vec![0xff, 0xff]).is_none());
    }
}
