//! Every cross-cutting mechanism of the Penny fleet, written once.
//!
//! A service crate brings its tonic routes and a table saying who may call each RPC;
//! this crate wraps them in the standard stack (tracing, request ids, timeouts, load
//! shedding, authentication, authorization), adds health and reflection, and serves them
//! with graceful drain. It also owns the error mapping to `tonic::Status`, the database
//! connection and migrations, the principal (JWT verification against a JWKS), telemetry,
//! and the development key store that mints tokens until the auth service takes it over.

#![forbid(unsafe_code)]

pub mod access;
pub mod apikey;
pub mod audit;
pub mod audit_layer;
pub mod authorizer;
pub mod config;
pub mod credential;
pub mod db;
pub mod error;
pub mod http;
pub mod page;
pub mod principal;
pub mod revocation;
pub mod server;
pub mod signing;
pub mod stack;
pub mod telemetry;
pub mod validate;
pub mod wire;

pub use access::{AccessPolicy, Requirement};
pub use audit::AuditClient;
pub use audit_layer::CriticalAction;
pub use authorizer::Authorizer;
pub use credential::ServiceCredential;
pub use error::{ApiError, Reason};
pub use principal::{Principal, PrincipalKind};
pub use server::{ServeConfig, ServiceBundle, serve, shutdown_signal};

/// Installs the process-wide rustls crypto provider.
///
/// Both `ring` (through sqlx) and `aws-lc-rs` (through tonic) are compiled in, so rustls
/// cannot pick one by itself and would panic on the first TLS handshake. Every `main` and
/// test harness calls this first; calling it twice is harmless.
pub fn install_crypto_provider() {
    let _already_installed = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
