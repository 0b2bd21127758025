//! Where sealed objects live, behind one trait: a new object is written to an incoming
//! area under a name of its own, and moved to its final key only when the file is clean,
//! complete and recorded. Nothing in the incoming area is ever visible; what a crash leaves
//! there is swept at start.

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
}

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
        self.writing = Some(tokio::task::spawn_blocking(move || {
            let written = file.write_all(&buf);
            buf.clear();
            written.map(|()| (file, buf))
        }));
        Ok(spare.unwrap_or_else(|| Vec::with_capacity(capacity)))
    }

    async fn complete(&mut self) -> Result<(), StorageError> {
        self.settle().await?;
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
