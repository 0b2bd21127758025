//! Plain HTTP/1.1 beside gRPC, for clients that cannot speak gRPC: auth's JWKS at
//! `/.well-known/jwks.json`, and files' signed downloads.
//!
//! One accept loop for every such listener: a slow client cannot hold a connection by
//! dribbling its headers (they must arrive within [`HEADER_READ_TIMEOUT`]) or by not
//! reading its response (a write that makes no progress for [`WRITE_STALL_TIMEOUT`] ends
//! the connection), at most
//! [`MAX_CONNECTIONS`] are open at once (the rest are closed at accept), shutdown finishes
//! the request in hand and closes, and every response carries [`SECURITY_HEADERS`] and,
//! unless the handler chose otherwise, `Cache-Control: no-store`. Handlers find the
//! client's address in the request's extensions, as a [`PeerAddr`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use http::header::{self, HeaderName, HeaderValue};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// A request's headers must arrive within this long.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A response write that makes no progress for this long ends the connection.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections open at once per listener; more are closed as they are accepted.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long shutdown waits for connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The client's address, in the extensions of every request [`serve_http`] hands on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// The headers every response carries (the guide's list).
pub const SECURITY_HEADERS: [(&str, &str); 6] = [
    (
        "strict-transport-security",
        "max-age=31536000; includeSubDomains",
    ),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    (
        "content-security-policy",
        "default-src 'none'; frame-ancestors 'none'",
    ),
    ("referrer-policy", "no-referrer"),
    (
        "permissions-policy",
        "camera=(), microphone=(), geolocation=(), payment=()",
    ),
];

async fn add_security_headers(mut response: axum::response::Response) -> axum::response::Response {
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets requests in hand
/// finish (for at most a few seconds).
pub async fn serve_http(
    name: &'static str,
    router: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let router = router.layer(axum::middleware::map_response(add_security_headers));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let local_addr = listener.local_addr().context("HTTP listener address")?;
    tracing::info!(service = name, addr = ?local_addr, "serving HTTP");
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, say: back off instead of spinning.
                tracing::warn!(service = name, error = %err, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                service = name,
                "HTTP connection limit reached; closing a new one"
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            router.clone(),
            move |mut request: http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(PeerAddr(peer));
                request
            },
        ));
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(
                    TokioIo::new(StallGuard::new(stream, WRITE_STALL_TIMEOUT)),
                    service,
                );
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = async { let _ = stop.wait_for(|stopped| *stopped).await; } => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(error = %err, "HTTP connection ended with an error");
            }
        });
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            service = name,
            "HTTP drain deadline passed; closing connections"
        );
        connections.abort_all();
    }
    tracing::info!(service = name, "HTTP stopped");
    Ok(())
}

/// A stream whose writes fail with `TimedOut` once one has made no progress for the
/// stall timeout: a client that stops reading cannot hold its connection (and the
/// response it was sent) for ever.
struct StallGuard<S> {
    stream: S,
    timeout: Duration,
    /// Armed while a write is waiting on the peer.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> StallGuard<S> {
    fn new(stream: S, timeout: Duration) -> Self {
        Self {
            stream,
            timeout,
            stalled: None,
        }
    }

    /// What a write answered: progress disarms the timer, waiting arms it, and waiting
    /// past it is an error.
    fn check<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StallGuard<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StallGuard<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.stream).poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.check(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.stream).poll_flush(cx);
        self.check(cx, poll)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.stream).poll_shutdown(cx);
        self.check(cx, poll)
    }
}

/// Serves `bundle` over gRPC on `listener` and, when given one, `router` over HTTP on its
/// listener, until `shutdown` resolves; both stop together, and an error of either ends
/// both.
pub async fn serve_with_http(
    serve_config: crate::ServeConfig,
    bundle: crate::ServiceBundle,
    listener: TcpListener,
    http: Option<(Router, TcpListener)>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let name = bundle.name;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut stop_rx = stop_rx.clone();
        async move {
            let _ = stop_rx.wait_for(|stopped| *stopped).await;
        }
    };
    let grpc = crate::serve(serve_config, bundle, listener, stopped());
    match http {
        Some((router, http_listener)) => {
            let http = serve_http(name, router, http_listener, stopped());
            tokio::try_join!(grpc, http).map(|_| ())
        }
        None => grpc.await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::StallGuard;

    #[tokio::test]
    async fn a_peer_that_stops_reading_ends_the_write() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let mut guarded = StallGuard::new(ours, Duration::from_millis(100));
        let err = guarded.write_all(&[7; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_gets_everything() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        // Each read comes well within the stall timeout, though the whole write takes
        // longer than it.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0; 64];
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                match theirs.read(&mut buf).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let mut guarded = StallGuard::new(ours, Duration::from_millis(200));
        guarded.write_all(&[7; 4096]).await.unwrap();
        guarded.shutdown().await.unwrap();
        drop(guarded);
        assert_eq!(reader.await.unwrap(), vec![7; 4096]);
    }
}
