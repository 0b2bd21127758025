//! The standard stack's record of calls: every mutating call, every refused call, every
//! call whose method is not plainly a read, and every call a user or an API key makes,
//! becomes an audit event, queued through the server's [`AuditClient`] (batched, spooled
//! while audit is unreachable). Reads (`Get…`, `List…`, `Check…`, `Query…`, `Watch…`, …)
//! by fleet services are recorded only when refused: they act for someone whose own call
//! is recorded where it entered, and the monitor counts a person's requests, reads too.
//!
//! The layer sits outside authentication, so refusals are recorded too; the
//! authentication layer tells it who the caller was through an [`AuditSlot`] in the
//! request's extensions. Handlers record security-critical actions themselves, with
//! [`AuditClient::record_critical`], which fails the call when audit cannot store them.

use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use penny_proto::audit::v1 as pb;
use penny_proto::common::v1::PrincipalKind as PbKind;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::audit::AuditClient;
use crate::error::ApiError;
use crate::principal::{PLATFORM_TENANT_ID, Principal, PrincipalKind};

type BoxFuture<T, E> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

/// Where the authentication layer leaves the caller for the audit layer.
#[derive(Debug, Clone, Default)]
pub struct AuditSlot(Arc<OnceLock<Principal>>);

impl AuditSlot {
    /// Notes the caller of the request carrying this slot.
    pub fn set(&self, principal: &Principal) {
        let _ = self.0.set(principal.clone());
    }
}

/// Method names that only read: recorded only when refused.
const READ_PREFIXES: [&str; 10] = [
    "Get",
    "List",
    "Check",
    "BatchCheck",
    "Explain",
    "Watch",
    "Query",
    "Export",
    "Introspect",
    "Validate",
];

/// Whether the method only reads.
pub fn is_read(method: &str) -> bool {
    method == "VerifyChain" || READ_PREFIXES.iter().any(|p| method.starts_with(p))
}

/// `GenerateDataKey` → `generate_data_key`.
fn snake(method: &str) -> String {
    let mut out = String::with_capacity(method.len() + 4);
    for (i, c) in method.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `penny.keys.v1.KeyService` → `key`.
fn resource_of(service: &str) -> String {
    let name = service.rsplit('.').next().unwrap_or(service);
    name.strip_suffix("Service")
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// The event for a call, its `service` named `service`.
pub fn call_event(
    service: &str,
    path: &str,
    principal: Option<&Principal>,
    peer: Option<std::net::IpAddr>,
    user_agent: &str,
    started: Instant,
    code: tonic::Code,
) -> pb::AuditEvent {
    let (full_service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("", path));
    let outcome = outcome_of(code);
    let elapsed = started.elapsed();
    let mut attributes = std::collections::HashMap::new();
    // Ids that are not UUIDs (a service's `sub`) cannot be the event's user id.
    let user_id = match principal {
        Some(p) if uuid::Uuid::try_parse(&p.id).is_ok() => p.id.clone(),
        Some(p) => {
            attributes.insert("principal_id".to_owned(), p.id.clone());
            String::new()
        }
        None => String::new(),
    };
    if let Some(p) = principal
        && p.kind == PrincipalKind::User
        && let Some(session) = &p.session_id
    {
        attributes.insert("session_id".to_owned(), session.clone());
    }
    pb::AuditEvent {
        id: new_event_id(),
        tenant_id: principal
            .map_or(PLATFORM_TENANT_ID, |p| p.tenant_id)
            .to_string(),
        user_id,
        principal_kind: principal.map_or(PbKind::Unspecified as i32, |p| p.kind.proto() as i32),
        action: format!("{service}.{}", snake(method)),
        resource: resource_of(full_service),
        resource_id: String::new(),
        metadata: Some(pb::RequestMetadata {
            method: path.to_owned(),
            path: String::new(),
            duration: Some(prost_types::Duration {
                seconds: i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(elapsed.subsec_nanos()).unwrap_or(0),
            }),
            status: code as i32,
        }),
        ip_address: peer.map(|ip| ip.to_string()).unwrap_or_default(),
        user_agent: user_agent.to_owned(),
        event_time: Some(crate::wire::timestamp(time::OffsetDateTime::now_utc())),
        service: service.to_owned(),
        outcome: outcome as i32,
        trace_id: String::new(),
        attributes,
        ..Default::default()
    }
}

/// A security-critical action (an MFA change, a role grant, a key rotation, an erasure),
/// audited twice: its attempt is stored before anything is done, and the caller fails
/// with UNAVAILABLE when it cannot be (so the action is never done unaudited); how it
/// ended is queued when it ends (spooled while audit is down, never lost).
#[derive(Debug)]
#[must_use = "finish the action to record how it ended"]
pub struct CriticalAction {
    client: Option<AuditClient>,
    event: pb::AuditEvent,
    started: Instant,
}

impl CriticalAction {
    /// Stores the attempt of `method` (`/penny.authz.v1.AuthzService/GrantRole`) of
    /// `service` (`authz`) by `principal` on `resource` in `tenant`. Without an audit
    /// client (a server run without audit) nothing is recorded.
    pub async fn begin(
        audit: Option<&AuditClient>,
        service: &str,
        method: &str,
        principal: &Principal,
        tenant: uuid::Uuid,
        resource: (&str, String),
        attributes: &[(&str, String)],
    ) -> Result<Self, ApiError> {
        let started = Instant::now();
        let mut event = call_event(
            service,
            method,
            Some(principal),
            None,
            "",
            started,
            tonic::Code::Ok,
        );
        event.tenant_id = tenant.to_string();
        event.resource = resource.0.to_owned();
        event.resource_id = resource.1;
        for (name, value) in attributes {
            event.attributes.insert((*name).to_owned(), value.clone());
        }
        event.outcome = pb::Outcome::Attempted as i32;
        if let Some(metadata) = &mut event.metadata {
            metadata.duration = None;
        }
        if let Some(client) = audit {
            client.record_critical(event.clone()).await?;
        }
        Ok(Self {
            client: audit.cloned(),
            event,
            started,
        })
    }

    /// Records how the action ended, with `attributes` learnt on the way.
    pub fn finish<T>(self, result: &Result<T, tonic::Status>, attributes: &[(&str, String)]) {
        let Some(client) = self.client else {
            return;
        };
        let code = result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        let mut event = self.event;
        event
            .attributes
            .insert("attempt_id".to_owned(), event.id.clone());
        for (name, value) in attributes {
            event.attributes.insert((*name).to_owned(), value.clone());
        }
        event.id = new_event_id();
        event.outcome = outcome_of(code) as i32;
        event.event_time = Some(crate::wire::timestamp(time::OffsetDateTime::now_utc()));
        if let Some(metadata) = &mut event.metadata {
            let elapsed = self.started.elapsed();
            metadata.duration = Some(prost_types::Duration {
                seconds: i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(elapsed.subsec_nanos()).unwrap_or(0),
            });
            metadata.status = code as i32;
        }
        client.record(event);
    }
}

/// A new event id: a UUIDv7 whose random bits come from the thread's generator, not a
/// system call per event (`Uuid::now_v7` asks the kernel each time). Ids need only be
/// unique; the chain orders events by sequence.
fn new_event_id() -> String {
    event_uuid(time::OffsetDateTime::now_utc()).to_string()
}

/// The id of an event made at `now` (see [`new_event_id`]).
fn event_uuid(now: time::OffsetDateTime) -> uuid::Uuid {
    let millis = u64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    let random = rand::random::<u128>().to_le_bytes();
    let mut bits = [0u8; 10];
    bits.copy_from_slice(&random[..10]);
    uuid::Builder::from_unix_timestamp_millis(millis, &bits).into_uuid()
}

/// The event [`call_event`] builds, written straight into its wire form (an encoded
/// `AuditEvent`) from borrowed parts: the layer's hot path fills one buffer per call
/// instead of allocating a string per field and dropping them all once encoded. A unit
/// test holds the two to the same event.
struct CallRecord<'a> {
    service: &'a str,
    path: &'a str,
    principal: Option<&'a Principal>,
    peer: Option<std::net::IpAddr>,
    user_agent: &'a str,
    elapsed: std::time::Duration,
    code: tonic::Code,
    id: uuid::Uuid,
    now: time::OffsetDateTime,
}

impl CallRecord<'_> {
    fn encode(&self) -> Vec<u8> {
        use std::io::Write as _;
        let (full_service, method) = self
            .path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", self.path));
        let mut buf = Vec::with_capacity(256 + self.path.len() + self.user_agent.len());
        let mut uuid_text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        wire::put_str(
            &mut buf,
            1,
            self.id.hyphenated().encode_lower(&mut uuid_text),
        );
        let tenant = self.principal.map_or(PLATFORM_TENANT_ID, |p| p.tenant_id);
        wire::put_str(
            &mut buf,
            2,
            tenant.hyphenated().encode_lower(&mut uuid_text),
        );
        let user_is_id = self
            .principal
            .is_some_and(|p| uuid::Uuid::try_parse(&p.id).is_ok());
        if let Some(p) = self.principal.filter(|_| user_is_id) {
            wire::put_str(&mut buf, 3, &p.id);
        }
        wire::put_int(
            &mut buf,
            4,
            self.principal
                .map_or(PbKind::Unspecified as i32, |p| p.kind.proto() as i32)
                .into(),
        );
        wire::put_with(&mut buf, 5, |buf| {
            buf.extend_from_slice(self.service.as_bytes());
            buf.push(b'.');
            buf.extend_from_slice(snake(method).as_bytes());
        });
        let name = full_service.rsplit('.').next().unwrap_or(full_service);
        wire::put_with(&mut buf, 6, |buf| {
            let name = name.strip_suffix("Service").unwrap_or(name);
            buf.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
        });
        wire::put_with(&mut buf, 8, |buf| {
            wire::put_str(buf, 1, self.path);
            wire::put_with(buf, 3, |buf| {
                wire::put_int(
                    buf,
                    1,
                    i64::try_from(self.elapsed.as_secs()).unwrap_or(i64::MAX),
                );
                wire::put_int(buf, 2, self.elapsed.subsec_nanos().into());
            });
            wire::put_int(buf, 4, (self.code as i32).into());
        });
        if let Some(peer) = self.peer {
            wire::put_with(&mut buf, 9, |buf| {
                let _ = write!(buf, "{peer}");
            });
        }
        wire::put_str(&mut buf, 10, self.user_agent);
        wire::put_with(&mut buf, 11, |buf| {
            wire::put_int(buf, 1, self.now.unix_timestamp());
            wire::put_int(buf, 2, self.now.nanosecond().into());
        });
        wire::put_str(&mut buf, 12, self.service);
        wire::put_int(&mut buf, 13, (outcome_of(self.code) as i32).into());
        if let Some(p) = self.principal {
            if !user_is_id {
                wire::put_with(&mut buf, 15, |buf| {
                    wire::put_str(buf, 1, "principal_id");
                    wire::put_str(buf, 2, &p.id);
                });
            }
            if p.kind == PrincipalKind::User
                && let Some(session) = &p.session_id
            {
                wire::put_with(&mut buf, 15, |buf| {
                    wire::put_str(buf, 1, "session_id");
                    wire::put_str(buf, 2, session);
                });
            }
        }
        buf
    }
}

/// Protocol buffer wire format, for [`CallRecord::encode`]. Fields at their default value
/// are left out, as prost does.
mod wire {
    use prost::encoding::{WireType, encode_key, encode_varint};

    /// A length-delimited field whose content `fill` writes.
    pub(super) fn put_with(buf: &mut Vec<u8>, tag: u32, fill: impl FnOnce(&mut Vec<u8>)) {
        let start = buf.len();
        fill(buf);
        let len = buf.len() - start;
        let mut head = [0u8; 15];
        let mut cursor = &mut head[..];
        encode_key(tag, WireType::LengthDelimited, &mut cursor);
        encode_varint(len as u64, &mut cursor);
        let written = 15 - cursor.len();
        buf.splice(start..start, head[..written].iter().copied());
    }

    pub(super) fn put_str(buf: &mut Vec<u8>, tag: u32, value: &str) {
        if value.is_empty() {
            return;
        }
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.extend_from_slice(value.as_bytes());
    }

    /// An `int32`, `int64` or enum field (negative values sign-extended, as protobuf
    /// does).
    #[allow(clippy::cast_sign_loss)]
    pub(super) fn put_int(buf: &mut Vec<u8>, tag: u32, value: i64) {
        if value == 0 {
            return;
        }
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value as u64, buf);
    }
}

fn outcome_of(code: tonic::Code) -> pb::Outcome {
    match code {
        tonic::Code::Ok => pb::Outcome::Success,
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => pb::Outcome::Denied,
        _ => pb::Outcome::Failure,
    }
}

/// Records calls through an [`AuditClient`].
#[derive(Debug, Clone)]
pub struct AuditLayer {
    client: AuditClient,
    service: &'static str,
}

impl AuditLayer {
    /// Records the calls of `service` (its short name, `keys`) through `client`.
    pub fn new(client: AuditClient, service: &'static str) -> Self {
        Self { client, service }
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = Audited<S>;
    fn layer(&self, inner: S) -> Audited<S> {
        Audited {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`AuditLayer`].
#[derive(Debug, Clone)]
pub struct Audited<S> {
    inner: S,
    layer: AuditLayer,
}

/// The gRPC status of a response: in its headers when it is trailers-only (every refusal
/// and error), else OK (a successful unary reply, or a stream that started).
fn status_of(response: &Response<Body>) -> tonic::Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

impl<S, B> Service<Request<B>> for Audited<S>
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

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        // Probes and reflection are not calls anyone acts through.
        if path.starts_with("/grpc.") {
            return Box::pin(self.inner.call(req));
        }
        let slot = AuditSlot::default();
        req.extensions_mut().insert(slot.clone());
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|info| info.remote_addr())
            .map(|addr| addr.ip());
        let user_agent = req
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let started = Instant::now();
        let layer = self.layer.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            let code = status_of(&response);
            let method = path.rsplit('/').next().unwrap_or_default();
            let refused = matches!(
                code,
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            );
            let by_person = slot
                .0
                .get()
                .is_some_and(|p| matches!(p.kind, PrincipalKind::User | PrincipalKind::ApiKey));
            if refused || by_person || !is_read(method) {
                let now = time::OffsetDateTime::now_utc();
                let record = CallRecord {
                    service: layer.service,
                    path: &path,
                    principal: slot.0.get(),
                    peer,
                    user_agent: &user_agent,
                    elapsed: started.elapsed(),
                    code,
                    id: event_uuid(now),
                    now,
                };
                layer.client.record_encoded(record.encode());
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn event_ids_are_distinct_version_7_uuids() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_event_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            let id = uuid::Uuid::try_parse(id).unwrap();
            assert_eq!(id.get_version_num(), 7);
        }
    }

    /// The layer's encoder writes exactly the event `call_event` builds.
    #[test]
    fn encoded_call_events_are_the_events_call_event_builds() {
        let tenant = uuid::Uuid::now_v7();
        let user = Principal {
            kind: PrincipalKind::User,
            id: uuid::Uuid::now_v7().to_string(),
            tenant_id: tenant,
            roles: vec!["member".into()],
            session_id: Some("session-1".into()),
            scopes: vec![],
        };
        let service = Principal {
            kind: PrincipalKind::Service,
            id: "svc-tenants".into(),
            tenant_id: PLATFORM_TENANT_ID,
            roles: vec![],
            session_id: None,
            scopes: vec!["x".into()],
        };
        let long_path = format!("/penny.keys.v1.KeyService/{}", "X".repeat(300));
        type Case<'a> = (
            Option<&'a Principal>,
            Option<std::net::IpAddr>,
            &'a str,
            &'a str,
            tonic::Code,
        );
        let cases: [Case<'_>; 4] = [
            (
                Some(&user),
                Some("203.0.113.9".parse().unwrap()),
                "grpcurl/1.8",
                "/penny.keys.v1.KeyService/GenerateDataKey",
                tonic::Code::Ok,
            ),
            (
                Some(&service),
                Some("2001:db8::1".parse().unwrap()),
                "",
                "/penny.authz.v1.AuthzService/GrantRole",
                tonic::Code::PermissionDenied,
            ),
            (
                None,
                None,
                "ua",
                "/penny.auth.v1.AuthService/Login",
                tonic::Code::Unauthenticated,
            ),
            (Some(&user), None, "", &long_path, tonic::Code::Internal),
        ];
        for (principal, peer, user_agent, path, code) in cases {
            let started = Instant::now();
            let mut expected = call_event("keys", path, principal, peer, user_agent, started, code);
            let now = time::OffsetDateTime::now_utc();
            let record = CallRecord {
                service: "keys",
                path,
                principal,
                peer,
                user_agent,
                elapsed: std::time::Duration::new(3, 456_789),
                code,
                id: event_uuid(now),
                now,
            };
            let decoded = pb::AuditEvent::decode(record.encode().as_slice()).unwrap();
            // The parts that differ by construction: id, time and duration.
            expected.id = record.id.to_string();
            expected.event_time = Some(crate::wire::timestamp(now));
            if let Some(metadata) = &mut expected.metadata {
                metadata.duration = Some(prost_types::Duration {
                    seconds: 3,
                    nanos: 456_789,
                });
            }
            assert_eq!(decoded, expected, "{path}");
        }
    }

    #[test]
    fn names_and_reads() {
        assert_eq!(snake("GenerateDataKey"), "generate_data_key");
        assert_eq!(resource_of("penny.keys.v1.KeyService"), "key");
        assert!(is_read("GetKey") && is_read("VerifyChain") && is_read("ValidateApiKey"));
        assert!(!is_read("VerifyMfa") && !is_read("Login") && !is_read("GrantRole"));
    }
}
