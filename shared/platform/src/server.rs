//! The standard server: one place where the stack is assembled and served.
//!
//! A service hands over a [`ServiceBundle`] (its routes, its access table, its descriptor
//! set and a readiness probe); [`serve`] adds health and reflection, wraps everything in the
//! standard layers, and serves until the shutdown future resolves, then drains in-flight
//! calls before returning.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::access::{AccessPolicy, Requirement};
use crate::principal::TokenVerifier;
use crate::stack::{AuthLayer, DrainLayer, LoadShedLayer, TraceLayer};

/// The gRPC name of the health service.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
/// The gRPC names of the reflection services (grpcurl 1.8 asks for `v1alpha`).
pub const REFLECTION_SERVICES: [&str; 2] = [
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// A readiness probe: resolves to whether the service's dependencies are usable.
pub type ReadinessProbe = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// A probe that is always ready (services without dependencies).
pub fn always_ready() -> ReadinessProbe {
    Arc::new(|| Box::pin(async { true }))
}

/// TLS files, already read.
#[derive(Clone)]
pub struct TlsMaterial {
    /// PEM certificate chain.
    pub cert_pem: Vec<u8>,
    /// PEM private key.
    pub key_pem: Vec<u8>,
    /// PEM CA bundle for client certificates (mTLS), if required.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("mtls", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// What [`serve`] needs besides the service itself.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// TLS (and mTLS) material; plaintext when absent.
    pub tls: Option<TlsMaterial>,
    /// Per-request deadline.
    pub request_timeout: Duration,
    /// Calls in flight before shedding.
    pub concurrency_limit: usize,
    /// Largest message a service decodes.
    pub max_message_bytes: usize,
    /// Whether to serve reflection.
    pub reflection: bool,
    /// Verifies bearer tokens.
    pub verifier: TokenVerifier,
    /// How often the readiness probe runs.
    pub readiness_interval: Duration,
    /// Decides permission requirements; without it they are all refused.
    pub authorizer: Option<crate::authorizer::Authorizer>,
    /// The auth service. With it (and an authorizer, whose service token is used), the
    /// server's verifier follows auth's revocation stream.
    pub auth: Option<tonic::transport::Channel>,
    /// Where the server's calls are recorded. Without it nothing is audited (and the
    /// audit service itself never records its own calls through it).
    pub audit: Option<crate::audit::AuditClient>,
}

impl ServeConfig {
    /// Defaults for tests and `penny dev`: plaintext, reflection on, generous limits.
    pub fn new_for_dev(verifier: TokenVerifier) -> Self {
        Self {
            tls: None,
            request_timeout: Duration::from_secs(30),
            concurrency_limit: 1024,
            max_message_bytes: crate::config::DEFAULT_MAX_MESSAGE_BYTES,
            reflection: true,
            verifier,
            readiness_interval: Duration::from_secs(1),
            authorizer: None,
            auth: None,
            audit: None,
        }
    }
}

/// One service, ready to be served by the standard stack.
pub struct ServiceBundle {
    /// Short name for logs (`keys`).
    pub name: &'static str,
    /// The tonic routes of the service's gRPC services.
    pub routes: Routes,
    /// Fully qualified gRPC service names, for health and reflection.
    pub grpc_services: Vec<&'static str>,
    /// Who may call which RPC.
    pub policy: AccessPolicy,
    /// Encoded `FileDescriptorSet`s describing the services, for reflection.
    pub descriptors: Vec<&'static [u8]>,
    /// Whether dependencies are usable; health is NOT_SERVING until it says yes.
    pub readiness: ReadinessProbe,
}

impl std::fmt::Debug for ServiceBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBundle")
            .field("name", &self.name)
            .field("grpc_services", &self.grpc_services)
            .finish_non_exhaustive()
    }
}

/// Serves `bundle` on `listener` until `shutdown` resolves, then drains in-flight calls.
pub async fn serve(
    config: ServeConfig,
    bundle: ServiceBundle,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let ServiceBundle {
        name,
        mut routes,
        grpc_services,
        policy,
        descriptors,
        readiness,
    } = bundle;
    let local_addr = listener.local_addr().ok();

    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_status(&reporter, &grpc_services, ServingStatus::NotServing).await;
    routes = routes.add_service(health_service);

    if config.reflection {
        // Health, and the google.rpc error details so clients can decode them by reflection.
        let mut v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(penny_proto::ERROR_DETAILS_DESCRIPTOR_SET);
        let mut v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(penny_proto::ERROR_DETAILS_DESCRIPTOR_SET);
        for descriptor in &descriptors {
            v1 = v1.register_encoded_file_descriptor_set(descriptor);
            v1alpha = v1alpha.register_encoded_file_descriptor_set(descriptor);
        }
        // Only the services this server runs are listed, although the descriptor set
        // describes the whole fleet.
        for service in grpc_services
            .iter()
            .copied()
            .chain([HEALTH_SERVICE])
            .chain(REFLECTION_SERVICES)
        {
            v1 = v1.with_service_name(service);
            v1alpha = v1alpha.with_service_name(service);
        }
        routes = routes
            .add_service(v1.build_v1().context("reflection v1")?)
            .add_service(v1alpha.build_v1alpha().context("reflection v1alpha")?);
    }

    let policy = REFLECTION_SERVICES.iter().fold(
        policy.service(HEALTH_SERVICE, Requirement::Public),
        |p, s| p.service(s, Requirement::Public),
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let probe_task = tokio::spawn(watch_readiness(
        reporter.clone(),
        grpc_services.clone(),
        readiness,
        config.readiness_interval,
        stop_rx,
    ));
    let drain_reporter = reporter.clone();
    let drain_services = grpc_services.clone();
    let (drain_tx, drain_rx) = watch::channel(false);
    let signal = async move {
        shutdown.await;
        tracing::info!(
            service = name,
            "shutdown requested, draining in-flight calls"
        );
        let _stopped = stop_tx.send(true);
        let _draining = drain_tx.send(true);
        set_status(&drain_reporter, &drain_services, ServingStatus::NotServing).await;
    };
    // Unary calls end within the request timeout and streams end when told to drain; a
    // server still busy past that (a stream that ignores the signal) is stopped anyway.
    let drain_deadline = config.request_timeout + Duration::from_secs(1);
    let mut deadline_rx = drain_rx.clone();
    let deadline = async move {
        let _ = deadline_rx.wait_for(|draining| *draining).await;
        tokio::time::sleep(drain_deadline).await;
    };

    let mut server = Server::builder();
    if let Some(tls) = &config.tls {
        let mut tls_config =
            ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
        if let Some(ca) = &tls.client_ca_pem {
            tls_config = tls_config.client_ca_root(Certificate::from_pem(ca));
        }
        server = server.tls_config(tls_config).context("TLS configuration")?;
    }
    // Revoked sessions, users, API keys and service clients are refused by this server's
    // verifier as soon as auth announces them.
    let verifier = match (&config.auth, &config.authorizer) {
        (Some(auth), Some(authorizer)) => config
            .verifier
            .following_revocations(auth.clone(), authorizer.credential()),
        _ => {
            tracing::warn!(
                service = name,
                "not following auth (PENNY_AUTH_URL unset): revoked sessions and API keys are not refused here, and tokens auth signs are not trusted"
            );
            config.verifier.clone()
        }
    };
    // Layers run outermost first.
    let stack = tower::ServiceBuilder::new()
        // A span per call, parented on the caller's trace, with a request id: first, so
        // that every refusal below is traced too.
        .layer(TraceLayer)
        // Long-lived calls learn that the server is draining, so shutdown can finish.
        .layer(DrainLayer::new(drain_rx))
        // Bounded concurrency: excess calls are refused at once instead of queueing.
        .layer(LoadShedLayer::new(config.concurrency_limit))
        // Every mutating or refused call becomes an audit event (outside authentication,
        // so refusals are recorded with whoever the caller turned out to be).
        .option_layer(
            config
                .audit
                .clone()
                .filter(|_| name != "audit")
                .map(|client| crate::audit_layer::AuditLayer::new(client, name)),
        )
        // No handler runs without a verified principal and a matching access rule.
        .layer({
            let layer = AuthLayer::new(policy, verifier, config.authorizer.clone());
            // API keys are resolved through auth, when the server knows where it is.
            match (&config.auth, &config.authorizer) {
                (Some(auth), Some(authorizer)) => layer.with_api_keys(
                    crate::apikey::ApiKeyResolver::new(auth.clone(), authorizer.credential()),
                ),
                _ => layer,
            }
        });

    tracing::info!(service = name, addr = ?local_addr, tls = config.tls.is_some(), "serving");
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let serving = server
        // Bounds every call; a shorter grpc-timeout from the caller wins.
        .timeout(config.request_timeout)
        .layer(stack)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, signal);
    let result = tokio::select! {
        result = serving => result,
        () = deadline => {
            tracing::warn!(service = name, "drain deadline passed; stopping with calls still open");
            Ok(())
        }
    };
    probe_task.abort();
    // What is still queued for audit goes to the spool, for the next start to send.
    if let Some(audit) = &config.audit {
        audit.flush_to_spool().await;
    }
    result.with_context(|| format!("{name} server"))?;
    tracing::info!(service = name, "stopped");
    Ok(())
}

async fn set_status(reporter: &HealthReporter, services: &[&'static str], status: ServingStatus) {
    for service in services {
        reporter.set_service_status(*service, status).await;
    }
    reporter.set_service_status("", status).await;
}

async fn watch_readiness(
    reporter: HealthReporter,
    services: Vec<&'static str>,
    probe: ReadinessProbe,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut last = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let ready = probe().await;
        if last != Some(ready) && !*stop.borrow() {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            if ready {
                tracing::info!(services = ?services, "dependencies ready, serving");
            } else {
                tracing::warn!(services = ?services, "dependencies not ready, not serving");
            }
            set_status(&reporter, &services, status).await;
            last = Some(ready);
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Resolves on SIGTERM or ctrl-c: what containers and terminals send.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
