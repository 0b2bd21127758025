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
        // moto routes by the Host header: its own address means S3.
        let (status, _, _) =
            crate::http_request_to_host(addr, "PUT", &format!("/{}", s3.bucket), &addr.to_string())
                .await;
        assert_eq!(status, 200, "create bucket");
        s3
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

impl Drop for TestS3 {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
