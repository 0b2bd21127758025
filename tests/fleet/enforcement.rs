//! Permission requirements in the standard stack, decided by the authz service: allowed
//! with a role, denied without, scoped to the caller's tenant, revoked within 2 s, and
//! refused (UNAVAILABLE) when authz cannot answer.

use std::time::Duration;

use penny_platform::principal::PrincipalKind as TokenKind;
use penny_platform::signing::TokenGrant;
use penny_proto::authz::v1 as authz_pb;
use penny_proto::authz::v1::authz_service_client::AuthzServiceClient;
use penny_proto::common::v1::PrincipalKind;
use penny_tests::echo::pb::ReadMessagesRequest;
use penny_tests::echo::pb::echo_service_client::EchoServiceClient;
use penny_tests::{TestFleet, assert_eventually, with_token};
use tonic::Code;
use uuid::Uuid;

fn user_token(fleet: &TestFleet, tenant: Uuid, id: &str) -> String {
    fleet.token(&TokenGrant {
        subject: id.into(),
        tenant_id: tenant,
        // Roles in the token count for nothing here: authz's bindings decide.
        roles: vec!["owner".into(), "member".into()],
        kind: TokenKind::User,
        session_id: None,
        lifetime: Duration::from_secs(600),
    })
}

fn subject(tenant: Uuid, id: &str) -> authz_pb::Subject {
    authz_pb::Subject {
        kind: PrincipalKind::User as i32,
        id: id.into(),
        tenant_id: tenant.to_string(),
    }
}

fn read(tenant: Uuid) -> ReadMessagesRequest {
    ReadMessagesRequest {
        tenant_id: tenant.to_string(),
    }
}

#[tokio::test]
async fn permissions_come_from_authz_and_revocation_reaches_the_service() {
    let fleet = TestFleet::builder().with_authz().with_echo().start().await;
    let mut echo = EchoServiceClient::new(fleet.echo().channel().await);
    let mut authz = AuthzServiceClient::new(fleet.authz().server.channel().await);
    let service = fleet.service_token();
    let (tenant, other) = (Uuid::new_v4(), Uuid::new_v4());
    let token = user_token(&fleet, tenant, "alice");

    // No binding: the roles claimed in the token do not help.
    let status = echo
        .read_messages(with_token(read(tenant), &token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    authz
        .grant_role(with_token(
            authz_pb::GrantRoleRequest {
                tenant_id: tenant.to_string(),
                subject: Some(subject(tenant, "alice")),
                role: "viewer".into(),
                workspace_id: String::new(),
            },
            &service,
        ))
        .await
        .unwrap();
    assert_eventually!(
        Duration::from_secs(2),
        echo.read_messages(with_token(read(tenant), &token))
            .await
            .is_ok()
    );
    // Another tenant's id: as if nothing were there.
    let status = echo
        .read_messages(with_token(read(other), &token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    authz
        .revoke_role(with_token(
            authz_pb::RevokeRoleRequest {
                tenant_id: tenant.to_string(),
                subject: Some(subject(tenant, "alice")),
                role: "viewer".into(),
                workspace_id: String::new(),
            },
            &service,
        ))
        .await
        .unwrap();
    assert_eventually!(Duration::from_secs(2), {
        matches!(
            echo.read_messages(with_token(read(tenant), &token)).await,
            Err(status) if status.code() == Code::PermissionDenied
        )
    });
}

#[tokio::test]
async fn services_and_staff_pass_and_an_unreachable_authz_fails_closed() {
    let mut fleet = TestFleet::builder().with_authz().with_echo().start().await;
    let mut echo = EchoServiceClient::new(fleet.echo().channel().await);
    let tenant = Uuid::new_v4();
    echo.read_messages(with_token(read(tenant), &fleet.service_token()))
        .await
        .unwrap();
    echo.read_messages(with_token(read(tenant), &fleet.admin_token()))
        .await
        .unwrap();

    let token = user_token(&fleet, tenant, "bob");
    fleet
        .authz
        .as_mut()
        .unwrap()
        .server
        .shutdown()
        .await
        .unwrap();
    assert_eventually!(Duration::from_secs(5), {
        matches!(
            echo.read_messages(with_token(read(tenant), &token)).await,
            Err(status) if status.code() == Code::Unavailable
        )
    });
}

#[tokio::test]
async fn without_an_authorizer_permission_requirements_are_refused() {
    let fleet = TestFleet::builder().with_echo().start().await;
    let mut echo = EchoServiceClient::new(fleet.echo().channel().await);
    let tenant = Uuid::new_v4();
    let status = echo
        .read_messages(with_token(
            read(tenant),
            &user_token(&fleet, tenant, "carol"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

/// Behind a balancer over two authz replicas, a revocation made through one of them is
/// enforced within 2 s and stays enforced: no lookup answered by the replica that had not yet
/// applied it brings the old decision back into the cache.
#[tokio::test]
async fn a_revocation_stays_revoked_behind_two_authz_replicas() {
    let fleet = TestFleet::builder()
        .with_two_authz_replicas()
        .with_echo()
        .start()
        .await;
    let mut echo = EchoServiceClient::new(fleet.echo().channel().await);
    let mut authz = AuthzServiceClient::new(fleet.authz().server.channel().await);
    let service = fleet.service_token();
    let tenant = Uuid::new_v4();
    let token = user_token(&fleet, tenant, "dora");
    let binding = || authz_pb::GrantRoleRequest {
        tenant_id: tenant.to_string(),
        subject: Some(subject(tenant, "dora")),
        role: "viewer".into(),
        workspace_id: String::new(),
    };
    authz
        .grant_role(with_token(binding(), &service))
        .await
        .unwrap();
    assert_eventually!(
        Duration::from_secs(2),
        echo.read_messages(with_token(read(tenant), &token))
            .await
            .is_ok()
    );
    authz
        .revoke_role(with_token(
            authz_pb::RevokeRoleRequest {
                tenant_id: tenant.to_string(),
                subject: Some(subject(tenant, "dora")),
                role: "viewer".into(),
                workspace_id: String::new(),
            },
            &service,
        ))
        .await
        .unwrap();
    assert_eventually!(Duration::from_secs(2), {
        matches!(
            echo.read_messages(with_token(read(tenant), &token)).await,
            Err(status) if status.code() == Code::PermissionDenied
        )
    });
    // Once refused, refused: 200 more calls over both replicas, none allowed.
    for _ in 0..200 {
        let status = echo
            .read_messages(with_token(read(tenant), &token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
}
