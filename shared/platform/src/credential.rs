//! A server's own credential, for the calls it makes on its own behalf (to authz, auth,
//! keys, tenants).
//!
//! Two sources: a fixed token read from a file at start (`PENNY_SERVICE_TOKEN_FILE`; the
//! auth service itself needs one, signed by a key in `PENNY_JWKS_FILE`, because it cannot
//! ask itself before it has its signing keys), or a service client's id and secret traded
//! with auth's `IssueServiceToken` (`PENNY_CLIENT_ID`, `PENNY_CLIENT_SECRET_FILE`). An
//! issued token is renewed once three quarters of its life have passed, by one caller at a
//! time; while auth cannot renew it, the current token is used until shortly before it
//! expires, and then calls fail closed with UNAVAILABLE. The secret and the tokens never
//! reach a log or an error.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use penny_proto::auth::v1 as pb;
use penny_proto::auth::v1::auth_service_client::AuthServiceClient;
use tonic::transport::Channel;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::{ApiError, Reason};
use crate::principal::{bearer_request, now_secs};

/// How long one `IssueServiceToken` call may take.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed renewal, callers are not made to wait for another attempt this soon.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A token this close to its expiry (or a tenth of its life, if less) is no longer
/// handed out.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// This server's credential for calling other services. Cheap to clone; clones share the
/// issued token.
#[derive(Clone)]
pub struct ServiceCredential(Arc<Source>);

enum Source {
    Fixed(Arc<str>),
    Issued(Box<Issuer>),
}

impl std::fmt::Debug for ServiceCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.0 {
            Source::Fixed(_) => f.write_str("ServiceCredential::Fixed"),
            Source::Issued(issuer) => f
                .debug_struct("ServiceCredential::Issued")
                .field("client_id", &issuer.client_id)
                .finish_non_exhaustive(),
        }
    }
}

struct Issuer {
    client: AuthServiceClient<Channel>,
    client_id: Uuid,
    secret: Zeroizing<String>,
    held: RwLock<Held>,
    /// One renewal at a time; the others wait for its result.
    renewing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Held {
    token: Option<Arc<str>>,
    renew_at: Option<Instant>,
    unusable_at: Option<Instant>,
    failed_at: Option<Instant>,
    /// Renewals failed in a row (the first is a warning, the rest are not repeated).
    failures: u32,
}

impl Held {
    /// The token, when it is not yet due for renewal.
    fn fresh(&self, now: Instant) -> Option<Arc<str>> {
        match (&self.token, self.renew_at) {
            (Some(token), Some(renew_at)) if now < renew_at => Some(token.clone()),
            _ => None,
        }
    }

    /// The token, when it can still be used.
    fn usable(&self, now: Instant) -> Option<Arc<str>> {
        match (&self.token, self.unusable_at) {
            (Some(token), Some(unusable_at)) if now < unusable_at => Some(token.clone()),
            _ => None,
        }
    }
}

impl ServiceCredential {
    /// A token given at start, used as it is.
    pub fn fixed(token: impl Into<Arc<str>>) -> Self {
        Self(Arc::new(Source::Fixed(token.into())))
    }

    /// Tokens issued by auth (at `auth`) to the service client `client_id`.
    pub fn issued(auth: Channel, client_id: Uuid, secret: Zeroizing<String>) -> Self {
        Self(Arc::new(Source::Issued(Box::new(Issuer {
            client: AuthServiceClient::new(auth),
            client_id,
            secret,
            held: RwLock::new(Held::default()),
            renewing: tokio::sync::Mutex::new(()),
        }))))
    }

    /// The bearer token to send now; UNAVAILABLE when none can be had.
    pub async fn bearer(&self) -> Result<Arc<str>, ApiError> {
        match &*self.0 {
            Source::Fixed(token) => Ok(token.clone()),
            Source::Issued(issuer) => issuer.bearer().await,
        }
    }

    /// `message` as a request carrying this credential.
    pub async fn request<T>(&self, message: T) -> Result<tonic::Request<T>, ApiError> {
        bearer_request(message, &self.bearer().await?)
    }
}

fn unavailable() -> ApiError {
    ApiError::unavailable(
        Reason::DependencyUnavailable,
        "this service's own credential is unavailable; retry later",
        RETRY_AFTER,
    )
}

impl Issuer {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Held> {
        self.held
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn bearer(&self) -> Result<Arc<str>, ApiError> {
        if let Some(token) = self.read().fresh(Instant::now()) {
            return Ok(token);
        }
        let _renewing = self.renewing.lock().await;
        // Someone else may have renewed it while this call waited.
        let now = Instant::now();
        {
            let held = self.read();
            if let Some(token) = held.fresh(now) {
                return Ok(token);
            }
            if held.failed_at.is_some_and(|at| now < at + RETRY_AFTER) {
                return held.usable(now).ok_or_else(unavailable);
            }
        }
        match self.issue().await {
            Ok((token, lifetime)) => {
                let now = Instant::now();
                let mut held = self
                    .held
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if held.failures > 0 {
                    tracing::info!(client_id = %self.client_id, "service token issued again");
                }
                *held = Held {
                    token: Some(token.clone()),
                    renew_at: Some(now + lifetime * 3 / 4),
                    unusable_at: Some(now + lifetime - EXPIRY_MARGIN.min(lifetime / 10)),
                    failed_at: None,
                    failures: 0,
                };
                Ok(token)
            }
            Err(code) => {
                let now = Instant::now();
                let mut held = self
                    .held
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if held.failures == 0 {
                    tracing::warn!(client_id = %self.client_id, ?code, "auth did not issue this service's token; retrying");
                } else {
                    tracing::debug!(client_id = %self.client_id, ?code, failures = held.failures, "auth did not issue this service's token");
                }
                held.failures = held.failures.saturating_add(1);
                held.failed_at = Some(now);
                held.usable(now).ok_or_else(unavailable)
            }
        }
    }

    /// A new token and how long it lives.
    async fn issue(&self) -> Result<(Arc<str>, Duration), tonic::Code> {
        let mut request = tonic::Request::new(pb::IssueServiceTokenRequest {
            client_id: self.client_id.to_string(),
            client_secret: self.secret.as_str().to_owned(),
            scopes: Vec::new(),
        });
        request.set_timeout(ISSUE_TIMEOUT);
        let reply = tokio::time::timeout(
            ISSUE_TIMEOUT,
            self.client.clone().issue_service_token(request),
        )
        .await
        .map_err(|_| tonic::Code::DeadlineExceeded)?
        .map_err(|status| status.code())?
        .into_inner();
        let expires = reply
            .expire_time
            .and_then(|t| u64::try_from(t.seconds).ok())
            .ok_or(tonic::Code::Internal)?;
        let lifetime = Duration::from_secs(expires.saturating_sub(now_secs()));
        if reply.access_token.is_empty() || lifetime < Duration::from_secs(2) {
            return Err(tonic::Code::Internal);
        }
        Ok((reply.access_token.into(), lifetime))
    }
}
