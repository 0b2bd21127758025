//! The gRPC face of the auth service: decode, validate, call the domain, map errors. Thin.

use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use penny_platform::access::ENROLL_SCOPE;
use penny_platform::page::{decode_page_token, encode_page_token, page_token_error};
use penny_platform::stack::{caller, caller_credential, draining};
use penny_platform::validate::{Violations, page_size};
use penny_platform::wire::timestamp;
use penny_platform::{AccessPolicy, ApiError, Reason, Requirement, ServeConfig, ServiceBundle};
use penny_proto::auth::v1 as pb;
use penny_proto::auth::v1::auth_service_server::{AuthService, AuthServiceServer};
use time::OffsetDateTime;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::SERVICE_NAME;
use crate::api_keys::NewApiKey;
use crate::domain::cidr::{Cidr, CidrError};
use crate::domain::password::MAX_CHARS;
use crate::mfa::Proof;
use crate::service::{
    Auth, DEFAULT_RESET_TTL, LoginAttempt, MAX_RESET_TTL, SignInOutcome, SignedIn,
};
use crate::sessions::RevokeTarget;
use crate::store::{ApiKeyRecord, IpBlock, Revocation, RevocationKind, SessionRecord};

/// How long verifiers may cache the JWKS.
pub(crate) const JWKS_MAX_AGE: Duration = Duration::from_secs(300);
/// Longest set-password token accepted.
const MAX_TOKEN_LEN: usize = 512;
/// Longest user agent.
const MAX_USER_AGENT_LEN: usize = 512;
/// Longest revocation reason.
const MAX_REASON_LEN: usize = 512;
/// Longest revocation resume token.
const MAX_RESUME_TOKEN_LEN: usize = 1024;
/// The revocation stream sends at least this often, so followers can tell it is alive.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Revocations committed through other replicas reach a stream within this.
const STREAM_POLL: Duration = Duration::from_millis(250);
/// Revocations per stream message.
const STREAM_BATCH: u64 = 500;
/// Longest API key name.
const MAX_KEY_NAME_LEN: usize = 128;
/// Most roles on one API key.
const MAX_KEY_ROLES: usize = 16;
/// Longest role name.
const MAX_ROLE_LEN: usize = 64;
/// Longest presented API key secret.
const MAX_SECRET_LEN: usize = 128;
/// Longest TOTP or recovery code.
const MAX_CODE_LEN: usize = 64;
/// Longest token accepted for introspection.
const MAX_JWT_LEN: usize = 8192;
/// Longest CIDR text (a full IPv6 address with a prefix).
const MAX_CIDR_LEN: usize = 43;
/// Longest IP block.
const MAX_BLOCK: Duration = Duration::from_secs(365 * 24 * 3600);

/// Login and SetPassword are called by a trusted front-end service on behalf of an end user
/// (or by platform staff); the JWKS is public.
pub(crate) fn policy() -> AccessPolicy {
    use Requirement::{Authenticated, Enrollment, Permission, Public, ServiceOrAdmin};
    [
        ("SetPassword", ServiceOrAdmin),
        ("Login", ServiceOrAdmin),
        ("GetJwks", Public),
        // Users act on their own sessions; the handler asks authz for anything more.
        ("Logout", Enrollment),
        // An enrolment-only token (scope `mfa:enroll`) is good here and nowhere else.
        ("EnrollMfa", Enrollment),
        ("ConfirmMfa", Enrollment),
        ("VerifyMfa", ServiceOrAdmin),
        ("DisableMfa", Authenticated),
        ("ListSessions", Authenticated),
        ("RevokeSession", Authenticated),
        ("WatchRevocations", ServiceOrAdmin),
        // API keys are tenant settings; each role is granted as the creator besides.
        ("CreateApiKey", Permission("tenant:update")),
        ("ListApiKeys", Permission("tenant:read")),
        ("RevokeApiKey", Permission("tenant:update")),
        ("ValidateApiKey", ServiceOrAdmin),
        // The handler also refuses the global list to anyone but staff and services.
        ("BlockIp", Permission("tenant:update")),
        ("UnblockIp", Permission("tenant:update")),
        ("ListBlockedIps", Permission("tenant:read")),
        ("ChangePassword", Authenticated),
        ("IntrospectToken", ServiceOrAdmin),
        // Client credentials are the credential: no token needed.
        ("IssueServiceToken", Public),
    ]
    .into_iter()
    .fold(AccessPolicy::new(), |policy, (method, requirement)| {
        policy.rpc(SERVICE_NAME, method, requirement)
    })
}

pub(crate) fn bundle(auth: Auth, serve_config: &ServeConfig) -> ServiceBundle {
    let probe = auth.clone();
    let server = AuthServiceServer::new(AuthGrpc { auth })
        .max_decoding_message_size(serve_config.max_message_bytes)
        .max_encoding_message_size(serve_config.max_message_bytes);
    ServiceBundle {
        name: "auth",
        routes: tonic::service::Routes::new(server),
        grpc_services: vec![SERVICE_NAME],
        policy: policy(),
        descriptors: vec![penny_proto::FILE_DESCRIPTOR_SET],
        readiness: std::sync::Arc::new(move || {
            let auth = probe.clone();
            Box::pin(async move { auth.ready().await })
        }),
    }
}

struct AuthGrpc {
    auth: Auth,
}

impl AuthGrpc {
    /// Stores the attempt of a security-critical change to `principal`'s own account
    /// (its MFA), before it is made.
    async fn critical(
        &self,
        principal: &penny_platform::Principal,
        method: &str,
    ) -> Result<penny_platform::CriticalAction, ApiError> {
        penny_platform::CriticalAction::begin(
            self.auth.audit.as_ref(),
            "auth",
            method,
            principal,
            principal.tenant_id,
            ("user", principal.id.clone()),
            &[],
        )
        .await
    }
}

fn password_in(v: &mut Violations, field: &str, value: &str, required: bool) {
    let chars = value.chars().count();
    if required && chars == 0 {
        v.add(field, "required");
    } else if chars > MAX_CHARS {
        v.add(field, format!("must be at most {MAX_CHARS} characters"));
    }
}

fn ip_in(v: &mut Violations, value: &str) -> Option<IpAddr> {
    match value.parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            v.add(
                "ip_address",
                "required: the end user's IPv4 or IPv6 address",
            );
            None
        }
    }
}

fn tokens_out(signed_in: SignedIn, scopes: &[&str]) -> pb::Tokens {
    let session = &signed_in.session;
    pb::Tokens {
        token_type: "Bearer".into(),
        expire_time: Some(timestamp(session.expires_at)),
        session_id: session.id.to_string(),
        user_id: session.user_id.to_string(),
        tenant_id: session.tenant_id.to_string(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        access_token: signed_in.access_token,
    }
}

fn session_out(session: &SessionRecord, current: Option<&str>) -> pb::Session {
    let id = session.id.to_string();
    pb::Session {
        current: current == Some(id.as_str()),
        id,
        tenant_id: session.tenant_id.to_string(),
        user_id: session.user_id.to_string(),
        create_time: Some(timestamp(session.created_at)),
        expire_time: Some(timestamp(session.expires_at)),
        ip_address: session.ip_address.clone(),
        user_agent: session.user_agent.clone(),
        mfa_verified: session.mfa_verified,
    }
}

fn revocation_out(revocation: &Revocation) -> pb::Revocation {
    let kind = match revocation.kind {
        RevocationKind::Session => pb::RevocationKind::Session,
        RevocationKind::ApiKey => pb::RevocationKind::ApiKey,
        RevocationKind::User => pb::RevocationKind::User,
        RevocationKind::ServiceClient => pb::RevocationKind::ServiceClient,
    };
    pb::Revocation {
        kind: kind as i32,
        id: revocation.subject_id.clone(),
        tenant_id: revocation.tenant_id.to_string(),
        revoke_time: Some(timestamp(revocation.revoked_at)),
        expire_time: revocation.expires_at.map(timestamp),
    }
}

fn api_key_out(key: &ApiKeyRecord) -> pb::ApiKey {
    pb::ApiKey {
        id: key.id.to_string(),
        tenant_id: key.tenant_id.to_string(),
        name: key.name.clone(),
        prefix: key.prefix.clone(),
        roles: key.roles.clone(),
        creator_id: key.creator_id.clone(),
        create_time: Some(timestamp(key.created_at)),
        expire_time: key.expires_at.map(timestamp),
        last_used_time: key.last_used_at.map(timestamp),
        revoke_time: key.revoked_at.map(timestamp),
    }
}

fn ip_block_out(block: &IpBlock) -> pb::BlockedIp {
    pb::BlockedIp {
        cidr: block.cidr.clone(),
        tenant_id: if block.tenant_id == crate::ip_blocks::GLOBAL_BLOCKS {
            String::new()
        } else {
            block.tenant_id.to_string()
        },
        reason: block.reason.clone(),
        creator_id: block.creator_id.clone(),
        create_time: Some(timestamp(block.created_at)),
        expire_time: block.expires_at.map(timestamp),
    }
}

/// An optional tenant id: empty means none (the global block list).
fn optional_tenant(v: &mut Violations, value: &str) -> Option<Uuid> {
    (!value.is_empty()).then(|| v.uuid("tenant_id", value))
}

fn cidr_in(v: &mut Violations, value: &str) -> Option<Cidr> {
    if value.len() > MAX_CIDR_LEN {
        v.add("cidr", format!("must be at most {MAX_CIDR_LEN} characters"));
        return None;
    }
    Cidr::parse(value)
        .map_err(|err: CidrError| v.add("cidr", err.to_string()))
        .ok()
}

/// A page cursor that must be a UUID (the listings page by id).
fn uuid_cursor(page_token: &str) -> Result<Option<Uuid>, Status> {
    match decode_page_token(page_token)? {
        None => Ok(None),
        Some(cursor) => Ok(Some(
            Uuid::try_parse(&cursor).map_err(|_| page_token_error())?,
        )),
    }
}

/// The cursor a resume token carries (`r1.<sequence>`).
fn resume_token(seq: u64) -> String {
    format!("r1.{seq}")
}

fn parse_resume_token(token: &str) -> Option<u64> {
    token.strip_prefix("r1.")?.parse().ok()
}

type Sender = tokio::sync::mpsc::Sender<Result<pb::WatchRevocationsResponse, Status>>;

/// Sends the snapshot (no cursor, or one this database never issued: `reset`) or the
/// catch-up after `cursor`, ending with `caught_up`. Returns the new cursor, or `None` when
/// the stream is over.
async fn catch_up(auth: &Auth, tx: &Sender, cursor: Option<u64>) -> Option<u64> {
    let latest = match auth.latest_revocation().await {
        Ok(latest) => latest,
        Err(err) => {
            let _ = tx.send(Err(err.into())).await;
            return None;
        }
    };
    let (mut last, snapshot, mut reset) = match cursor {
        Some(seq) if seq <= latest => (seq, false, false),
        Some(_) => (0, true, true),
        None => (0, true, false),
    };
    while last < latest {
        let batch = match auth.revocations_after(last, STREAM_BATCH, snapshot).await {
            Ok(batch) => batch,
            Err(err) => {
                let _ = tx.send(Err(err.into())).await;
                return None;
            }
        };
        let batch: Vec<_> = batch.into_iter().filter(|r| r.seq <= latest).collect();
        let Some(newest) = batch.last().map(|r| r.seq) else {
            break;
        };
        last = newest;
        let message = pb::WatchRevocationsResponse {
            revocations: batch.iter().map(revocation_out).collect(),
            resume_token: resume_token(last),
            caught_up: false,
            reset,
        };
        reset = false;
        if tx.send(Ok(message)).await.is_err() {
            return None;
        }
    }
    // A snapshot skips expired entries: the cursor is the newest number handed out.
    let last = last.max(latest);
    let done = pb::WatchRevocationsResponse {
        revocations: Vec::new(),
        resume_token: resume_token(last),
        caught_up: true,
        reset,
    };
    tx.send(Ok(done)).await.ok()?;
    Some(last)
}

/// The audit record of a sign-in attempt: who (when known), from where, and how it ended.
fn sign_in_event(
    tenant: Uuid,
    outcome: &Result<SignInOutcome, crate::error::AuthError>,
    ip: std::net::IpAddr,
    user_agent: &str,
) -> penny_proto::audit::v1::AuditEvent {
    use penny_proto::audit::v1 as audit_pb;
    let (user, session, result, ended) = match outcome {
        Ok(SignInOutcome::SignedIn(s)) => (
            Some(s.session.user_id),
            Some(s.session.id),
            "signed_in",
            audit_pb::Outcome::Success,
        ),
        Ok(SignInOutcome::MustEnroll(s)) => (
            Some(s.session.user_id),
            Some(s.session.id),
            "mfa_enrollment_required",
            audit_pb::Outcome::Success,
        ),
        Ok(SignInOutcome::Challenge { .. }) => {
            (None, None, "mfa_challenge", audit_pb::Outcome::Success)
        }
        Err(crate::error::AuthError::InvalidCredentials) => (
            None,
            None,
            "invalid_credentials",
            audit_pb::Outcome::Failure,
        ),
        Err(crate::error::AuthError::IpBlocked) => {
            (None, None, "ip_blocked", audit_pb::Outcome::Denied)
        }
        Err(_) => (None, None, "error", audit_pb::Outcome::Failure),
    };
    sign_in_record(tenant, user, session, result, ended, ip, user_agent)
}

/// The audit record of a sign-in that is about to be checked.
fn sign_in_attempt(
    tenant: Uuid,
    ip: std::net::IpAddr,
    user_agent: &str,
) -> penny_proto::audit::v1::AuditEvent {
    use penny_proto::audit::v1 as audit_pb;
    sign_in_record(
        tenant,
        None,
        None,
        "attempt",
        audit_pb::Outcome::Attempted,
        ip,
        user_agent,
    )
}

fn sign_in_record(
    tenant: Uuid,
    user: Option<Uuid>,
    session: Option<Uuid>,
    result: &str,
    ended: penny_proto::audit::v1::Outcome,
    ip: std::net::IpAddr,
    user_agent: &str,
) -> penny_proto::audit::v1::AuditEvent {
    use penny_proto::audit::v1 as audit_pb;
    let now = time::OffsetDateTime::now_utc();
    audit_pb::AuditEvent {
        id: Uuid::now_v7().to_string(),
        tenant_id: tenant.to_string(),
        user_id: user.map(|u| u.to_string()).unwrap_or_default(),
        principal_kind: if user.is_some() {
            penny_proto::common::v1::PrincipalKind::User as i32
        } else {
            penny_proto::common::v1::PrincipalKind::Unspecified as i32
        },
        action: "auth.sign_in".into(),
        resource: "session".into(),
        resource_id: session.map(|s| s.to_string()).unwrap_or_default(),
        metadata: Some(audit_pb::RequestMetadata {
            method: "/penny.auth.v1.AuthService/Login".into(),
            ..Default::default()
        }),
        ip_address: ip.to_string(),
        user_agent: user_agent.to_owned(),
        event_time: Some(timestamp(now)),
        service: "auth".into(),
        outcome: ended as i32,
        attributes: [("result".to_owned(), result.to_owned())].into(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl AuthService for AuthGrpc {
    type WatchRevocationsStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchRevocationsResponse, Status>> + Send>>;

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let principal = caller(&request)?.clone();
        let credential = caller_credential(&request)?;
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        v.text("name", &request.name, 1, MAX_KEY_NAME_LEN);
        v.count("roles", request.roles.len(), 1, MAX_KEY_ROLES);
        for (i, role) in request.roles.iter().enumerate() {
            v.token(&format!("roles[{i}]"), role, MAX_ROLE_LEN);
            if request.roles[..i].contains(role) {
                v.add(format!("roles[{i}]"), "named twice");
            }
        }
        let now = OffsetDateTime::now_utc();
        let expires_at = match &request.expire_time {
            None => None,
            Some(t) => match OffsetDateTime::from_unix_timestamp(t.seconds) {
                Ok(at) if at > now && (0..1_000_000_000).contains(&t.nanos) => Some(at),
                _ => {
                    v.add("expire_time", "must be a valid time in the future");
                    None
                }
            },
        };
        v.finish()?;
        let (key, secret) = self
            .auth
            .create_api_key(
                &principal,
                &credential,
                NewApiKey {
                    tenant,
                    name: request.name,
                    roles: request.roles,
                    expires_at,
                },
            )
            .await?;
        tracing::info!(tenant = %tenant, key = %key.id, "API key created");
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(api_key_out(&key)),
            secret: secret.to_string(),
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        let size = page_size(&mut v, request.page_size, 100, 1000);
        v.finish()?;
        let after = uuid_cursor(&request.page_token)?;
        let mut keys = self
            .auth
            .list_api_keys(
                &principal,
                tenant,
                after,
                u64::from(size) + 1,
                request.show_inactive,
            )
            .await?;
        let more = keys.len() > size as usize;
        keys.truncate(size as usize);
        let next_page_token = match (more, keys.last()) {
            (true, Some(last)) => encode_page_token(&last.id.to_string()),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: keys.iter().map(api_key_out).collect(),
            next_page_token,
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        let id = v.uuid("api_key_id", &request.api_key_id);
        v.finish()?;
        let key = self.auth.revoke_api_key(&principal, tenant, id).await?;
        tracing::info!(tenant = %tenant, key = %key.id, "API key revoked");
        Ok(Response::new(pb::RevokeApiKeyResponse {
            api_key: Some(api_key_out(&key)),
        }))
    }

    async fn validate_api_key(
        &self,
        request: Request<pb::ValidateApiKeyRequest>,
    ) -> Result<Response<pb::ValidateApiKeyResponse>, Status> {
        let secret = Zeroizing::new(request.into_inner().secret);
        let mut v = Violations::new();
        // Never echo any of it: the length check names the field only.
        v.length("secret", &secret, 1, MAX_SECRET_LEN);
        v.finish()?;
        let key = self.auth.validate_api_key(&secret).await?;
        Ok(Response::new(pb::ValidateApiKeyResponse {
            principal: Some(pb::Principal {
                kind: penny_proto::common::v1::PrincipalKind::ApiKey as i32,
                id: key.id.to_string(),
                tenant_id: key.tenant_id.to_string(),
                roles: key.roles.clone(),
                session_id: String::new(),
                scopes: Vec::new(),
            }),
            expire_time: key.expires_at.map(timestamp),
        }))
    }

    async fn block_ip(
        &self,
        request: Request<pb::BlockIpRequest>,
    ) -> Result<Response<pb::BlockIpResponse>, Status> {
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let cidr = cidr_in(&mut v, &request.cidr);
        let tenant = optional_tenant(&mut v, &request.tenant_id);
        v.text("reason", &request.reason, 1, MAX_REASON_LEN);
        let duration = match &request.duration {
            None => None,
            Some(d) => match u64::try_from(d.seconds) {
                Ok(s) if (1..=MAX_BLOCK.as_secs()).contains(&s) && d.nanos >= 0 => {
                    Some(Duration::from_secs(s))
                }
                _ => {
                    v.add("duration", "must be 1 s..365 days");
                    None
                }
            },
        };
        v.finish()?;
        let Some(cidr) = cidr else {
            return Err(ApiError::invalid_field("cidr", "required").into());
        };
        let block = self
            .auth
            .block_ip(&principal, tenant, cidr, request.reason, duration)
            .await?;
        // The range is an address, personal data: its size only.
        tracing::warn!(tenant = ?tenant, prefix = %block.cidr.rsplit('/').next().unwrap_or(""), "address range blocked");
        Ok(Response::new(pb::BlockIpResponse {
            blocked_ip: Some(ip_block_out(&block)),
        }))
    }

    async fn unblock_ip(
        &self,
        request: Request<pb::UnblockIpRequest>,
    ) -> Result<Response<pb::UnblockIpResponse>, Status> {
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let cidr = cidr_in(&mut v, &request.cidr);
        let tenant = optional_tenant(&mut v, &request.tenant_id);
        v.finish()?;
        let Some(cidr) = cidr else {
            return Err(ApiError::invalid_field("cidr", "required").into());
        };
        self.auth.unblock_ip(&principal, tenant, cidr).await?;
        tracing::info!(tenant = ?tenant, "address range unblocked");
        Ok(Response::new(pb::UnblockIpResponse {}))
    }

    async fn list_blocked_ips(
        &self,
        request: Request<pb::ListBlockedIpsRequest>,
    ) -> Result<Response<pb::ListBlockedIpsResponse>, Status> {
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = optional_tenant(&mut v, &request.tenant_id);
        let size = page_size(&mut v, request.page_size, 100, 1000);
        v.finish()?;
        let after = decode_page_token(&request.page_token)?;
        let mut blocks = self
            .auth
            .list_ip_blocks(&principal, tenant, after.as_deref(), u64::from(size) + 1)
            .await?;
        let more = blocks.len() > size as usize;
        blocks.truncate(size as usize);
        let next_page_token = match (more, blocks.last()) {
            (true, Some(last)) => encode_page_token(&last.cidr),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListBlockedIpsResponse {
            blocked_ips: blocks.iter().map(ip_block_out).collect(),
            next_page_token,
        }))
    }

    async fn issue_service_token(
        &self,
        request: Request<pb::IssueServiceTokenRequest>,
    ) -> Result<Response<pb::IssueServiceTokenResponse>, Status> {
        let request = request.into_inner();
        let secret = Zeroizing::new(request.client_secret);
        let mut v = Violations::new();
        let client = v.uuid("client_id", &request.client_id);
        v.length("client_secret", &secret, 1, MAX_SECRET_LEN);
        v.count("scopes", request.scopes.len(), 0, 32);
        for (i, scope) in request.scopes.iter().enumerate() {
            v.length(&format!("scopes[{i}]"), scope, 1, 128);
        }
        v.finish()?;
        let issued = self
            .auth
            .issue_service_token(client, &secret, &request.scopes)
            .await?;
        Ok(Response::new(pb::IssueServiceTokenResponse {
            access_token: issued.access_token,
            token_type: "Bearer".into(),
            expire_time: Some(timestamp(issued.expires_at)),
            scopes: issued.scopes,
        }))
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let current = Zeroizing::new(request.current_password);
        let new_password = Zeroizing::new(request.new_password);
        let mut v = Violations::new();
        password_in(&mut v, "current_password", &current, true);
        password_in(&mut v, "new_password", &new_password, true);
        v.finish()?;
        let revoked_session_count = self
            .auth
            .change_password(
                &principal,
                &current,
                &new_password,
                request.revoke_other_sessions,
            )
            .await?;
        Ok(Response::new(pb::ChangePasswordResponse {
            revoked_session_count,
        }))
    }

    async fn introspect_token(
        &self,
        request: Request<pb::IntrospectTokenRequest>,
    ) -> Result<Response<pb::IntrospectTokenResponse>, Status> {
        let token = Zeroizing::new(request.into_inner().token);
        let mut v = Violations::new();
        v.length("token", &token, 1, MAX_JWT_LEN);
        v.finish()?;
        let Some(claims) = self.auth.introspect(&token).await? else {
            return Ok(Response::new(pb::IntrospectTokenResponse::default()));
        };
        let at = |secs: u64| {
            OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
                .ok()
                .map(timestamp)
        };
        let kind = match claims.kind {
            penny_platform::PrincipalKind::User => penny_proto::common::v1::PrincipalKind::User,
            penny_platform::PrincipalKind::ApiKey => penny_proto::common::v1::PrincipalKind::ApiKey,
            penny_platform::PrincipalKind::Service => {
                penny_proto::common::v1::PrincipalKind::Service
            }
        };
        Ok(Response::new(pb::IntrospectTokenResponse {
            active: true,
            principal: Some(pb::Principal {
                kind: kind as i32,
                id: claims.sub.clone(),
                tenant_id: claims.tenant_id.to_string(),
                roles: claims.roles.clone(),
                session_id: claims.sid.clone().unwrap_or_default(),
                scopes: claims
                    .scope
                    .as_deref()
                    .map(|s| s.split_whitespace().map(str::to_owned).collect())
                    .unwrap_or_default(),
            }),
            token_id: claims.jti.clone(),
            issue_time: at(claims.iat),
            expire_time: at(claims.exp),
        }))
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let principal = caller(&request)?;
        self.auth.logout(principal).await?;
        Ok(Response::new(pb::LogoutResponse {}))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        let user = v.uuid("user_id", &request.user_id);
        let size = page_size(&mut v, request.page_size, 100, 1000);
        v.finish()?;
        let after = uuid_cursor(&request.page_token)?;
        let mut sessions = self
            .auth
            .list_sessions(&principal, tenant, user, after, u64::from(size) + 1)
            .await?;
        let more = sessions.len() > size as usize;
        sessions.truncate(size as usize);
        let next_page_token = match (more, sessions.last()) {
            (true, Some(last)) => encode_page_token(&last.id.to_string()),
            _ => String::new(),
        };
        let current = principal.session_id.as_deref();
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: sessions.iter().map(|s| session_out(s, current)).collect(),
            next_page_token,
        }))
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        let target = match &request.target {
            Some(pb::revoke_session_request::Target::SessionId(id)) => {
                Some(RevokeTarget::Session(v.uuid("session_id", id)))
            }
            Some(pb::revoke_session_request::Target::UserId(id)) => {
                Some(RevokeTarget::User(v.uuid("user_id", id)))
            }
            None => {
                v.add("target", "one of session_id or user_id is required");
                None
            }
        };
        v.text("reason", &request.reason, 0, MAX_REASON_LEN);
        v.finish()?;
        let Some(target) = target else {
            return Err(ApiError::invalid_field("target", "required").into());
        };
        let revoked_count = self.auth.revoke(&principal, tenant, target).await?;
        tracing::info!(tenant = %tenant, revoked_count, "sessions revoked");
        Ok(Response::new(pb::RevokeSessionResponse { revoked_count }))
    }

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let mut draining = draining(&request);
        let token = request.into_inner().resume_token;
        let mut v = Violations::new();
        v.length("resume_token", &token, 0, MAX_RESUME_TOKEN_LEN);
        v.finish()?;
        let cursor = if token.is_empty() {
            None
        } else {
            Some(parse_resume_token(&token).ok_or_else(|| {
                ApiError::new(
                    tonic::Code::InvalidArgument,
                    Reason::InvalidArgument,
                    "resume_token is not a token this service issued",
                )
            })?)
        };
        let auth = self.auth.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let Some(mut last) = catch_up(&auth, &tx, cursor).await else {
                return;
            };
            let mut next_heartbeat = tokio::time::Instant::now() + HEARTBEAT;
            loop {
                tokio::select! {
                    () = auth.revoked() => {}
                    () = tokio::time::sleep(STREAM_POLL) => {}
                    () = tx.closed() => return,
                    // The server is shutting down: end the stream; followers reconnect.
                    () = draining.started() => return,
                }
                let batch = match auth.revocations_after(last, STREAM_BATCH, false).await {
                    Ok(batch) => batch,
                    Err(err) => {
                        let _ = tx.send(Err(err.into())).await;
                        return;
                    }
                };
                let message = match batch.last() {
                    Some(newest) => {
                        last = newest.seq;
                        pb::WatchRevocationsResponse {
                            revocations: batch.iter().map(revocation_out).collect(),
                            resume_token: resume_token(last),
                            ..Default::default()
                        }
                    }
                    None if tokio::time::Instant::now() >= next_heartbeat => {
                        pb::WatchRevocationsResponse {
                            resume_token: resume_token(last),
                            ..Default::default()
                        }
                    }
                    None => continue,
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
                next_heartbeat = tokio::time::Instant::now() + HEARTBEAT;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn set_password(
        &self,
        request: Request<pb::SetPasswordRequest>,
    ) -> Result<Response<pb::SetPasswordResponse>, Status> {
        let request = request.into_inner();
        let new_password = Zeroizing::new(request.new_password);
        let mut v = Violations::new();
        match request.grant {
            Some(pb::set_password_request::Grant::Token(token)) => {
                v.length("token", &token, 1, MAX_TOKEN_LEN);
                password_in(&mut v, "new_password", &new_password, true);
                v.finish()?;
                let (tenant, user) = self
                    .auth
                    .set_password_with_token(&token, &new_password)
                    .await?;
                Ok(Response::new(pb::SetPasswordResponse {
                    tenant_id: tenant.to_string(),
                    user_id: user.to_string(),
                    ..Default::default()
                }))
            }
            Some(pb::set_password_request::Grant::User(user)) => {
                let tenant = v.uuid("user.tenant_id", &user.tenant_id);
                let user_id = v.uuid("user.user_id", &user.user_id);
                password_in(&mut v, "new_password", &new_password, false);
                let ttl = match request.token_ttl {
                    None => DEFAULT_RESET_TTL,
                    Some(d) => match u64::try_from(d.seconds) {
                        Ok(s) if (1..=MAX_RESET_TTL.as_secs()).contains(&s) && d.nanos >= 0 => {
                            Duration::from_secs(s)
                        }
                        _ => {
                            v.add("token_ttl", "must be 1 s..7 days");
                            DEFAULT_RESET_TTL
                        }
                    },
                };
                v.finish()?;
                if new_password.is_empty() {
                    let (token, expires) = self
                        .auth
                        .mint_set_password_token(tenant, user_id, ttl)
                        .await?;
                    Ok(Response::new(pb::SetPasswordResponse {
                        tenant_id: tenant.to_string(),
                        user_id: user_id.to_string(),
                        set_password_token: token,
                        set_password_token_expire_time: Some(timestamp(expires)),
                    }))
                } else {
                    self.auth
                        .set_password_directly(
                            tenant,
                            user_id,
                            &new_password,
                            request.revoke_sessions,
                        )
                        .await?;
                    Ok(Response::new(pb::SetPasswordResponse {
                        tenant_id: tenant.to_string(),
                        user_id: user_id.to_string(),
                        ..Default::default()
                    }))
                }
            }
            None => {
                v.add("grant", "one of token or user is required");
                v.finish()?;
                Err(Status::invalid_argument("grant"))
            }
        }
    }

    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let request = request.into_inner();
        let password = Zeroizing::new(request.password);
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        v.length("email", &request.email, 3, 254);
        password_in(&mut v, "password", &password, true);
        let ip = ip_in(&mut v, &request.ip_address);
        v.text("user_agent", &request.user_agent, 0, MAX_USER_AGENT_LEN);
        v.finish()?;
        let Some(ip) = ip else {
            return Err(Status::invalid_argument("ip_address"));
        };
        let user_agent = request.user_agent.clone();
        // The attempt is stored before anything is checked, so no session is ever made
        // unaudited; how it ended is stored before it is answered. Either failing fails
        // the sign-in closed.
        let attempt = match &self.auth.audit {
            Some(audit) => {
                let attempt = sign_in_attempt(tenant, ip, &user_agent);
                let id = attempt.id.clone();
                audit.record_critical(attempt).await?;
                Some(id)
            }
            None => None,
        };
        let signed_in = self
            .auth
            .login(LoginAttempt {
                tenant,
                email: request.email,
                password,
                ip,
                user_agent: request.user_agent,
            })
            .await;
        if let Some(audit) = &self.auth.audit {
            let mut event = sign_in_event(tenant, &signed_in, ip, &user_agent);
            if let Some(attempt) = attempt {
                event.attributes.insert("attempt_id".to_owned(), attempt);
            }
            audit.record_critical(event).await?;
        }
        let result = match signed_in? {
            SignInOutcome::SignedIn(signed_in) => {
                pb::login_response::Result::Tokens(tokens_out(signed_in, &[]))
            }
            SignInOutcome::Challenge {
                challenge,
                expires_at,
            } => pb::login_response::Result::MfaChallenge(pb::MfaChallenge {
                challenge_token: challenge,
                expire_time: Some(timestamp(expires_at)),
            }),
            SignInOutcome::MustEnroll(signed_in) => pb::login_response::Result::MfaEnrollmentToken(
                tokens_out(signed_in, &[ENROLL_SCOPE]),
            ),
        };
        Ok(Response::new(pb::LoginResponse {
            result: Some(result),
        }))
    }

    async fn enroll_mfa(
        &self,
        request: Request<pb::EnrollMfaRequest>,
    ) -> Result<Response<pb::EnrollMfaResponse>, Status> {
        let principal = caller(&request)?.clone();
        let audited = self
            .critical(&principal, "/penny.auth.v1.AuthService/EnrollMfa")
            .await?;
        let enrolment = self.auth.enroll_mfa(&principal).await.map_err(Status::from);
        audited.finish(&enrolment, &[]);
        let enrolment = enrolment?;
        Ok(Response::new(pb::EnrollMfaResponse {
            secret: enrolment.secret.to_string(),
            otpauth_uri: enrolment.uri.to_string(),
            qr_code_png: enrolment.qr_png,
            expire_time: Some(timestamp(enrolment.expires_at)),
        }))
    }

    async fn confirm_mfa(
        &self,
        request: Request<pb::ConfirmMfaRequest>,
    ) -> Result<Response<pb::ConfirmMfaResponse>, Status> {
        let principal = caller(&request)?.clone();
        let code = Zeroizing::new(request.into_inner().totp_code);
        let mut v = Violations::new();
        v.length("totp_code", &code, 1, MAX_CODE_LEN);
        v.finish()?;
        let audited = self
            .critical(&principal, "/penny.auth.v1.AuthService/ConfirmMfa")
            .await?;
        let confirmed = self
            .auth
            .confirm_mfa(&principal, &code)
            .await
            .map_err(Status::from);
        audited.finish(&confirmed, &[]);
        let (codes, upgraded) = confirmed?;
        tracing::info!(tenant = %principal.tenant_id, "MFA activated");
        Ok(Response::new(pb::ConfirmMfaResponse {
            recovery_codes: codes.iter().map(|c| c.to_string()).collect(),
            tokens: upgraded.map(|signed_in| tokens_out(signed_in, &[])),
        }))
    }

    async fn verify_mfa(
        &self,
        request: Request<pb::VerifyMfaRequest>,
    ) -> Result<Response<pb::VerifyMfaResponse>, Status> {
        let request = request.into_inner();
        let challenge = Zeroizing::new(request.challenge_token);
        let mut v = Violations::new();
        v.length("challenge_token", &challenge, 1, MAX_TOKEN_LEN);
        let proof = match request.code {
            Some(pb::verify_mfa_request::Code::TotpCode(code)) => {
                v.length("totp_code", &code, 1, MAX_CODE_LEN);
                Some(Proof::Totp(Zeroizing::new(code)))
            }
            Some(pb::verify_mfa_request::Code::RecoveryCode(code)) => {
                v.length("recovery_code", &code, 1, MAX_CODE_LEN);
                Some(Proof::Recovery(Zeroizing::new(code)))
            }
            None => {
                v.add("code", "one of totp_code or recovery_code is required");
                None
            }
        };
        let ip = ip_in(&mut v, &request.ip_address);
        v.text("user_agent", &request.user_agent, 0, MAX_USER_AGENT_LEN);
        v.finish()?;
        let (Some(proof), Some(ip)) = (proof, ip) else {
            return Err(ApiError::invalid_field("code", "required").into());
        };
        let (signed_in, left) = self
            .auth
            .verify_mfa(&challenge, proof, ip, request.user_agent)
            .await?;
        Ok(Response::new(pb::VerifyMfaResponse {
            tokens: Some(tokens_out(signed_in, &[])),
            recovery_codes_remaining: left,
        }))
    }

    async fn disable_mfa(
        &self,
        request: Request<pb::DisableMfaRequest>,
    ) -> Result<Response<pb::DisableMfaResponse>, Status> {
        let principal = caller(&request)?.clone();
        let mut v = Violations::new();
        let proof = match request.into_inner().proof {
            Some(pb::disable_mfa_request::Proof::TotpCode(code)) => {
                v.length("totp_code", &code, 1, MAX_CODE_LEN);
                Some(Proof::Totp(Zeroizing::new(code)))
            }
            Some(pb::disable_mfa_request::Proof::RecoveryCode(code)) => {
                v.length("recovery_code", &code, 1, MAX_CODE_LEN);
                Some(Proof::Recovery(Zeroizing::new(code)))
            }
            Some(pb::disable_mfa_request::Proof::Password(password)) => {
                password_in(&mut v, "password", &password, true);
                Some(Proof::Password(Zeroizing::new(password)))
            }
            None => {
                v.add(
                    "proof",
                    "one of totp_code, recovery_code or password is required",
                );
                None
            }
        };
        v.finish()?;
        let Some(proof) = proof else {
            return Err(ApiError::invalid_field("proof", "required").into());
        };
        let audited = self
            .critical(&principal, "/penny.auth.v1.AuthService/DisableMfa")
            .await?;
        let disabled = self
            .auth
            .disable_mfa(&principal, proof)
            .await
            .map_err(Status::from);
        audited.finish(&disabled, &[]);
        disabled?;
        tracing::info!(tenant = %principal.tenant_id, "MFA switched off");
        Ok(Response::new(pb::DisableMfaResponse {}))
    }

    async fn get_jwks(
        &self,
        _request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        // An empty set would make every follower forget auth's keys: a replica that has
        // not loaded its keys yet says so instead.
        if !self.auth.keys_loaded() {
            return Err(ApiError::unavailable(
                Reason::DependencyUnavailable,
                "the signing keys are not loaded yet; retry later",
                Duration::from_secs(1),
            )
            .into());
        }
        let keys = self
            .auth
            .jwks()
            .keys
            .into_iter()
            .map(|k| pb::Jwk {
                kty: k.kty,
                crv: k.crv,
                x: k.x,
                kid: k.kid,
                alg: k.alg,
                r#use: k.use_,
            })
            .collect();
        Ok(Response::new(pb::GetJwksResponse {
            keys,
            max_age: Some(prost_types::Duration {
                seconds: i64::try_from(JWKS_MAX_AGE.as_secs()).unwrap_or(300),
                nanos: 0,
            }),
        }))
    }
}
