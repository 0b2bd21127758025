//! Where sealed objects live, behind one trait: a new object is written to an incoming
//! area under a name of its own, and moved to its final key only when the file is clean,
//! complete and recorded. Nothing in the incoming area is ever visible; what a crash leaves
//! there is swept (at start, then periodically).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncRead;

/// A storage failure. Its text may name paths: it is logged, never sent to a caller.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The object does not exist.
    #[error("object not found")]
    NotFound,
    /// A key the server would never generate.
    #[error("invalid object key")]
    InvalidKey,
    /// The storage failed.
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
}

/// Bytes of an object, as read.
pub type ObjectReader = Box<dyn AsyncRead + Send + Unpin>;

/// Object storage for sealed files.
#[async_trait::async_trait]
pub trait ObjectStorage: Send + Sync + std::fmt::Debug {
    /// Starts a new object in the incoming area.
    async fn create(&self) -> Result<Box<dyn IncomingObject>, StorageError>;
    /// Reads the object at `key`.
    async fn read(&self, key: &str) -> Result<ObjectReader, StorageError>;
    /// Deletes the object at `key`; deleting what is not there succeeds.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;
    /// Deletes incoming objects older than `age` (left by a crash or a lost connection);
    /// returns how many.
    async fn sweep_incoming(&self, age: Duration) -> Result<u64, StorageError>;
}

/// An object being written. Dropped before [`IncomingObject::publish`], it is removed.
#[async_trait::async_trait]
pub trait IncomingObject: Send {
    /// Appends `buf`, and hands back an empty buffer for the caller to fill next (taking
    /// it by value lets the write happen without a copy, and while the caller goes on).
    async fn write(&mut self, buf: Vec<u8>) -> Result<Vec<u8>, StorageError>;
    /// Makes the bytes durable; the object is still invisible.
    async fn complete(&mut self) -> Result<(), StorageError>;
    /// Moves the completed object to `key`, where it can be read.
    async fn publish(self: Box<Self>, key: &str) -> Result<(), StorageError>;
}

/// Whether `key` is one the server generates: `/`-separated segments of `[A-Za-z0-9._-]`,
/// none empty, `.` or `..`, and no leading dot (the incoming area).
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 512
        && key.split('/').all(|segment| {
            !segment.is_empty()
                && !segment.starts_with('.')
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

/// Objects as files under a directory (the embedded default).
#[derive(Debug, Clone)]
pub struct FsStorage {
    root: PathBuf,
}

const INCOMING: &str = ".incoming";

impl FsStorage {
    /// Storage under `root` (created if missing, private to this user).
    pub fn open(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join(INCOMING))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StorageError> {
        if !valid_key(key) {
            return Err(StorageError::InvalidKey);
        }
        Ok(self.root.join(key))
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
}

#[async_trait::async_trait]
impl ObjectStorage for FsStorage {
    async fn create(&self) -> Result<Box<dyn IncomingObject>, StorageError> {
        let path = self
            .root
            .join(INCOMING)
            .join(format!("{}.part", uuid::Uuid::new_v4()));
        let file = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                options.open(&path)
            })
            .await
            .map_err(std::io::Error::other)??
        };
        Ok(Box::new(FsIncoming {
            root: self.root.clone(),
            path: Some(path),
            file: Some(file),
            writing: None,
            unsynced: 0,
            syncing: None,
        }))
    }

    async fn read(&self, key: &str) -> Result<ObjectReader, StorageError> {
        let path = self.path_of(key)?;
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(Box::new(tokio::io::BufReader::with_capacity(
                256 * 1024,
                file,
            ))),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(StorageError::NotFound),
            Err(err) => Err(err.into()),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path_of(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    async fn sweep_incoming(&self, age: Duration) -> Result<u64, StorageError> {
        let dir = self.root.join(INCOMING);
        let mut removed = 0;
        let mut entries = tokio::fs::read_dir(&dir).await?;
        while let Some(entry) = entries.next_entry().await? {
            let old = entry
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|at| at.elapsed().ok())
                .is_some_and(|elapsed| elapsed >= age);
            if old && tokio::fs::remove_file(entry.path()).await.is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

struct FsIncoming {
    root: PathBuf,
    /// The incoming file; `None` once published.
    path: Option<PathBuf>,
    /// Written on the blocking pool; `None` while a write is in flight, and once completed.
    file: Option<std::fs::File>,
    /// The write in flight, which hands back the file and its emptied buffer.
    writing: Option<Write>,
    /// Bytes written since the last background sync began.
    unsynced: usize,
    /// A sync of what is written so far, running beside the writes.
    syncing: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Every this many bytes written, a sync of the data so far starts on another thread while
/// the writes go on: the disk writes the object back alongside the upload instead of all
/// at the end, and the `fsync` before publishing has little left to do.
const SYNC_EVERY: usize = 8 << 20;

/// A write on the blocking pool, handing back the file and its emptied buffer.
type Write = tokio::task::JoinHandle<std::io::Result<(std::fs::File, Vec<u8>)>>;

impl FsIncoming {
    /// Waits for the write in flight; its emptied buffer, if there was one.
    async fn settle(&mut self) -> Result<Option<Vec<u8>>, StorageError> {
        let Some(writing) = self.writing.take() else {
            return Ok(None);
        };
        let (file, buf) = writing.await.map_err(std::io::Error::other)??;
        self.file = Some(file);
        Ok(Some(buf))
    }
}

impl Drop for FsIncoming {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[async_trait::async_trait]
impl IncomingObject for FsIncoming {
    async fn write(&mut self, mut buf: Vec<u8>) -> Result<Vec<u8>, StorageError> {
        use std::io::Write as _;
        // One write in flight: the caller fills the next buffer meanwhile.
        let spare = self.settle().await?;
        let mut file = self
            .file
            .take()
            .ok_or_else(|| std::io::Error::other("object already completed"))?;
        let capacity = buf.capacity();
        self.unsynced += buf.len();
        if self.unsynced >= SYNC_EVERY && self.syncing.as_ref().is_none_or(|s| s.is_finished()) {
            if let Some(done) = self.syncing.take() {
                done.await.map_err(std::io::Error::other)??;
            }
            let handle = file.try_clone()?;
            self.unsynced = 0;
            self.syncing = Some(tokio::task::spawn_blocking(move || handle.sync_data()));
        }
        self.writing = Some(tokio::task::spawn_blocking(move || {
            let written = file.write_all(&buf);
            buf.clear();
            written.map(|()| (file, buf))
        }));
        Ok(spare.unwrap_or_else(|| Vec::with_capacity(capacity)))
    }

    async fn complete(&mut self) -> Result<(), StorageError> {
        self.settle().await?;
        if let Some(syncing) = self.syncing.take() {
            syncing.await.map_err(std::io::Error::other)??;
        }
        if let Some(file) = self.file.take() {
            tokio::task::spawn_blocking(move || file.sync_all())
                .await
                .map_err(std::io::Error::other)??;
        }
        Ok(())
    }

    async fn publish(mut self: Box<Self>, key: &str) -> Result<(), StorageError> {
        if !valid_key(key) {
            return Err(StorageError::InvalidKey);
        }
        self.complete().await?;
        let target = self.root.join(key);
        let parent = target
            .parent()
            .ok_or(StorageError::InvalidKey)?
            .to_path_buf();
        tokio::fs::create_dir_all(&parent).await?;
        let from = self
            .path
            .clone()
            .ok_or_else(|| std::io::Error::other("object already published"))?;
        tokio::fs::rename(&from, &target).await?;
        self.path = None;
        tokio::task::spawn_blocking(move || sync_dir(&parent))
            .await
            .map_err(std::io::Error::other)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_generated_keys_are_valid() {
        assert!(valid_key(
            "0190a1b2-0000-7000-8000-000000000000/2026/12/u/abc.png"
        ));
        for bad in [
            "",
            "../etc/passwd",
            "a/../b",
            "a//b",
            "/abs",
            "a/./b",
            ".incoming/x.part",
            "a/b\\c",
            "a/b c",
            "a/b%2e",
        ] {
            assert!(!valid_key(bad), "{bad}");
        }
    }
}

/// Where an S3-compatible bucket is, and the credentials to reach it.
#[derive(Clone)]
pub struct S3Settings {
    /// The bucket (it must exist).
    pub bucket: String,
    /// The endpoint of an S3-compatible service (`http://127.0.0.1:9000`); AWS when
    /// absent.
    pub endpoint: Option<String>,
    /// The region.
    pub region: String,
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// Objects in an S3-compatible bucket, through the `object_store` crate: an incoming
/// object is a multipart upload to `.incoming/<uuid>.part`, published by a server-side
/// copy to its key and the deletion of the incoming one.
#[derive(Debug, Clone)]
pub struct S3Storage {
    store: std::sync::Arc<object_store::aws::AmazonS3>,
}

/// Parts of a multipart upload in flight at once, per object.
const S3_PARTS_IN_FLIGHT: usize = 2;

fn s3_error(err: object_store::Error) -> StorageError {
    match err {
        object_store::Error::NotFound { .. } => StorageError::NotFound,
        other => StorageError::Io(std::io::Error::other(other.to_string())),
    }
}

impl S3Storage {
    /// A client of the bucket (nothing is sent until it is used).
    pub fn connect(settings: &S3Settings) -> Result<Self, StorageError> {
        let mut builder = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region)
            .with_access_key_id(&settings.access_key_id)
            .with_secret_access_key(settings.secret_access_key.as_str());
        if let Some(endpoint) = &settings.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let store = builder.build().map_err(s3_error)?;
        Ok(Self {
            store: std::sync::Arc::new(store),
        })
    }

    fn path_of(key: &str) -> Result<object_store::path::Path, StorageError> {
        if !valid_key(key) {
            return Err(StorageError::InvalidKey);
        }
        object_store::path::Path::parse(key).map_err(|_| StorageError::InvalidKey)
    }
}

#[async_trait::async_trait]
impl ObjectStorage for S3Storage {
    async fn create(&self) -> Result<Box<dyn IncomingObject>, StorageError> {
        use object_store::ObjectStoreExt as _;
        let path =
            object_store::path::Path::from(format!("{INCOMING}/{}.part", uuid::Uuid::new_v4()));
        let upload = self.store.put_multipart(&path).await.map_err(s3_error)?;
        Ok(Box::new(S3Incoming {
            store: self.store.clone(),
            path,
            writer: Some(object_store::WriteMultipart::new(upload)),
            written: false,
            published: false,
        }))
    }

    async fn read(&self, key: &str) -> Result<ObjectReader, StorageError> {
        use futures_util::TryStreamExt as _;
        use object_store::ObjectStoreExt as _;
        let path = Self::path_of(key)?;
        let stream = self
            .store
            .get(&path)
            .await
            .map_err(s3_error)?
            .into_stream()
            .map_err(|e| std::io::Error::other(e.to_string()));
        Ok(Box::new(tokio_util::io::StreamReader::new(stream)))
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        use object_store::ObjectStoreExt as _;
        match self.store.delete(&Self::path_of(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(s3_error(err)),
        }
    }

    async fn sweep_incoming(&self, age: Duration) -> Result<u64, StorageError> {
        use futures_util::TryStreamExt as _;
        use object_store::{ObjectStore as _, ObjectStoreExt as _};
        let cutoff = chrono_cutoff(age);
        let prefix = object_store::path::Path::from(INCOMING);
        let stale: Vec<object_store::path::Path> = self
            .store
            .list(Some(&prefix))
            .try_filter(|meta| std::future::ready(meta.last_modified.timestamp() <= cutoff))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(s3_error)?;
        let mut removed = 0;
        for path in stale {
            if self.store.delete(&path).await.is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Unix seconds `age` ago.
fn chrono_cutoff(age: Duration) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.saturating_sub(age).as_secs()).unwrap_or(i64::MAX)
}

struct S3Incoming {
    store: std::sync::Arc<object_store::aws::AmazonS3>,
    path: object_store::path::Path,
    /// The multipart upload; `None` once completed.
    writer: Option<object_store::WriteMultipart>,
    /// Whether the upload was completed (the incoming object exists).
    written: bool,
    published: bool,
}

impl Drop for S3Incoming {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        // Abandoned: abort the upload, or delete the incoming object (the sweep
        // removes what this misses).
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let writer = self.writer.take();
        let (store, path, written) = (self.store.clone(), self.path.clone(), self.written);
        runtime.spawn(async move {
            use object_store::ObjectStoreExt as _;
            if let Some(writer) = writer {
                let _ = writer.abort().await;
            }
            if written {
                let _ = store.delete(&path).await;
            }
        });
    }
}

#[async_trait::async_trait]
impl IncomingObject for S3Incoming {
    async fn write(&mut self, buf: Vec<u8>) -> Result<Vec<u8>, StorageError> {
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| std::io::Error::other("object already completed"))?;
        let capacity = buf.capacity();
        writer
            .wait_for_capacity(S3_PARTS_IN_FLIGHT)
            .await
            .map_err(s3_error)?;
        writer.put(bytes::Bytes::from(buf));
        Ok(Vec::with_capacity(capacity))
    }

    async fn complete(&mut self) -> Result<(), StorageError> {
        if let Some(writer) = self.writer.take() {
            writer.finish().await.map_err(s3_error)?;
            self.written = true;
        }
        Ok(())
    }

    async fn publish(mut self: Box<Self>, key: &str) -> Result<(), StorageError> {
        use object_store::ObjectStoreExt as _;
        let target = S3Storage::path_of(key)?;
        self.complete().await?;
        self.store
            .rename(&self.path, &target)
            .await
            .map_err(s3_error)?;
        self.published = true;
        Ok(())
    }
}
