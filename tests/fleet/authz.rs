//! AuthzService through gRPC: built-in roles, the tenant boundary, escalation, custom
//! roles, the change feed, and replicas sharing one database.

use std::time::Duration;

use penny_platform::principal::{PLATFORM_TENANT_ID, PrincipalKind as TokenKind};
use penny_platform::signing::TokenGrant;
use penny_proto::authz::v1 as pb;
use penny_proto::authz::v1::authz_service_client::AuthzServiceClient;
use penny_proto::common::v1::PrincipalKind;
use penny_tests::{TestFleet, assert_eventually, error_reason as reason, with_token};
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

struct Harness {
    fleet: TestFleet,
    client: AuthzServiceClient<Channel>,
    service: String,
    admin: String,
}

/// A user of a tenant, with a token naming it.
struct User {
    id: String,
    tenant: Uuid,
    token: String,
}

impl User {
    fn subject(&self) -> pb::Subject {
        pb::Subject {
            kind: PrincipalKind::User as i32,
            id: self.id.clone(),
            tenant_id: self.tenant.to_string(),
        }
    }
}

impl Harness {
    async fn start() -> Self {
        let fleet = TestFleet::builder().with_authz().start().await;
        let client = AuthzServiceClient::new(fleet.authz().server.channel().await);
        let service = fleet.service_token();
        let admin = fleet.admin_token();
        Self {
            fleet,
            client,
            service,
            admin,
        }
    }

    fn user(&self, tenant: Uuid) -> User {
        let id = format!("user-{}", Uuid::new_v4());
        let token = self.fleet.token(&TokenGrant {
            subject: id.clone(),
            tenant_id: tenant,
            roles: vec![],
            kind: TokenKind::User,
            session_id: Some(Uuid::new_v4().to_string()),
            lifetime: Duration::from_secs(600),
        });
        User { id, tenant, token }
    }

    async fn grant(
        &mut self,
        token: &str,
        tenant: Uuid,
        who: &User,
        role: &str,
    ) -> Result<pb::GrantRoleResponse, tonic::Status> {
        self.client
            .grant_role(with_token(
                pb::GrantRoleRequest {
                    tenant_id: tenant.to_string(),
                    subject: Some(who.subject()),
                    role: role.into(),
                    workspace_id: String::new(),
                },
                token,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn check(&mut self, tenant: Uuid, who: &User, permission: &str) -> bool {
        self.client
            .check(with_token(
                pb::CheckRequest {
                    tenant_id: tenant.to_string(),
                    subject: Some(who.subject()),
                    permission: permission.into(),
                    workspace_id: String::new(),
                    min_revision: 0,
                },
                &self.service,
            ))
            .await
            .unwrap()
            .into_inner()
            .allowed
    }
}

#[tokio::test]
async fn built_in_roles_decide_as_the_guide_lists_them() {
    let mut h = Harness::start().await;
    let tenant = Uuid::new_v4();
    let (owner, member, viewer, nobody) = (
        h.user(tenant),
        h.user(tenant),
        h.user(tenant),
        h.user(tenant),
    );
    let service = h.service.clone();
    h.grant(&service, tenant, &owner, "owner").await.unwrap();
    h.grant(&service, tenant, &member, "member").await.unwrap();
    h.grant(&service, tenant, &viewer, "viewer").await.unwrap();

    for (who, permission, expected) in [
        (&owner, "tenant:update", true),
        (&owner, "user:invite", true),
        (&owner, "billing:read", true),
        (&owner, "conversation:read", false),
        (&member, "conversation:delete", true),
        (&member, "file:upload", true),
        (&member, "tool:execute", true),
        (&member, "file:read", false),
        (&viewer, "message:read", true),
        (&viewer, "message:write", false),
        (&nobody, "message:read", false),
    ] {
        assert_eq!(
            h.check(tenant, who, permission).await,
            expected,
            "{} {permission}",
            who.id
        );
    }
}

#[tokio::test]
async fn the_tenant_boundary_comes_before_any_role() {
    let mut h = Harness::start().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let owner_a = h.user(a);
    let service = h.service.clone();
    h.grant(&service, a, &owner_a, "owner").await.unwrap();
    assert!(h.check(a, &owner_a, "user:invite").await);
    // The same subject asked about tenant B: refused, and Explain says why.
    assert!(!h.check(b, &owner_a, "user:invite").await);
    let explain = h
        .client
        .explain(with_token(
            pb::ExplainRequest {
                tenant_id: b.to_string(),
                subject: Some(owner_a.subject()),
                permission: "user:invite".into(),
                workspace_id: String::new(),
            },
            &h.service,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!explain.allowed);
    assert_eq!(explain.deny_reason, pb::DenyReason::TenantMismatch as i32);
    // Binding a subject of tenant A inside tenant B is refused outright.
    let status = h.grant(&service, b, &owner_a, "viewer").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // Owner of A managing B's roles learns nothing about B.
    let stranger = h.user(b);
    let status = h
        .grant(&owner_a.token, b, &stranger, "viewer")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn explain_names_the_matching_binding_role_and_permission() {
    let mut h = Harness::start().await;
    let tenant = Uuid::new_v4();
    let member = h.user(tenant);
    let service = h.service.clone();
    h.grant(&service, tenant, &member, "member").await.unwrap();
    let explain = h
        .client
        .explain(with_token(
            pb::ExplainRequest {
                tenant_id: tenant.to_string(),
                subject: Some(member.subject()),
                permission: "message:write".into(),
                workspace_id: String::new(),
            },
            &h.service,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(explain.allowed);
    let matched = explain.r#match.unwrap();
    assert_eq!(matched.role.unwrap().name, "member");
    assert_eq!(matched.permission, "message:*");
    assert_eq!(matched.role_binding.unwrap().subject.unwrap().id, member.id);
}

#[tokio::test]
async fn nobody_grants_what_they_do_not_hold() {
    let mut h = Harness::start().await;
    let tenant = Uuid::new_v4();
    let (owner, viewer, target) = (h.user(tenant), h.user(tenant), h.user(tenant));
    let service = h.service.clone();
    h.grant(&service, tenant, &owner, "owner").await.unwrap();
    h.grant(&service, tenant, &viewer, "viewer").await.unwrap();

    // An owner may make another owner: a privilege change, flagged.
    let granted = h
        .grant(&owner.token, tenant, &target, "owner")
        .await
        .unwrap();
    assert!(granted.created);
    assert!(granted.privilege_change);
    // ...but not hand out member, whose conversation:* it does not hold.
    let status = h
        .grant(&owner.token, tenant, &target, "member")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "PRIVILEGE_ESCALATION");
    // Nobody grants admin in a customer tenant, not even a service or platform staff.
    for token in [owner.token.clone(), h.service.clone(), h.admin.clone()] {
        let status = h.grant(&token, tenant, &target, "admin").await.unwrap_err();
        assert_eq!(reason(&status), "PRIVILEGE_ESCALATION");
    }
    // A viewer may not grant at all.
    let status = h
        .grant(&viewer.token, tenant, &target, "viewer")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Platform staff may grant admin in the platform tenant.
    let staff = h.user(PLATFORM_TENANT_ID);
    let admin = h.admin.clone();
    assert!(
        h.grant(&admin, PLATFORM_TENANT_ID, &staff, "admin")
            .await
            .unwrap()
            .privilege_change
    );
    assert!(h.check(PLATFORM_TENANT_ID, &staff, "anything:at-all").await);
}

#[tokio::test]
async fn custom_roles_are_bounded_by_the_creator_and_cannot_shadow_built_ins() {
    let mut h = Harness::start().await;
    let tenant = Uuid::new_v4();
    let (owner, clerk) = (h.user(tenant), h.user(tenant));
    let service = h.service.clone();
    h.grant(&service, tenant, &owner, "owner").await.unwrap();
    let create = |name: &str, permissions: &[&str]| pb::CreateRoleRequest {
        tenant_id: tenant.to_string(),
        name: name.into(),
        description: "test".into(),
        permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
    };
    let role = h
        .client
        .create_role(with_token(
            create("billing-clerk", &["billing:read", "billing:export"]),
            &owner.token,
        ))
        .await
        .unwrap()
        .into_inner()
        .role
        .unwrap();
    assert!(!role.built_in);
    for (name, permissions, expected) in [
        (
            "chat-reader",
            &["conversation:read"][..],
            "PRIVILEGE_ESCALATION",
        ),
        ("god", &["*"][..], "PRIVILEGE_ESCALATION"),
        ("owner", &["billing:read"][..], "INVALID_ARGUMENT"),
        ("bad", &["not a permission"][..], "PERMISSION_MALFORMED"),
    ] {
        let status = h
            .client
            .create_role(with_token(create(name, permissions), &owner.token))
            .await
            .unwrap_err();
        assert_eq!(reason(&status), expected, "{name}");
    }
    // Bind the custom role and use it.
    h.grant(&owner.token, tenant, &clerk, "billing-clerk")
        .await
        .unwrap();
    assert!(h.check(tenant, &clerk, "billing:export").await);
    assert!(!h.check(tenant, &clerk, "billing:delete").await);

    // Narrow it: the change reaches decisions at once.
    h.client
        .update_role(with_token(
            pb::UpdateRoleRequest {
                tenant_id: tenant.to_string(),
                name: "billing-clerk".into(),
                description: String::new(),
                permissions: vec!["billing:read".into()],
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["permissions".into()],
                }),
            },
            &owner.token,
        ))
        .await
        .unwrap();
    assert!(!h.check(tenant, &clerk, "billing:export").await);

    // In use: refused without force, then deleted with its binding.
    let delete = |force| pb::DeleteRoleRequest {
        tenant_id: tenant.to_string(),
        name: "billing-clerk".into(),
        force,
    };
    let status = h
        .client
        .delete_role(with_token(delete(false), &owner.token))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "ROLE_IN_USE");
    let deleted = h
        .client
        .delete_role(with_token(delete(true), &owner.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.revoked_binding_count, 1);
    assert!(!h.check(tenant, &clerk, "billing:read").await);

    // Built-ins are listed first; admin is not offered in a customer tenant.
    let roles = h
        .client
        .list_roles(with_token(
            pb::ListRolesRequest {
                tenant_id: tenant.to_string(),
                page_size: 0,
                page_token: String::new(),
            },
            &owner.token,
        ))
        .await
        .unwrap()
        .into_inner()
        .roles;
    let names: Vec<_> = roles.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["owner", "member", "viewer"]);
}

#[tokio::test]
async fn revoking_takes_effect_and_lists_page() {
    let mut h = Harness::start().await;
    let tenant = Uuid::new_v4();
    let service = h.service.clone();
    let users: Vec<User> = (0..5).map(|_| h.user(tenant)).collect();
    for user in &users {
        h.grant(&service, tenant, user, "viewer").await.unwrap();
    }
    // Idempotent grant.
    assert!(
        !h.grant(&service, tenant, &users[0], "viewer")
            .await
            .unwrap()
            .created
    );

    let mut seen = 0;
    let mut token = String::new();
    loop {
        let page = h
            .client
            .list_role_bindings(with_token(
                pb::ListRoleBindingsRequest {
                    tenant_id: tenant.to_string(),
                    subject: None,
                    role: String::new(),
                    workspace_id: String::new(),
                    page_size: 2,
                    page_token: token.clone(),
                },
                &h.service,
            ))
            .await
            .unwrap()
            .into_inner();
        seen += page.role_bindings.len();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, 5);

    assert!(h.check(tenant, &users[1], "file:read").await);
    h.client
        .revoke_role(with_token(
            pb::RevokeRoleRequest {
                tenant_id: tenant.to_string(),
                subject: Some(users[1].subject()),
                role: "viewer".into(),
                workspace_id: String::new(),
            },
            &h.service,
        ))
        .await
        .unwrap();
    assert!(!h.check(tenant, &users[1], "file:read").await);

    let permissions = h
        .client
        .list_permissions(with_token(
            pb::ListPermissionsRequest {
                tenant_id: tenant.to_string(),
                subject: Some(users[0].subject()),
                workspace_id: String::new(),
                page_size: 0,
                page_token: String::new(),
            },
            &h.service,
        ))
        .await
        .unwrap()
        .into_inner()
        .permissions;
    assert_eq!(
        permissions,
        ["conversation:read", "file:read", "message:read"]
    );
}

#[tokio::test]
async fn batch_check_holds_at_most_100_and_decisions_need_a_service() {
    let mut h = Harness::start().await;
    let tenant = Uuid::new_v4();
    let user = h.user(tenant);
    let item = pb::BatchCheckItem {
        tenant_id: tenant.to_string(),
        subject: Some(user.subject()),
        permission: "file:read".into(),
        workspace_id: String::new(),
    };
    let reply = h
        .client
        .batch_check(with_token(
            pb::BatchCheckRequest {
                items: vec![item.clone(); 100],
            },
            &h.service,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.results.len(), 100);
    assert!(reply.results.iter().all(|r| !r.allowed));
    let status = h
        .client
        .batch_check(with_token(
            pb::BatchCheckRequest {
                items: vec![item; 101],
            },
            &h.service,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // A tenant user cannot ask authz about others.
    let status = h
        .client
        .check(with_token(
            pb::CheckRequest {
                tenant_id: tenant.to_string(),
                subject: Some(user.subject()),
                permission: "file:read".into(),
                workspace_id: String::new(),
                min_revision: 0,
            },
            &user.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Wildcards are for grants, not for checks.
    let status = h
        .client
        .check(with_token(
            pb::CheckRequest {
                tenant_id: tenant.to_string(),
                subject: Some(user.subject()),
                permission: "file:*".into(),
                workspace_id: String::new(),
                min_revision: 0,
            },
            &h.service,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn watch_changes_streams_grants_and_revocations() {
    let mut h = Harness::start().await;
    let tenant = Uuid::new_v4();
    let user = h.user(tenant);
    let mut stream = h
        .client
        .watch_changes(with_token(
            pb::WatchChangesRequest { after_revision: 0 },
            &h.service,
        ))
        .await
        .unwrap()
        .into_inner();
    let hello = stream.message().await.unwrap().unwrap();
    assert!(hello.reset);
    let start = hello.revision;

    let service = h.service.clone();
    h.grant(&service, tenant, &user, "member").await.unwrap();
    h.client
        .revoke_role(with_token(
            pb::RevokeRoleRequest {
                tenant_id: tenant.to_string(),
                subject: Some(user.subject()),
                role: "member".into(),
                workspace_id: String::new(),
            },
            &h.service,
        ))
        .await
        .unwrap();
    let mut changes = Vec::new();
    while changes.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a change within the heartbeat bound")
            .unwrap()
            .unwrap();
        changes.extend(message.changes);
    }
    assert_eq!(
        changes[0].change_type,
        pb::ChangeType::BindingCreated as i32
    );
    assert_eq!(
        changes[1].change_type,
        pb::ChangeType::BindingDeleted as i32
    );
    assert!(changes[0].revision > start && changes[1].revision > changes[0].revision);
    assert_eq!(changes[1].tenant_id, tenant.to_string());

    // A watcher that reconnects after a revision catches up from there.
    let mut resumed = h
        .client
        .watch_changes(with_token(
            pb::WatchChangesRequest {
                after_revision: changes[0].revision,
            },
            &h.service,
        ))
        .await
        .unwrap()
        .into_inner();
    let first = resumed.message().await.unwrap().unwrap();
    assert!(!first.reset);
    assert_eq!(first.changes.len(), 1);
    assert_eq!(first.changes[0].revision, changes[1].revision);
}

#[tokio::test]
async fn a_revocation_through_one_replica_is_enforced_by_another_within_two_seconds() {
    let mut h = Harness::start().await;
    let replica = h.fleet.start_authz_replica().await;
    let mut other = AuthzServiceClient::new(replica.server.channel().await);
    let tenant = Uuid::new_v4();
    let user = h.user(tenant);
    let service = h.service.clone();
    let check_on_other = |other: &mut AuthzServiceClient<Channel>| {
        let mut other = other.clone();
        let request = pb::CheckRequest {
            tenant_id: tenant.to_string(),
            subject: Some(user.subject()),
            permission: "message:write".into(),
            workspace_id: String::new(),
            min_revision: 0,
        };
        let service = service.clone();
        async move {
            other
                .check(with_token(request, &service))
                .await
                .unwrap()
                .into_inner()
                .allowed
        }
    };
    // The replica caches "no binding" first.
    assert!(!check_on_other(&mut other).await);
    h.grant(&service, tenant, &user, "member").await.unwrap();
    assert_eventually!(Duration::from_secs(2), check_on_other(&mut other).await);
    h.client
        .revoke_role(with_token(
            pb::RevokeRoleRequest {
                tenant_id: tenant.to_string(),
                subject: Some(user.subject()),
                role: "member".into(),
                workspace_id: String::new(),
            },
            &h.service,
        ))
        .await
        .unwrap();
    assert_eventually!(Duration::from_secs(2), !check_on_other(&mut other).await);
}

#[tokio::test]
async fn watch_streams_end_when_the_server_drains() {
    let mut h = Harness::start().await;
    let mut stream = h
        .client
        .watch_changes(with_token(
            pb::WatchChangesRequest { after_revision: 0 },
            &h.service,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().unwrap().reset);
    // Shutdown finishes well before the drain deadline (request timeout + 1 s = 31 s)
    // because the stream ends when told to drain.
    let server = &mut h.fleet.authz.as_mut().unwrap().server;
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("drained without waiting for the deadline")
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream ended");
    assert!(
        !matches!(end, Ok(Some(_))),
        "no more messages after the drain"
    );
}
