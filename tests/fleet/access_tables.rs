//! Every RPC of every implemented service has an access rule, and a tenant `viewer` calling
//! each of them gets exactly what the table says: refused wherever the table asks for more.

use std::time::Duration;

use bytes::{Buf, BufMut};
use penny_platform::principal::PrincipalKind as TokenKind;
use penny_platform::signing::TokenGrant;
use penny_platform::{AccessPolicy, Requirement};
use penny_proto::authz::v1 as authz_pb;
use penny_proto::authz::v1::authz_service_client::AuthzServiceClient;
use penny_proto::common::v1::PrincipalKind;
use penny_tests::{TestFleet, with_token};
use prost::Message;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use uuid::Uuid;

/// Sends and receives raw protobuf bytes, so any RPC can be called with an empty message.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug, Clone, Default)]
struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

struct Method {
    path: String,
    server_streaming: bool,
    client_streaming: bool,
}

/// The methods of a service, from the descriptor set the fleet publishes.
fn methods(service: &str) -> Vec<Method> {
    let set = prost_types::FileDescriptorSet::decode(penny_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut found = Vec::new();
    for file in &set.file {
        for svc in &file.service {
            let full = format!("{}.{}", file.package(), svc.name());
            if full != service {
                continue;
            }
            for method in &svc.method {
                found.push(Method {
                    path: format!("/{full}/{}", method.name()),
                    server_streaming: method.server_streaming(),
                    client_streaming: method.client_streaming(),
                });
            }
        }
    }
    assert!(!found.is_empty(), "{service} is not in the descriptor set");
    found
}

/// The permissions of the built-in `viewer` role.
const VIEWER_GRANTS: [&str; 3] = ["conversation:read", "message:read", "file:read"];

async fn call(channel: Channel, method: &Method, token: &str) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let path: http::uri::PathAndQuery = method.path.parse().unwrap();
    let request = with_token(Vec::<u8>::new(), token);
    if method.server_streaming {
        let mut stream = grpc
            .server_streaming(request, path, RawCodec)
            .await?
            .into_inner();
        // The first message proves the call was admitted.
        let first = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
        match first {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(status),
            Err(_) => Ok(()),
        }
    } else if method.client_streaming {
        // One empty message, then the end of the stream.
        let request = with_token(tokio_stream::iter([Vec::<u8>::new()]), token);
        grpc.client_streaming(request, path, RawCodec)
            .await
            .map(drop)
    } else {
        grpc.unary(request, path, RawCodec).await.map(drop)
    }
}

fn check_table(service: &str, policy: &AccessPolicy) -> Vec<(Method, Requirement)> {
    methods(service)
        .into_iter()
        .map(|m| {
            let requirement = policy
                .requirement(&m.path)
                .unwrap_or_else(|| panic!("{} has no access rule", m.path));
            (m, requirement)
        })
        .collect()
}

#[tokio::test]
async fn every_rpc_has_a_rule_and_a_viewer_gets_no_more_than_it_allows() {
    let fleet = TestFleet::builder()
        .with_auth()
        .with_audit()
        .with_files()
        .start()
        .await;
    let tenant = Uuid::new_v4();
    let viewer = fleet.token(&TokenGrant {
        subject: "vera".into(),
        tenant_id: tenant,
        roles: vec!["viewer".into()],
        kind: TokenKind::User,
        session_id: None,
        lifetime: Duration::from_secs(600),
    });
    AuthzServiceClient::new(fleet.authz().server.channel().await)
        .grant_role(with_token(
            authz_pb::GrantRoleRequest {
                tenant_id: tenant.to_string(),
                subject: Some(authz_pb::Subject {
                    kind: PrincipalKind::User as i32,
                    id: "vera".into(),
                    tenant_id: tenant.to_string(),
                }),
                role: "viewer".into(),
                workspace_id: String::new(),
            },
            &fleet.service_token(),
        ))
        .await
        .unwrap();

    let services = [
        (
            penny_keys::SERVICE_NAME,
            penny_keys::access_policy(),
            fleet.keys().server.channel().await,
        ),
        (
            penny_authz::SERVICE_NAME,
            penny_authz::access_policy(),
            fleet.authz().server.channel().await,
        ),
        (
            penny_tenants::SERVICE_NAME,
            penny_tenants::access_policy(),
            fleet.tenants().server.channel().await,
        ),
        (
            penny_auth::SERVICE_NAME,
            penny_auth::access_policy(),
            fleet.auth().server.channel().await,
        ),
        (
            penny_audit::SERVICE_NAME,
            penny_audit::access_policy(),
            fleet.audit().server.channel().await,
        ),
        (
            penny_files::SERVICE_NAME,
            penny_files::access_policy(),
            fleet.files().server.channel().await,
        ),
    ];
    let mut called = 0;
    for (service, policy, channel) in services {
        for (method, requirement) in check_table(service, &policy) {
            let result = call(channel.clone(), &method, &viewer).await;
            called += 1;
            match requirement {
                Requirement::Public => {}
                // What the viewer role grants (`file:read`): admitted, and the handler
                // refuses the empty request.
                Requirement::Permission(permission) if VIEWER_GRANTS.contains(&permission) => {
                    let status = result.expect_err(&method.path);
                    assert_eq!(
                        status.code(),
                        Code::InvalidArgument,
                        "{}: {status:?}",
                        method.path
                    );
                }
                Requirement::ServiceOrAdmin
                | Requirement::Service
                | Requirement::PlatformAdmin
                | Requirement::Permission(_) => {
                    let status = result.expect_err(&method.path);
                    assert_eq!(
                        status.code(),
                        Code::PermissionDenied,
                        "{}: {status:?}",
                        method.path
                    );
                }
                Requirement::Enrollment => {
                    // Acting on the caller's own session or enrolment (Logout, EnrollMfa,
                    // ConfirmMfa): this test token's subject is no user id, so there is
                    // nothing to act on, or the empty request is invalid.
                    let status = result.expect_err(&method.path);
                    assert!(
                        matches!(
                            status.code(),
                            Code::FailedPrecondition | Code::InvalidArgument
                        ),
                        "{}: {status:?}",
                        method.path
                    );
                }
                Requirement::Authenticated => {
                    // Admitted by the stack; the handler decides, and an empty request is
                    // never something a viewer may do.
                    let status = result.expect_err(&method.path);
                    assert!(
                        matches!(
                            status.code(),
                            Code::InvalidArgument | Code::PermissionDenied | Code::NotFound
                        ),
                        "{}: {status:?}",
                        method.path
                    );
                }
            }
        }
    }
    assert_eq!(called, 10 + 12 + 13 + 21 + 9 + 8);
}

#[tokio::test]
async fn access_tables_name_exactly_the_rpcs_that_exist() {
    // An RPC without a rule is refused (the echo service's `Unlisted`, in the platform
    // tests); here every real service's table is checked against its descriptor, both
    // ways, so no RPC is left to that default by accident and no rule names a ghost.
    for (service, policy) in [
        (penny_keys::SERVICE_NAME, penny_keys::access_policy()),
        (penny_authz::SERVICE_NAME, penny_authz::access_policy()),
        (penny_tenants::SERVICE_NAME, penny_tenants::access_policy()),
        (penny_auth::SERVICE_NAME, penny_auth::access_policy()),
        (penny_audit::SERVICE_NAME, penny_audit::access_policy()),
        (penny_files::SERVICE_NAME, penny_files::access_policy()),
    ] {
        let table = check_table(service, &policy);
        let listed: Vec<&str> = policy
            .paths()
            .filter(|p| p.starts_with(&format!("/{service}/")))
            .collect();
        assert_eq!(
            listed.len(),
            table.len(),
            "{service}: rules for RPCs that do not exist"
        );
    }
}
