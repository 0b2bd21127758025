//! A real clamd for tests (Debian's `clamav-daemon`), on its own port, with a signature
//! database of one line that detects the EICAR test file: signature downloads are
//! impossible here, and the real database would take minutes to load.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

/// The EICAR anti-malware test file (68 bytes); every scanner reports it.
pub const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// The signature name clamd reports for [`EICAR`] with the test database.
pub const EICAR_SIGNATURE: &str = "Penny.Test.EICAR.UNOFFICIAL";

/// A running clamd; stopped when dropped.
#[derive(Debug)]
pub struct TestClamd {
    child: Option<Child>,
    /// Where it listens (`127.0.0.1:port`).
    pub addr: String,
    _dir: TempDir,
}

fn clamd_binary() -> PathBuf {
    for candidate in ["/usr/sbin/clamd", "/usr/bin/clamd", "/usr/local/sbin/clamd"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "clamd is not installed: the files tests scan with a real clamd (apt-get install clamav-daemon; .ci/run installs it)"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Asks clamd at `addr` for its version (blocking).
pub fn clamd_version(addr: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"zVERSION\0").ok()?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).ok()?;
    let end = reply.iter().position(|&b| b == 0).unwrap_or(reply.len());
    Some(String::from_utf8_lossy(&reply[..end]).into_owned())
}

impl TestClamd {
    /// Starts clamd and waits until it answers.
    pub fn start() -> Self {
        let dir = TempDir::new("penny-clamd");
        let db = dir.path().join("db");
        std::fs::create_dir_all(&db).expect("clamd db dir");
        let hex: String = EICAR.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(
            db.join("penny.ndb"),
            format!("Penny.Test.EICAR:0:*:{hex}\n"),
        )
        .expect("signature file");
        let port = free_port();
        let config = dir.path().join("clamd.conf");
        std::fs::write(
            &config,
            format!(
                "DatabaseDirectory {}\nTCPSocket {port}\nTCPAddr 127.0.0.1\nForeground yes\n\
                 StreamMaxLength 60M\nMaxFileSize 60M\nMaxScanSize 60M\nAlertExceedsMax yes\n\
                 User root\nLogFile {}\n",
                db.display(),
                dir.path().join("clamd.log").display()
            ),
        )
        .expect("clamd config");
        let child = Command::new(clamd_binary())
            .arg(format!("--config-file={}", config.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start clamd");
        let addr = format!("127.0.0.1:{port}");
        let clamd = Self {
            child: Some(child),
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while clamd_version(&clamd.addr).is_none() {
            assert!(Instant::now() < deadline, "clamd did not start within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        clamd
    }

    /// `tcp://127.0.0.1:port`, for the files service.
    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    /// Stops clamd (kills it and waits).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestClamd {
    fn drop(&mut self) {
        self.stop();
    }
}
