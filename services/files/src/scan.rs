//! Malware scanning through clamd's `INSTREAM` command, fed while the upload streams.
//!
//! It fails closed: clamd unreachable, too slow, refusing the stream (`INSTREAM size limit
//! exceeded`), stopping at a limit (`Heuristics.Limits.Exceeded…`), or answering anything
//! but `OK` or `… FOUND` makes the file [`Verdict::Unscannable`], never clean.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest clamd answer read.
const MAX_REPLY: usize = 1024;
/// How long the signature version is reused before asking clamd again (readiness asks
/// too, so a stopped clamd shows within this long).
const VERSION_TTL: Duration = Duration::from_secs(5);
/// Largest piece sent to clamd at once.
const MAX_CHUNK: usize = 256 * 1024;

/// Where clamd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClamdAddr {
    /// `tcp://host:port`
    Tcp(String),
    /// `unix:///path/to/clamd.sock`
    Unix(PathBuf),
}

impl ClamdAddr {
    /// Parses `tcp://host:port` or `unix:///path`.
    pub fn parse(value: &str) -> Option<Self> {
        if let Some(addr) = value.strip_prefix("tcp://") {
            (!addr.is_empty() && addr.contains(':')).then(|| Self::Tcp(addr.to_owned()))
        } else {
            value
                .strip_prefix("unix://")
                .filter(|p| p.starts_with('/'))
                .map(|p| Self::Unix(PathBuf::from(p)))
        }
    }
}

impl std::fmt::Display for ClamdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "tcp://{addr}"),
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// What a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing found.
    Clean,
    /// Malware, by signature name.
    Infected(String),
    /// No decision; why, for logs and audit (never shown as a verdict of clean).
    Unscannable(String),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The scanner of a files server: clamd, or none (only `penny dev` and benchmarks).
#[derive(Debug)]
pub struct Scanner {
    clamd: Option<ClamdAddr>,
    timeout: Duration,
    version: Mutex<Option<(Instant, String)>>,
}

impl Scanner {
    /// Scans through clamd at `addr`; each step (connect, a write, the answer) must finish
    /// within `timeout`.
    pub fn clamd(addr: ClamdAddr, timeout: Duration) -> Self {
        Self {
            clamd: Some(addr),
            timeout,
            version: Mutex::new(None),
        }
    }

    /// No scanning: every file is taken as clean. Only for `penny dev` and benchmarks.
    pub fn none() -> Self {
        Self {
            clamd: None,
            timeout: Duration::ZERO,
            version: Mutex::new(None),
        }
    }

    /// Whether files are scanned at all.
    pub fn scans(&self) -> bool {
        self.clamd.is_some()
    }

    async fn connect(&self) -> Result<Box<dyn Io>, String> {
        let Some(addr) = &self.clamd else {
            return Err("no scanner".into());
        };
        let connect = async {
            match addr {
                ClamdAddr::Tcp(addr) => tokio::net::TcpStream::connect(addr)
                    .await
                    .map(|s| Box::new(s) as Box<dyn Io>),
                #[cfg(unix)]
                ClamdAddr::Unix(path) => tokio::net::UnixStream::connect(path)
                    .await
                    .map(|s| Box::new(s) as Box<dyn Io>),
                #[cfg(not(unix))]
                ClamdAddr::Unix(_) => Err(std::io::Error::other("unix sockets")),
            }
        };
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(err)) => Err(format!("clamd unreachable: {}", err.kind())),
            Err(_) => Err("clamd did not accept the connection in time".into()),
        }
    }

    /// The scanner's version and signature version (clamd `VERSION`), or `none`.
    pub async fn version(&self) -> Result<String, String> {
        if self.clamd.is_none() {
            return Ok("none".into());
        }
        if let Ok(cached) = self.version.lock()
            && let Some((at, version)) = cached.as_ref()
            && at.elapsed() < VERSION_TTL
        {
            return Ok(version.clone());
        }
        let mut stream = self.connect().await?;
        let ask = async {
            stream.write_all(b"zVERSION\0").await?;
            read_reply(&mut stream).await
        };
        let version = match tokio::time::timeout(self.timeout, ask).await {
            Ok(Ok(version)) if !version.is_empty() => version,
            Ok(Ok(_)) => return Err("clamd gave no version".into()),
            Ok(Err(err)) => return Err(format!("clamd VERSION failed: {}", err.kind())),
            Err(_) => return Err("clamd VERSION timed out".into()),
        };
        if let Ok(mut cached) = self.version.lock() {
            *cached = Some((Instant::now(), version.clone()));
        }
        Ok(version)
    }

    /// Starts scanning one file. Without a scanner the session finds every file clean.
    pub async fn start(&self) -> ScanSession {
        if self.clamd.is_none() {
            return ScanSession {
                stream: None,
                failure: None,
                timeout: self.timeout,
                enabled: false,
            };
        }
        let mut session = ScanSession {
            stream: None,
            failure: None,
            timeout: self.timeout,
            enabled: true,
        };
        match self.connect().await {
            Ok(mut stream) => {
                match tokio::time::timeout(self.timeout, stream.write_all(b"zINSTREAM\0")).await {
                    Ok(Ok(())) => session.stream = Some(stream),
                    _ => session.failure = Some("clamd did not take the INSTREAM command".into()),
                }
            }
            Err(failure) => session.failure = Some(failure),
        }
        session
    }
}

/// One file's scan in progress.
pub struct ScanSession {
    stream: Option<Box<dyn Io>>,
    failure: Option<String>,
    timeout: Duration,
    enabled: bool,
}

impl std::fmt::Debug for ScanSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScanSession")
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl ScanSession {
    /// Sends the next bytes of the file. A failure is kept for [`Self::finish`]; the
    /// upload goes on (its other checks still run), and the file will not be clean.
    pub async fn update(&mut self, bytes: &[u8]) {
        let Some(stream) = &mut self.stream else {
            return;
        };
        for piece in bytes.chunks(MAX_CHUNK) {
            let len = u32::try_from(piece.len()).unwrap_or(u32::MAX).to_be_bytes();
            let send = async {
                stream.write_all(&len).await?;
                stream.write_all(piece).await
            };
            match tokio::time::timeout(self.timeout, send).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    // clamd closes the stream when it stops reading (its size limit):
                    // its answer says why.
                    let reason = match tokio::time::timeout(self.timeout, read_reply(stream)).await
                    {
                        Ok(Ok(reply)) if !reply.is_empty() => format!("clamd: {reply}"),
                        _ => "clamd closed the stream".into(),
                    };
                    self.fail(reason);
                    return;
                }
                Err(_) => {
                    self.fail("clamd did not take the stream in time".into());
                    return;
                }
            }
        }
    }

    fn fail(&mut self, reason: String) {
        self.stream = None;
        self.failure.get_or_insert(reason);
    }

    /// Ends the stream and reads clamd's verdict.
    pub async fn finish(mut self) -> Verdict {
        if !self.enabled {
            return Verdict::Clean;
        }
        if let Some(failure) = self.failure.take() {
            return Verdict::Unscannable(failure);
        }
        let Some(mut stream) = self.stream.take() else {
            return Verdict::Unscannable("no clamd stream".into());
        };
        let answer = async {
            stream.write_all(&[0, 0, 0, 0]).await?;
            read_reply(&mut stream).await
        };
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(reply)) => parse_verdict(&reply),
            Ok(Err(err)) => Verdict::Unscannable(format!("clamd failed: {}", err.kind())),
            Err(_) => Verdict::Unscannable("clamd did not answer in time".into()),
        }
    }
}

/// Reads a NUL-terminated (or closed) answer.
async fn read_reply(stream: &mut Box<dyn Io>) -> std::io::Result<String> {
    let mut reply = Vec::new();
    let mut byte = [0u8; 256];
    loop {
        let n = stream.read(&mut byte).await?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&byte[..n]);
        if reply.contains(&0) || reply.len() >= MAX_REPLY {
            break;
        }
    }
    let end = reply.iter().position(|&b| b == 0).unwrap_or(reply.len());
    Ok(String::from_utf8_lossy(&reply[..end]).trim().to_owned())
}

/// clamd's answer to a stream: `stream: OK`, `stream: <name> FOUND`, or an error.
fn parse_verdict(reply: &str) -> Verdict {
    let body = reply.strip_prefix("stream:").map(str::trim);
    match body {
        Some("OK") => Verdict::Clean,
        Some(found) if found.ends_with(" FOUND") => {
            let name = found.trim_end_matches(" FOUND").trim();
            if name.starts_with("Heuristics.Limits.Exceeded") {
                Verdict::Unscannable(format!("clamd stopped at a limit: {name}"))
            } else if name.is_empty() {
                Verdict::Unscannable("clamd found something without a name".into())
            } else {
                Verdict::Infected(name.to_owned())
            }
        }
        _ => Verdict::Unscannable(format!(
            "clamd: {}",
            reply.chars().take(200).collect::<String>()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_fail_closed() {
        assert_eq!(parse_verdict("stream: OK"), Verdict::Clean);
        assert_eq!(
            parse_verdict("stream: Penny.Test.EICAR.UNOFFICIAL FOUND"),
            Verdict::Infected("Penny.Test.EICAR.UNOFFICIAL".into())
        );
        for reply in [
            "stream: Heuristics.Limits.Exceeded.MaxFileSize FOUND",
            "INSTREAM size limit exceeded. ERROR",
            "stream: Can't allocate memory ERROR",
            "",
            "stream: FOUND",
            "OK",
        ] {
            assert!(
                matches!(parse_verdict(reply), Verdict::Unscannable(_)),
                "{reply}"
            );
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(
            ClamdAddr::parse("tcp://127.0.0.1:3310"),
            Some(ClamdAddr::Tcp("127.0.0.1:3310".into()))
        );
        assert_eq!(
            ClamdAddr::parse("unix:///run/clamd.sock"),
            Some(ClamdAddr::Unix("/run/clamd.sock".into()))
        );
        for bad in ["127.0.0.1:3310", "tcp://", "unix://relative", "http://x:1"] {
            assert_eq!(ClamdAddr::parse(bad), None, "{bad}");
        }
    }
}
