//! The layers of the standard server stack, one type per concern.
//!
//! [`crate::server::serve`] assembles them, outermost first: [`TraceLayer`] (span per call,
//! W3C parent, request id), [`DrainLayer`] (the draining signal), [`LoadShedLayer`] (bounded
//! concurrency, excess refused at once), [`AuthLayer`] (principal and the service's access
//! table). tonic's own per-request timeout wraps all of them (so a timed-out call's reply
//! carries no request id). A refusal is written as a trailers-only gRPC response carrying
//! the rich status, so callers see the same details whichever layer refused them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use tokio::sync::Semaphore;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::access::{AccessPolicy, Requirement};
use crate::apikey::{API_KEY_HEADER, ApiKeyResolver};
use crate::authorizer::Authorizer;
use crate::error::{ApiError, Reason};
use crate::principal::{Principal, TokenError, TokenVerifier};
use crate::telemetry;

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// The request id header, echoed on every response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Paths that are never shed or authenticated: probes must answer under load.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
/// How long a call waits for the revocation state to become fresh (at start, or while the
/// stream to auth reconnects) before it is refused with UNAVAILABLE.
const REVOCATION_WAIT: Duration = Duration::from_secs(3);

/// The request id of the current call, in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Tells long-lived calls (server streams) that the server is draining, so they end and
/// let graceful shutdown finish. In every request's extensions.
#[derive(Debug, Clone)]
pub struct Draining(tokio::sync::watch::Receiver<bool>);

impl Draining {
    /// A signal that never fires (for calls made outside the standard stack).
    pub fn never() -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        // Keep the sender alive for the life of the process: the signal simply never fires.
        std::mem::forget(tx);
        Self(rx)
    }

    /// Resolves once the server starts draining.
    pub async fn started(&mut self) {
        if self.0.wait_for(|draining| *draining).await.is_err() {
            // The server is gone: that is draining too.
        }
    }
}

/// The draining signal of a request.
pub fn draining<T>(req: &tonic::Request<T>) -> Draining {
    req.extensions()
        .get::<Draining>()
        .cloned()
        .unwrap_or_else(Draining::never)
}

/// Puts the server's [`Draining`] signal into every request.
#[derive(Debug, Clone)]
pub struct DrainLayer {
    signal: tokio::sync::watch::Receiver<bool>,
}

impl DrainLayer {
    /// Hands `signal` to every request.
    pub fn new(signal: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { signal }
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = Drain<S>;
    fn layer(&self, inner: S) -> Drain<S> {
        Drain {
            inner,
            signal: self.signal.clone(),
        }
    }
}

/// See [`DrainLayer`].
#[derive(Debug, Clone)]
pub struct Drain<S> {
    inner: S,
    signal: tokio::sync::watch::Receiver<bool>,
}

impl<S, B> Service<Request<B>> for Drain<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        req.extensions_mut().insert(Draining(self.signal.clone()));
        self.inner.call(req)
    }
}

fn refusal(err: ApiError) -> Response<Body> {
    tonic::Status::from(err).into_http()
}

/// Accepts a caller's request id only if it is short and plain, so it cannot forge log
/// lines; otherwise a fresh one is made.
fn request_id_from(headers: &http::HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// A span per call, parented on the caller's W3C trace context, and a request id.
#[derive(Debug, Clone, Default)]
pub struct TraceLayer;

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace { inner }
    }
}

/// See [`TraceLayer`].
#[derive(Debug, Clone)]
pub struct Trace<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Trace<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let request_id = request_id_from(req.headers());
        let span = tracing::info_span!(
            "grpc",
            rpc = %req.uri().path(),
            request_id = %request_id,
            principal = tracing::field::Empty,
            otel.kind = "server",
        );
        let _no_parent = span.set_parent(telemetry::extract_context(req.headers()));
        req.extensions_mut().insert(RequestId(request_id.clone()));
        // Inner layers run inside the span, so the auth layer can record the principal.
        let fut = span.in_scope(|| self.inner.call(req));
        Box::pin(
            async move {
                let mut response = fut.await?;
                if let Ok(value) = HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert(REQUEST_ID_HEADER, value);
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// Bounded concurrency with immediate refusal of the excess (UNAVAILABLE + RetryInfo):
/// queueing under overload only turns a burst into timeouts for everyone.
#[derive(Debug, Clone)]
pub struct LoadShedLayer {
    permits: Arc<Semaphore>,
}

impl LoadShedLayer {
    /// At most `limit` calls in flight.
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit.max(1))),
        }
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;
    fn layer(&self, inner: S) -> LoadShed<S> {
        LoadShed {
            inner,
            permits: self.permits.clone(),
        }
    }
}

/// See [`LoadShedLayer`].
#[derive(Debug, Clone)]
pub struct LoadShed<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, B> Service<Request<B>> for LoadShed<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.uri().path().starts_with(HEALTH_PREFIX) {
            return Box::pin(self.inner.call(req));
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let response = fut.await;
                    drop(permit);
                    response
                })
            }
            Err(_) => {
                tracing::warn!("concurrency limit reached, request shed");
                let err = ApiError::unavailable(
                    Reason::Overloaded,
                    "server overloaded, retry later",
                    Duration::from_millis(250),
                );
                Box::pin(std::future::ready(Ok(refusal(err))))
            }
        }
    }
}

/// Authentication and authorization before any handler: the bearer token becomes a
/// [`Principal`] in the request's extensions, and the service's [`AccessPolicy`] decides
/// (asking the authz service, through the [`Authorizer`], for permission requirements).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    policy: Arc<AccessPolicy>,
    verifier: TokenVerifier,
    authorizer: Option<Authorizer>,
    api_keys: Option<ApiKeyResolver>,
}

impl AuthLayer {
    /// Enforces `policy`, verifying tokens with `verifier` and permissions with
    /// `authorizer`. Without an authorizer every permission requirement is refused.
    pub fn new(
        policy: AccessPolicy,
        verifier: TokenVerifier,
        authorizer: Option<Authorizer>,
    ) -> Self {
        Self {
            policy: Arc::new(policy),
            verifier,
            authorizer,
            api_keys: None,
        }
    }

    /// Also accepts API keys (`x-api-key`), resolved by `resolver`. Without it an API key
    /// is refused.
    #[must_use]
    pub fn with_api_keys(mut self, resolver: ApiKeyResolver) -> Self {
        self.api_keys = Some(resolver);
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

/// Why authentication did not produce a principal.
enum AuthFailure {
    /// Refused, with this error.
    Refused(ApiError),
    /// The verifier cannot vouch for revocations yet: worth a short wait.
    RevocationsUnknown,
    /// The token names a key this verifier does not know yet: worth asking auth.
    UnknownKey,
}

impl From<ApiError> for AuthFailure {
    fn from(err: ApiError) -> Self {
        Self::Refused(err)
    }
}

impl From<TokenError> for AuthFailure {
    fn from(err: TokenError) -> Self {
        match err {
            TokenError::RevocationStateUnknown => Self::RevocationsUnknown,
            TokenError::UnknownKid => Self::UnknownKey,
            other => Self::Refused(other.into()),
        }
    }
}

impl AuthLayer {
    fn authenticate<B>(
        &self,
        req: &Request<B>,
    ) -> Result<Option<(Principal, Requirement)>, AuthFailure> {
        let path = req.uri().path();
        let Some(requirement) = self.policy.requirement(path) else {
            tracing::warn!(rpc = %path, "rpc has no access rule, refused");
            return Err(
                ApiError::permission_denied("the caller may not perform this operation").into(),
            );
        };
        if !requirement.needs_principal() {
            return Ok(None);
        }
        let token = bearer_token(req.headers()).ok_or(TokenError::MalformedHeader)?;
        let principal = self.verifier.verify(token)?;
        // Whoever the caller is, the audit record of this call names them, refused or not.
        if let Some(slot) = req.extensions().get::<crate::audit_layer::AuditSlot>() {
            slot.set(&principal);
        }
        requirement.check(&principal)?;
        Ok(Some((principal, requirement)))
    }
}

impl AuthLayer {
    /// Authentication by API key: the access rule, the key (through auth, cached), its
    /// revocation state, and what the rule decides from the principal alone. `Ok(None)`
    /// for a public RPC.
    async fn authenticate_key(
        &self,
        path: &str,
        secret: &str,
        slot: Option<crate::audit_layer::AuditSlot>,
    ) -> Result<Option<(Principal, Requirement)>, ApiError> {
        let Some(requirement) = self.policy.requirement(path) else {
            tracing::warn!(rpc = %path, "rpc has no access rule, refused");
            return Err(ApiError::permission_denied(
                "the caller may not perform this operation",
            ));
        };
        if !requirement.needs_principal() {
            return Ok(None);
        }
        let Some(resolver) = &self.api_keys else {
            return Err(ApiError::unauthenticated(Reason::Unauthenticated));
        };
        let principal = resolver.resolve(secret).await?;
        if let Some(slot) = slot {
            slot.set(&principal);
        }
        if let Err(TokenError::RevocationStateUnknown) =
            self.verifier.check_credential(&principal, 0)
        {
            self.verifier.wait_for_revocations(REVOCATION_WAIT).await;
        }
        self.verifier.check_credential(&principal, 0)?;
        requirement.check(&principal)?;
        Ok(Some((principal, requirement)))
    }

    /// The permission step for an authenticated principal, then the handler (the slow
    /// path; the common one is inlined in [`Auth::call`]).
    async fn authorize<S, B>(
        &self,
        principal: Principal,
        requirement: Requirement,
        mut req: Request<B>,
        mut inner: S,
    ) -> Result<Response<Body>, S::Error>
    where
        S: Service<Request<B>, Response = Response<Body>>,
    {
        tracing::Span::current().record("principal", principal.id.as_str());
        if let Some(permission) = requirement.permission_for(&principal) {
            let Some(authorizer) = &self.authorizer else {
                return Ok(refusal(ApiError::permission_denied(
                    "the caller may not perform this operation",
                )));
            };
            match authorizer.allows(&principal, permission).await {
                Ok(true) => {}
                Ok(false) => {
                    return Ok(refusal(ApiError::permission_denied(
                        "the caller may not perform this operation",
                    )));
                }
                Err(err) => return Ok(refusal(err)),
            }
        }
        req.extensions_mut().insert(principal);
        inner.call(req).await
    }
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    parse_bearer(headers.get(http::header::AUTHORIZATION)?.to_str().ok()?)
}

fn parse_bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Some(key) = req.headers().get(API_KEY_HEADER) {
            // One credential per call: a key beside a bearer token is refused, not guessed.
            let secret = key
                .to_str()
                .ok()
                .filter(|_| !req.headers().contains_key(http::header::AUTHORIZATION))
                .map(str::to_owned);
            let path = req.uri().path().to_owned();
            let slot = req
                .extensions()
                .get::<crate::audit_layer::AuditSlot>()
                .cloned();
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            let layer = self.layer.clone();
            return Box::pin(async move {
                let Some(secret) = secret else {
                    return Ok(refusal(ApiError::unauthenticated(Reason::Unauthenticated)));
                };
                match layer.authenticate_key(&path, &secret, slot).await {
                    Ok(Some((principal, requirement))) => {
                        layer.authorize(principal, requirement, req, inner).await
                    }
                    Ok(None) => inner.call(req).await,
                    Err(err) => Ok(refusal(err)),
                }
            });
        }
        let (principal, requirement) = match self.layer.authenticate(&req) {
            Ok(Some((principal, requirement))) => (principal, requirement),
            Ok(None) => return Box::pin(self.inner.call(req)),
            Err(AuthFailure::Refused(err)) => {
                return Box::pin(std::future::ready(Ok(refusal(err))));
            }
            Err(AuthFailure::UnknownKey) if !self.layer.verifier.follows_published_keys() => {
                return Box::pin(std::future::ready(Ok(refusal(
                    TokenError::UnknownKid.into(),
                ))));
            }
            Err(failure @ (AuthFailure::RevocationsUnknown | AuthFailure::UnknownKey)) => {
                // At start, while the stream to auth reconnects, or just after auth
                // published a new key: wait a little for the revocation state or auth's
                // JWKS, then decide once more (and refuse if still unknown).
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let layer = self.layer.clone();
                return Box::pin(async move {
                    if matches!(failure, AuthFailure::UnknownKey) {
                        layer.verifier.refresh_published_keys(REVOCATION_WAIT).await;
                    }
                    if !layer.verifier.revocations_fresh() {
                        layer.verifier.wait_for_revocations(REVOCATION_WAIT).await;
                    }
                    let second = layer.authenticate(&req);
                    let (principal, requirement) = match second {
                        Ok(Some(found)) => found,
                        Ok(None) => return inner.call(req).await,
                        Err(AuthFailure::Refused(err)) => return Ok(refusal(err)),
                        Err(AuthFailure::RevocationsUnknown) => {
                            return Ok(refusal(TokenError::RevocationStateUnknown.into()));
                        }
                        Err(AuthFailure::UnknownKey) => {
                            return Ok(refusal(TokenError::UnknownKid.into()));
                        }
                    };
                    layer.authorize(principal, requirement, req, inner).await
                });
            }
        };
        tracing::Span::current().record("principal", principal.id.as_str());
        let Some(permission) = requirement.permission_for(&principal) else {
            req.extensions_mut().insert(principal);
            return Box::pin(self.inner.call(req));
        };
        let Some(authorizer) = self.layer.authorizer.clone() else {
            tracing::error!(
                permission,
                "rpc needs a permission but no authorizer is configured; refused"
            );
            return Box::pin(std::future::ready(Ok(refusal(
                ApiError::permission_denied("the caller may not perform this operation"),
            ))));
        };
        // The inner service was made ready by poll_ready: take it, leave a clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            match authorizer.allows(&principal, permission).await {
                Ok(true) => {
                    req.extensions_mut().insert(principal);
                    inner.call(req).await
                }
                Ok(false) => Ok(refusal(ApiError::permission_denied(
                    "the caller may not perform this operation",
                ))),
                Err(err) => Ok(refusal(err)),
            }
        })
    }
}

/// The tenant a request may act in. Users and API keys act only in their own tenant:
/// another tenant's id gets NOT_FOUND, exactly as if nothing were there. Fleet services and
/// platform staff may act in any tenant.
pub fn tenant_scope(principal: &Principal, requested: uuid::Uuid) -> Result<uuid::Uuid, ApiError> {
    if principal.is_service() || principal.is_platform_admin() || principal.tenant_id == requested {
        Ok(requested)
    } else {
        Err(ApiError::not_found(Reason::NotFound, "not found"))
    }
}

/// The verified caller of a request, as the [`AuthLayer`] left it. Fails closed: a handler
/// reached without a principal (a wiring mistake) is refused, never served anonymously.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<&Principal, tonic::Status> {
    req.extensions()
        .get::<Principal>()
        .ok_or_else(|| ApiError::unauthenticated(Reason::Unauthenticated).into())
}

/// The credential a caller presented (bearer token or API key), to present again when a
/// service acts on the caller's behalf in another service: that service then applies its
/// rules (tenant boundary, no escalation) to the caller, not to the fleet service in
/// between. Never printed.
#[derive(Clone)]
pub struct CallerCredential {
    header: &'static str,
    value: http::HeaderValue,
}

impl std::fmt::Debug for CallerCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerCredential")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl CallerCredential {
    /// `message` as a request carrying this credential.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Ok(value) = tonic::metadata::MetadataValue::try_from(self.value.as_bytes()) {
            request.metadata_mut().insert(self.header, value);
        }
        request
    }
}

/// The caller's credential, as the [`AuthLayer`] accepted it. Fails closed like [`caller`].
pub fn caller_credential<T>(req: &tonic::Request<T>) -> Result<CallerCredential, tonic::Status> {
    let headers = req.metadata();
    let found = if let Some(value) = headers
        .get("authorization")
        .filter(|v| v.to_str().ok().and_then(parse_bearer).is_some())
    {
        Some(("authorization", value))
    } else {
        headers
            .get(API_KEY_HEADER)
            .map(|value| (API_KEY_HEADER, value))
    };
    found
        .and_then(|(header, value)| {
            Some(CallerCredential {
                header,
                value: http::HeaderValue::from_bytes(value.as_bytes()).ok()?,
            })
        })
        .ok_or_else(|| ApiError::unauthenticated(Reason::Unauthenticated).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert("authorization", HeaderValue::from_static("Bearer abc.def"));
        assert_eq!(bearer_token(&headers), Some("abc.def"));
        headers.insert("authorization", HeaderValue::from_static("bearer   x"));
        assert_eq!(bearer_token(&headers), Some("x"));
        headers.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&headers), None);
        headers.insert("authorization", HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&headers), None);
    }

    #[test]
    fn request_ids_are_sanitized() {
        let mut headers = http::HeaderMap::new();
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id_from(&headers), "abc-123");
        headers.insert(
            REQUEST_ID_HEADER,
            HeaderValue::from_static("evil\" injected=1"),
        );
        assert_ne!(request_id_from(&headers), "evil\" injected=1");
    }
}
