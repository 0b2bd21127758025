//! An S3-compatible server for tests: moto's (`pip install 'moto[server]'`), a Python
//! implementation of the S3 API, on its own port with one bucket. It is not AWS and not
//! MinIO: it shows that the files service speaks S3 through `object_store`, not how a
//! given provider behaves at scale.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running moto S3 server; stopped when dropped.
#[derive(Debug)]
pub struct TestS3 {
    child: Option<Child>,
    /// Where it listens (`127.0.0.1:port`).
    pub addr: std::net::SocketAddr,
    /// The bucket made for the test.
    pub bucket: String,
}

impl TestS3 {
    /// Starts moto's server and makes a bucket.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("moto_server did not start ({e}): the S3 tests need `pip install 'moto[server]'` (.ci/run installs it)")
            });
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let s3 = Self {
            child: Some(child),
            addr,
            bucket: format!("penny-test-{}", uuid::Uuid::new_v4().simple()),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (status, _) = s3.raw("PUT", &format!("/{}", s3.bucket), b"").await;
        assert_eq!(status, 200, "create bucket");
        s3
    }

    /// One request to the server, with its own address as `Host` (moto routes by it):
    /// (status, body).
    async fn raw(&self, method: &str, target: &str, body: &[u8]) -> (u16, Vec<u8>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        stream.write_all(body).await.expect("write");
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply).await;
        let split = reply
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head");
        let status = String::from_utf8_lossy(&reply[..split])
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        let mut body = reply[split + 4..].to_vec();
        // moto answers listings chunked: keep only what lies between the chunk sizes.
        let head = String::from_utf8_lossy(&reply[..split]).to_ascii_lowercase();
        if head.contains("transfer-encoding: chunked") {
            body = dechunk(&body);
        }
        (status, body)
    }

    /// `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The settings the files service uses for it.
    pub fn settings(&self) -> penny_files::storage::S3Settings {
        penny_files::storage::S3Settings {
            bucket: self.bucket.clone(),
            endpoint: Some(self.endpoint()),
            region: "us-east-1".into(),
            access_key_id: "penny-test".into(),
            secret_access_key: zeroize::Zeroizing::new("penny-test-secret".into()),
        }
    }

    /// A signed client of the bucket (moto refuses anonymous reads).
    fn client(&self) -> object_store::aws::AmazonS3 {
        let settings = self.settings();
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(settings.bucket)
            .with_region(settings.region)
            .with_access_key_id(settings.access_key_id)
            .with_secret_access_key(settings.secret_access_key.as_str())
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .build()
            .expect("S3 client")
    }

    /// The keys of every object in the bucket.
    pub async fn keys(&self) -> Vec<String> {
        use futures_util::TryStreamExt as _;
        use object_store::ObjectStore as _;
        let mut keys: Vec<String> = self
            .client()
            .list(None)
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .expect("list");
        keys.sort();
        keys
    }

    /// An object's bytes, as stored.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        use object_store::ObjectStoreExt as _;
        let object = self.client().get(&key.into()).await.ok()?;
        Some(object.bytes().await.ok()?.to_vec())
    }

    /// Replaces an object's bytes (as someone with access to the bucket could).
    pub async fn put(&self, key: &str, bytes: &[u8]) {
        use object_store::ObjectStoreExt as _;
        self.client()
            .put(&key.into(), bytes.to_vec().into())
            .await
            .expect("put");
    }
}

/// The body of a chunked HTTP/1.1 response.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&raw[..line_end]).trim(), 16)
            .unwrap_or(0);
        raw = &raw[line_end + 2..];
        if size == 0 || raw.len() < size {
            break;
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or_default();
    }
    out
}

impl Drop for TestS3 {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
