//! The gRPC face of the auth service: decode, validate, call the domain, map errors. Thin.

use std::net::IpAddr;
use std::time::Duration;

use penny_platform::validate::Violations;
use penny_platform::{AccessPolicy, Requirement, ServeConfig, ServiceBundle};
use penny_proto::auth::v1 as pb;
use penny_proto::auth::v1::auth_service_server::{AuthService, AuthServiceServer};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::SERVICE_NAME;
use crate::domain::password::MAX_CHARS;
use crate::service::{Auth, DEFAULT_RESET_TTL, LoginAttempt, MAX_RESET_TTL};

/// How long verifiers may cache the JWKS.
const JWKS_MAX_AGE: Duration = Duration::from_secs(300);
/// Longest set-password token accepted.
const MAX_TOKEN_LEN: usize = 512;
/// Longest user agent.
const MAX_USER_AGENT_LEN: usize = 512;

/// Login and SetPassword are called by a trusted front-end service on behalf of an end user
/// (or by platform staff); the JWKS is public.
pub(crate) fn policy() -> AccessPolicy {
    use Requirement::{Public, ServiceOrAdmin};
    [
        ("SetPassword", ServiceOrAdmin),
        ("Login", ServiceOrAdmin),
        ("GetJwks", Public),
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

fn timestamp(at: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.unix_timestamp(),
        nanos: i32::try_from(at.nanosecond()).unwrap_or(0),
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

#[tonic::async_trait]
impl AuthService for AuthGrpc {
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
        let ip = match request.ip_address.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                v.add(
                    "ip_address",
                    "required: the end user's IPv4 or IPv6 address",
                );
                None
            }
        };
        v.text("user_agent", &request.user_agent, 0, MAX_USER_AGENT_LEN);
        v.finish()?;
        let Some(ip) = ip else {
            return Err(Status::invalid_argument("ip_address"));
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
            .await?;
        let session = &signed_in.session;
        Ok(Response::new(pb::LoginResponse {
            result: Some(pb::login_response::Result::Tokens(pb::Tokens {
                access_token: signed_in.access_token,
                token_type: "Bearer".into(),
                expire_time: Some(timestamp(session.expires_at)),
                session_id: session.id.to_string(),
                user_id: session.user_id.to_string(),
                tenant_id: session.tenant_id.to_string(),
                scopes: Vec::new(),
            })),
        }))
    }

    async fn get_jwks(
        &self,
        _request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
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
