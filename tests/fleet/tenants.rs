//! The tenants service: creation as a saga across keys and authz (idempotent, resumable,
//! never half-made), the tenant boundary on every RPC, mass-assignment protection,
//! suspension, and deletion that revokes, shreds and tombstones.

use std::time::Duration;

use penny_platform::principal::PrincipalKind as TokenKind;
use penny_platform::signing::TokenGrant;
use penny_proto::authz::v1 as authz_pb;
use penny_proto::authz::v1::authz_service_client::AuthzServiceClient;
use penny_proto::common::v1::PrincipalKind;
use penny_proto::keys::v1 as keys_pb;
use penny_proto::keys::v1::key_service_client::KeyServiceClient;
use penny_proto::tenants::v1 as pb;
use penny_proto::tenants::v1::tenant_service_client::TenantServiceClient;
use penny_tests::{
    TestFleet, assert_eventually, bad_fields, error_reason as reason, hidden_file_rows, with_token,
};
use prost_types::FieldMask;
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

/// A tenant made through the API, with its owner and the owner's token.
struct Made {
    id: Uuid,
    slug: String,
    owner: Uuid,
    owner_token: String,
}

struct Harness {
    fleet: TestFleet,
    tenants: TenantServiceClient<Channel>,
    admin: String,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(TestFleet::builder()).await
    }

    async fn start_with(builder: penny_tests::TestFleetBuilder) -> Self {
        let fleet = builder.with_tenants().start().await;
        let tenants = TenantServiceClient::new(fleet.tenants().server.channel().await);
        let admin = fleet.admin_token();
        Self {
            fleet,
            tenants,
            admin,
        }
    }

    fn token_for(&self, tenant: Uuid, user: Uuid) -> String {
        self.fleet.token(&TokenGrant {
            subject: user.to_string(),
            tenant_id: tenant,
            // Claimed roles count for nothing: authz's bindings decide.
            roles: vec![],
            kind: TokenKind::User,
            session_id: Some(Uuid::new_v4().to_string()),
            lifetime: Duration::from_secs(600),
        })
    }

    async fn create(&mut self, slug: &str) -> Made {
        let created = self
            .tenants
            .create_tenant(with_token(new_tenant(Uuid::new_v4(), slug), &self.admin))
            .await
            .unwrap()
            .into_inner();
        let tenant = created.tenant.unwrap();
        assert_eq!(tenant.state, pb::TenantState::Active as i32);
        let id = Uuid::parse_str(&tenant.id).unwrap();
        let owner = Uuid::parse_str(&created.owner.unwrap().id).unwrap();
        Made {
            id,
            slug: slug.to_owned(),
            owner,
            owner_token: self.token_for(id, owner),
        }
    }

    /// A user made by platform staff. (An owner could not hand out `member` or `viewer`:
    /// under the guide's matrix it holds none of their `conversation:*`, `message:*` or
    /// `file:*` permissions, and nobody grants what they do not hold.)
    async fn user(&mut self, tenant: &Made, email: &str, role: &str) -> Uuid {
        let user = self
            .tenants
            .create_user(with_token(
                pb::CreateUserRequest {
                    tenant_id: tenant.id.to_string(),
                    email: email.into(),
                    display_name: "A User".into(),
                    role: role.into(),
                },
                &self.admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        Uuid::parse_str(&user.id).unwrap()
    }

    async fn authz(&self) -> AuthzServiceClient<Channel> {
        AuthzServiceClient::new(self.fleet.authz().server.channel().await)
    }

    async fn bindings(&self, tenant: Uuid) -> Vec<authz_pb::RoleBinding> {
        self.authz()
            .await
            .list_role_bindings(with_token(
                authz_pb::ListRoleBindingsRequest {
                    tenant_id: tenant.to_string(),
                    ..Default::default()
                },
                &self.fleet.service_token(),
            ))
            .await
            .unwrap()
            .into_inner()
            .role_bindings
    }

    async fn key_exists(&self, tenant: Uuid) -> bool {
        let found = KeyServiceClient::new(self.fleet.keys().server.channel().await)
            .get_key(with_token(
                keys_pb::GetKeyRequest {
                    tenant_id: tenant.to_string(),
                },
                &self.admin,
            ))
            .await;
        match found {
            Ok(_) => true,
            Err(status) if status.code() == Code::NotFound => false,
            Err(status) => panic!("GetKey: {status:?}"),
        }
    }

    async fn get_tenant(&mut self, tenant: Uuid, token: &str) -> Result<pb::Tenant, tonic::Status> {
        self.tenants
            .get_tenant(with_token(
                pb::GetTenantRequest {
                    tenant_id: tenant.to_string(),
                },
                token,
            ))
            .await
            .map(|r| r.into_inner().tenant.unwrap())
    }
}

fn new_tenant(request_id: Uuid, slug: &str) -> pb::CreateTenantRequest {
    pb::CreateTenantRequest {
        request_id: request_id.to_string(),
        name: format!("Tenant {slug}"),
        slug: slug.into(),
        plan: pb::Plan::Pro as i32,
        security_policy: Some(pb::SecurityPolicy {
            mfa_required: true,
            ..Default::default()
        }),
        owner: Some(pb::OwnerSpec {
            email: format!("owner@{slug}.test"),
            display_name: "Owner".into(),
        }),
    }
}

#[tokio::test]
async fn creating_a_tenant_makes_its_key_and_owner_binding_and_is_idempotent() {
    let mut h = Harness::start().await;
    let request_id = Uuid::new_v4();
    let first = h
        .tenants
        .create_tenant(with_token(new_tenant(request_id, "acme"), &h.admin))
        .await
        .unwrap()
        .into_inner();
    let tenant = first.tenant.clone().unwrap();
    let owner = first.owner.clone().unwrap();
    let id = Uuid::parse_str(&tenant.id).unwrap();
    assert_eq!(tenant.state, pb::TenantState::Active as i32);
    assert_eq!(tenant.plan, pb::Plan::Pro as i32);
    assert!(!tenant.platform);
    let policy = tenant.security_policy.unwrap();
    assert!(policy.mfa_required);
    assert_eq!(policy.lockout_threshold, 5, "unset settings take defaults");
    assert_eq!(policy.session_lifetime.unwrap().seconds, 24 * 3600);
    assert_eq!(owner.tenant_id, tenant.id);
    assert_eq!(owner.status, pb::UserStatus::Active as i32);

    assert!(h.key_exists(id).await, "the tenant's key exists in keys");
    let bindings = h.bindings(id).await;
    assert_eq!(bindings.len(), 1);
    assert_eq!(bindings[0].role, "owner");
    assert_eq!(bindings[0].subject.as_ref().unwrap().id, owner.id);

    // The same request again: the same tenant and owner, nothing new.
    let again = h
        .tenants
        .create_tenant(with_token(new_tenant(request_id, "acme"), &h.admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.tenant.unwrap().id, tenant.id);
    assert_eq!(again.owner.unwrap().id, owner.id);
    assert_eq!(h.bindings(id).await.len(), 1);

    // The request id with another tenant in it, and the slug under another request id.
    let reused = h
        .tenants
        .create_tenant(with_token(new_tenant(request_id, "other"), &h.admin))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&reused), ["request_id"]);
    let taken = h
        .tenants
        .create_tenant(with_token(new_tenant(Uuid::new_v4(), "acme"), &h.admin))
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists);

    // The owner runs the tenant through its binding alone.
    let owner_token = h.token_for(id, Uuid::parse_str(&owner.id).unwrap());
    assert_eq!(h.get_tenant(id, &owner_token).await.unwrap().slug, "acme");

    // Only platform staff create tenants; the platform tenant is listed and marked.
    let refused = h
        .tenants
        .create_tenant(with_token(
            new_tenant(Uuid::new_v4(), "sneaky"),
            &owner_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let listed = h
        .tenants
        .list_tenants(with_token(pb::ListTenantsRequest::default(), &h.admin))
        .await
        .unwrap()
        .into_inner()
        .tenants;
    assert!(listed.iter().any(|t| t.platform && t.slug == "platform"));
    assert!(listed.iter().any(|t| t.id == tenant.id));
}

#[tokio::test]
async fn bad_create_requests_name_every_bad_field() {
    let mut h = Harness::start().await;
    let status = h
        .tenants
        .create_tenant(with_token(
            pb::CreateTenantRequest {
                request_id: "nope".into(),
                name: "Bad\nName".into(),
                slug: "Platform!".into(),
                plan: 42,
                security_policy: Some(pb::SecurityPolicy {
                    mfa_required: false,
                    session_lifetime: Some(prost_types::Duration {
                        seconds: 10,
                        nanos: 0,
                    }),
                    lockout_threshold: 1000,
                    lockout_window: Some(prost_types::Duration {
                        seconds: -5,
                        nanos: 0,
                    }),
                    lockout_duration: None,
                }),
                owner: Some(pb::OwnerSpec {
                    email: "not-an-email".into(),
                    display_name: String::new(),
                }),
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut fields = bad_fields(&status);
    fields.sort();
    assert_eq!(
        fields,
        [
            "name",
            "owner.display_name",
            "owner.email",
            "plan",
            "request_id",
            "security_policy.lockout_threshold",
            "security_policy.lockout_window",
            "security_policy.session_lifetime",
            "slug",
        ]
    );
    // The reserved slug of the platform tenant is refused too.
    let status = h
        .tenants
        .create_tenant(with_token(new_tenant(Uuid::new_v4(), "platform"), &h.admin))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["slug"]);
}

#[tokio::test]
async fn a_failed_step_leaves_a_pending_tenant_that_a_retry_completes() {
    let h = Harness::start().await;
    // A tenants server whose keys service is down (nothing listens there).
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let database = penny_tests::fresh_database(h.fleet.data_dir.path(), "tenants_saga").await;
    let broken = h
        .fleet
        .start_tenants_on(database.clone(), format!("http://{dead}"))
        .await;
    let mut client = TenantServiceClient::new(broken.server.channel().await);
    let request_id = Uuid::new_v4();
    let status = client
        .create_tenant(with_token(new_tenant(request_id, "halfway"), &h.admin))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "DEPENDENCY_UNAVAILABLE");
    assert!(status.message().contains("same request_id"), "{status:?}");

    // Visible as PENDING, unusable, with no binding made.
    let pending = client
        .list_tenants(with_token(
            pb::ListTenantsRequest {
                state: pb::TenantState::Pending as i32,
                ..Default::default()
            },
            &h.admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .tenants;
    assert_eq!(pending.len(), 1);
    let id = Uuid::parse_str(&pending[0].id).unwrap();
    assert!(h.bindings(id).await.is_empty());
    let unusable = client
        .create_workspace(with_token(
            pb::CreateWorkspaceRequest {
                tenant_id: id.to_string(),
                name: "early".into(),
                description: String::new(),
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(unusable.code(), Code::FailedPrecondition);

    // Keys is reachable again (a tenants server with the right address, same database):
    // the retry finishes the same tenant.
    let fixed = h
        .fleet
        .start_tenants_on(database, format!("http://{}", h.fleet.keys().server.addr))
        .await;
    let mut client = TenantServiceClient::new(fixed.server.channel().await);
    let done = client
        .create_tenant(with_token(new_tenant(request_id, "halfway"), &h.admin))
        .await
        .unwrap()
        .into_inner();
    let tenant = done.tenant.unwrap();
    assert_eq!(tenant.id, id.to_string());
    assert_eq!(tenant.state, pb::TenantState::Active as i32);
    assert!(h.key_exists(id).await);
    let bindings = h.bindings(id).await;
    assert_eq!(bindings.len(), 1);
    assert_eq!(
        bindings[0].subject.as_ref().unwrap().id,
        done.owner.unwrap().id
    );
}

#[tokio::test]
async fn update_requests_cannot_assign_what_they_are_not_for() {
    let mut h = Harness::start().await;
    let acme = h.create("acme").await;
    let user = h.user(&acme, "u@acme.test", "member").await;

    // Paths that are not the request's to change, or no mask at all.
    for paths in [
        &["slug"][..],
        &["tenant_id"],
        &["id"],
        &["state"],
        &["platform"],
        &["name", "create_time"],
    ] {
        let status = h
            .tenants
            .update_tenant(with_token(
                pb::UpdateTenantRequest {
                    tenant_id: acme.id.to_string(),
                    name: "New".into(),
                    update_mask: mask(paths),
                    ..Default::default()
                },
                &h.admin,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{paths:?}");
        assert_eq!(bad_fields(&status), ["update_mask"], "{paths:?}");
    }
    let status = h
        .tenants
        .update_tenant(with_token(
            pb::UpdateTenantRequest {
                tenant_id: acme.id.to_string(),
                name: "New".into(),
                ..Default::default()
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["update_mask"]);

    // Only what the mask names changes: the plan set beside it is ignored.
    let updated = h
        .tenants
        .update_tenant(with_token(
            pb::UpdateTenantRequest {
                tenant_id: acme.id.to_string(),
                name: "Acme Renamed".into(),
                plan: pb::Plan::Enterprise as i32,
                security_policy: Some(pb::SecurityPolicy {
                    lockout_threshold: 9,
                    mfa_required: false,
                    ..Default::default()
                }),
                update_mask: mask(&["name", "security_policy.lockout_threshold"]),
            },
            &acme.owner_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!(updated.name, "Acme Renamed");
    assert_eq!(updated.plan, pb::Plan::Pro as i32);
    let policy = updated.security_policy.unwrap();
    assert_eq!(policy.lockout_threshold, 9);
    assert!(policy.mfa_required, "a setting outside the mask is kept");
    assert_eq!(updated.slug, "acme");

    // The plan is staff's: the owner may not change it, an admin may.
    let plan = |token: &str| {
        with_token(
            pb::UpdateTenantRequest {
                tenant_id: acme.id.to_string(),
                plan: pb::Plan::Enterprise as i32,
                update_mask: mask(&["plan"]),
                ..Default::default()
            },
            token,
        )
    };
    let status = h
        .tenants
        .update_tenant(plan(&acme.owner_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let updated = h.tenants.update_tenant(plan(&h.admin)).await.unwrap();
    assert_eq!(
        updated.into_inner().tenant.unwrap().plan,
        pb::Plan::Enterprise as i32
    );

    // A user's status, tenant and roles are never UpdateUser's.
    for paths in [
        &["status"][..],
        &["tenant_id"],
        &["role"],
        &["suspend_reason"],
    ] {
        let status = h
            .tenants
            .update_user(with_token(
                pb::UpdateUserRequest {
                    tenant_id: acme.id.to_string(),
                    user_id: user.to_string(),
                    update_mask: mask(paths),
                    ..Default::default()
                },
                &acme.owner_token,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{paths:?}");
    }
    let renamed = h
        .tenants
        .update_user(with_token(
            pb::UpdateUserRequest {
                tenant_id: acme.id.to_string(),
                user_id: user.to_string(),
                email: "ignored@acme.test".into(),
                display_name: "Renamed".into(),
                update_mask: mask(&["display_name"]),
            },
            &acme.owner_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(renamed.display_name, "Renamed");
    assert_eq!(renamed.email, "u@acme.test");
    assert_eq!(renamed.status, pb::UserStatus::Active as i32);
}

#[tokio::test]
async fn create_user_grants_only_what_the_caller_holds_and_never_admin() {
    let mut h = Harness::start().await;
    let acme = h.create("acme").await;

    // `admin` exists only in the platform tenant.
    let status = h
        .tenants
        .create_user(with_token(
            pb::CreateUserRequest {
                tenant_id: acme.id.to_string(),
                email: "root@acme.test".into(),
                display_name: "Root".into(),
                role: "admin".into(),
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "PRIVILEGE_ESCALATION");

    // A custom role that may create users and grant roles, but holds nothing else.
    h.authz()
        .await
        .create_role(with_token(
            authz_pb::CreateRoleRequest {
                tenant_id: acme.id.to_string(),
                name: "recruiter".into(),
                description: "hires".into(),
                permissions: vec![
                    "user:create".into(),
                    "user:read".into(),
                    "user:grant".into(),
                ],
            },
            &acme.owner_token,
        ))
        .await
        .unwrap();
    let recruiter = h.user(&acme, "rec@acme.test", "recruiter").await;
    let recruiter_token = h.token_for(acme.id, recruiter);
    let create = |role: &str, email: &str| {
        with_token(
            pb::CreateUserRequest {
                tenant_id: acme.id.to_string(),
                email: email.into(),
                display_name: "New".into(),
                role: role.into(),
            },
            &recruiter_token,
        )
    };
    // Handing out `owner` would be escalation: refused, and no user is left behind.
    let status = h
        .tenants
        .create_user(create("owner", "boss@acme.test"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "PRIVILEGE_ESCALATION");
    let found = h
        .tenants
        .list_users(with_token(
            pb::ListUsersRequest {
                tenant_id: acme.id.to_string(),
                email: "BOSS@acme.test".into(),
                ..Default::default()
            },
            &acme.owner_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .users;
    assert!(found.is_empty(), "the refused user was removed");
    // Its own role it may hand out; an unknown role is a bad field.
    h.tenants
        .create_user(create("recruiter", "rec2@acme.test"))
        .await
        .unwrap();
    let status = h
        .tenants
        .create_user(create("wizard", "w@acme.test"))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["role"]);
    // Emails are unique per tenant, whatever their case.
    let status = h
        .tenants
        .create_user(create("", "REC@ACME.TEST"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn tenant_a_with_tenant_b_ids_gets_not_found_on_every_rpc() {
    let mut h = Harness::start().await;
    let a = h.create("alpha").await;
    let b = h.create("bravo").await;
    let b_user = h.user(&b, "bob@bravo.test", "member").await;
    let a_user = h.user(&a, "amy@alpha.test", "member").await;
    let token = a.owner_token.clone();
    let (bt, bu) = (b.id.to_string(), b_user.to_string());
    let at = a.id.to_string();
    let mut t = h.tenants.clone();
    let mut results: Vec<(&str, tonic::Status)> = Vec::new();
    macro_rules! expect_err {
        ($name:expr, $call:expr) => {
            results.push(($name, $call.await.expect_err($name)));
        };
    }
    expect_err!(
        "GetTenant",
        t.get_tenant(with_token(
            pb::GetTenantRequest {
                tenant_id: bt.clone()
            },
            &token
        ))
    );
    expect_err!(
        "UpdateTenant",
        t.update_tenant(with_token(
            pb::UpdateTenantRequest {
                tenant_id: bt.clone(),
                name: "pwned".into(),
                update_mask: mask(&["name"]),
                ..Default::default()
            },
            &token
        ))
    );
    expect_err!(
        "CreateUser",
        t.create_user(with_token(
            pb::CreateUserRequest {
                tenant_id: bt.clone(),
                email: "x@x.test".into(),
                display_name: "X".into(),
                role: String::new(),
            },
            &token
        ))
    );
    for (name, tenant, user) in [("B/B", &bt, &bu), ("A/B", &at, &bu)] {
        let _ = name;
        expect_err!(
            "GetUser",
            t.get_user(with_token(
                pb::GetUserRequest {
                    tenant_id: tenant.clone(),
                    user_id: user.clone()
                },
                &token
            ))
        );
        expect_err!(
            "UpdateUser",
            t.update_user(with_token(
                pb::UpdateUserRequest {
                    tenant_id: tenant.clone(),
                    user_id: user.clone(),
                    display_name: "pwned".into(),
                    update_mask: mask(&["display_name"]),
                    ..Default::default()
                },
                &token
            ))
        );
        expect_err!(
            "SuspendUser",
            t.suspend_user(with_token(
                pb::SuspendUserRequest {
                    tenant_id: tenant.clone(),
                    user_id: user.clone(),
                    reason: "because".into(),
                    alert_id: String::new()
                },
                &token
            ))
        );
        expect_err!(
            "ReactivateUser",
            t.reactivate_user(with_token(
                pb::ReactivateUserRequest {
                    tenant_id: tenant.clone(),
                    user_id: user.clone(),
                    reason: String::new()
                },
                &token
            ))
        );
    }
    expect_err!(
        "ListUsers",
        t.list_users(with_token(
            pb::ListUsersRequest {
                tenant_id: bt.clone(),
                ..Default::default()
            },
            &token
        ))
    );
    expect_err!(
        "CreateWorkspace",
        t.create_workspace(with_token(
            pb::CreateWorkspaceRequest {
                tenant_id: bt.clone(),
                name: "w".into(),
                description: String::new()
            },
            &token
        ))
    );
    expect_err!(
        "ListWorkspaces",
        t.list_workspaces(with_token(
            pb::ListWorkspacesRequest {
                tenant_id: bt.clone(),
                ..Default::default()
            },
            &token
        ))
    );
    // Roles and bindings of B, through authz, are just as invisible.
    let mut authz = h.authz().await;
    authz
        .create_role(with_token(
            authz_pb::CreateRoleRequest {
                tenant_id: bt.clone(),
                name: "auditor".into(),
                description: String::new(),
                permissions: vec!["user:read".into()],
            },
            &b.owner_token,
        ))
        .await
        .unwrap();
    expect_err!(
        "CreateRole",
        authz.create_role(with_token(
            authz_pb::CreateRoleRequest {
                tenant_id: bt.clone(),
                name: "planted".into(),
                description: String::new(),
                permissions: vec!["user:read".into()],
            },
            &token
        ))
    );
    expect_err!(
        "UpdateRole",
        authz.update_role(with_token(
            authz_pb::UpdateRoleRequest {
                tenant_id: bt.clone(),
                name: "auditor".into(),
                description: "pwned".into(),
                permissions: vec![],
                update_mask: mask(&["description"]),
            },
            &token
        ))
    );
    expect_err!(
        "DeleteRole",
        authz.delete_role(with_token(
            authz_pb::DeleteRoleRequest {
                tenant_id: bt.clone(),
                name: "auditor".into(),
                force: true,
            },
            &token
        ))
    );
    expect_err!(
        "RevokeRole",
        authz.revoke_role(with_token(
            authz_pb::RevokeRoleRequest {
                tenant_id: bt.clone(),
                subject: Some(authz_pb::Subject {
                    kind: PrincipalKind::User as i32,
                    id: bu.clone(),
                    tenant_id: bt.clone(),
                }),
                role: "member".into(),
                workspace_id: String::new(),
            },
            &token
        ))
    );
    expect_err!(
        "ListRoles",
        authz.list_roles(with_token(
            authz_pb::ListRolesRequest {
                tenant_id: bt.clone(),
                ..Default::default()
            },
            &token
        ))
    );
    expect_err!(
        "ListRoleBindings",
        authz.list_role_bindings(with_token(
            authz_pb::ListRoleBindingsRequest {
                tenant_id: bt.clone(),
                ..Default::default()
            },
            &token
        ))
    );
    expect_err!(
        "GrantRole",
        authz.grant_role(with_token(
            authz_pb::GrantRoleRequest {
                tenant_id: bt.clone(),
                subject: Some(authz_pb::Subject {
                    kind: PrincipalKind::User as i32,
                    id: a.owner.to_string(),
                    tenant_id: bt.clone(),
                }),
                role: "owner".into(),
                workspace_id: String::new(),
            },
            &token
        ))
    );
    assert_eq!(results.len(), 21);
    for (name, status) in &results {
        assert_eq!(status.code(), Code::NotFound, "{name}: {status:?}");
        assert!(!status.message().contains(&bt), "{name} echoes B's id");
    }
    // And nothing of B changed; A's own calls still work.
    let bob = h
        .tenants
        .get_user(with_token(
            pb::GetUserRequest {
                tenant_id: bt.clone(),
                user_id: bu.clone(),
            },
            &b.owner_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(bob.display_name, "A User");
    assert_eq!(
        h.bindings(b.id).await.len(),
        2,
        "B's owner and Bob keep their roles"
    );
    assert_eq!(bob.status, pb::UserStatus::Active as i32);
    assert_eq!(
        h.get_tenant(b.id, &b.owner_token).await.unwrap().name,
        "Tenant bravo"
    );
    h.tenants
        .get_user(with_token(
            pb::GetUserRequest {
                tenant_id: at,
                user_id: a_user.to_string(),
            },
            &token,
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn suspension_and_reactivation_are_idempotent_and_open_to_the_security_monitor() {
    let mut h = Harness::start().await;
    let acme = h.create("acme").await;
    let user = h.user(&acme, "eve@acme.test", "member").await;
    let monitor = h.fleet.service_token();
    let alert = Uuid::new_v4();
    let suspend = |reason: &str| {
        with_token(
            pb::SuspendUserRequest {
                tenant_id: acme.id.to_string(),
                user_id: user.to_string(),
                reason: reason.into(),
                alert_id: alert.to_string(),
            },
            &monitor,
        )
    };
    let status = h.tenants.suspend_user(suspend("")).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["reason"]);
    let first = h
        .tenants
        .suspend_user(suspend("credential stuffing"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(first.status, pb::UserStatus::Suspended as i32);
    assert_eq!(first.suspend_reason, "credential stuffing");
    let second = h
        .tenants
        .suspend_user(suspend("again"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(
        second.suspend_reason, "credential stuffing",
        "the first reason stays"
    );
    assert_eq!(second.update_time, first.update_time, "nothing was written");

    let suspended = h
        .tenants
        .list_users(with_token(
            pb::ListUsersRequest {
                tenant_id: acme.id.to_string(),
                status: pb::UserStatus::Suspended as i32,
                ..Default::default()
            },
            &acme.owner_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .users;
    assert_eq!(suspended.len(), 1);
    assert_eq!(suspended[0].id, user.to_string());

    for _ in 0..2 {
        let active = h
            .tenants
            .reactivate_user(with_token(
                pb::ReactivateUserRequest {
                    tenant_id: acme.id.to_string(),
                    user_id: user.to_string(),
                    reason: "false positive".into(),
                },
                &acme.owner_token,
            ))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        assert_eq!(active.status, pb::UserStatus::Active as i32);
        assert!(active.suspend_reason.is_empty());
    }
}

#[tokio::test]
async fn listings_page_through_everything_once() {
    let mut h = Harness::start().await;
    let acme = h.create("acme").await;
    for i in 0..5 {
        h.user(&acme, &format!("u{i}@acme.test"), "").await;
    }
    for name in ["Zeta", "alpha", "Mid"] {
        h.tenants
            .create_workspace(with_token(
                pb::CreateWorkspaceRequest {
                    tenant_id: acme.id.to_string(),
                    name: name.into(),
                    description: String::new(),
                },
                &acme.owner_token,
            ))
            .await
            .unwrap();
    }
    let status = h
        .tenants
        .create_workspace(with_token(
            pb::CreateWorkspaceRequest {
                tenant_id: acme.id.to_string(),
                name: "ZETA".into(),
                description: String::new(),
            },
            &acme.owner_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = h
            .tenants
            .list_users(with_token(
                pb::ListUsersRequest {
                    tenant_id: acme.id.to_string(),
                    page_size: 2,
                    page_token: token.clone(),
                    ..Default::default()
                },
                &acme.owner_token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.users.len() <= 2);
        seen.extend(page.users.into_iter().map(|u| u.email));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 6, "owner plus five: {seen:?}");
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 6);

    let names: Vec<String> = h
        .tenants
        .list_workspaces(with_token(
            pb::ListWorkspacesRequest {
                tenant_id: acme.id.to_string(),
                page_size: 2,
                ..Default::default()
            },
            &acme.owner_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .workspaces
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(names, ["alpha", "Mid"]);

    let status = h
        .tenants
        .list_users(with_token(
            pb::ListUsersRequest {
                tenant_id: acme.id.to_string(),
                page_token: "not a token".into(),
                ..Default::default()
            },
            &acme.owner_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "PAGE_TOKEN_INVALID");
}

#[tokio::test]
async fn deleting_a_tenant_revokes_shreds_and_tombstones() {
    let mut h = Harness::start().await;
    let acme = h.create("acme").await;
    h.user(&acme, "m@acme.test", "member").await;
    assert!(h.get_tenant(acme.id, &acme.owner_token).await.is_ok());

    let delete = |slug: &str, token: &str| {
        with_token(
            pb::DeleteTenantRequest {
                tenant_id: acme.id.to_string(),
                confirm_slug: slug.into(),
            },
            token,
        )
    };
    let status = h
        .tenants
        .delete_tenant(delete(&acme.slug, &acme.owner_token))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "owners cannot delete"
    );
    let status = h
        .tenants
        .delete_tenant(delete("acne", &h.admin))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["confirm_slug"]);

    let deleted = h
        .tenants
        .delete_tenant(delete(&acme.slug, &h.admin))
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!(deleted.state, pb::TenantState::Deleted as i32);
    assert!(!h.key_exists(acme.id).await, "the key is destroyed");
    assert!(
        h.bindings(acme.id).await.is_empty(),
        "every binding is revoked"
    );
    // The owner loses access as the revocation reaches the tenants service.
    assert_eventually!(
        Duration::from_secs(2),
        h.get_tenant(acme.id, &acme.owner_token)
            .await
            .is_err_and(|s| s.code() == Code::PermissionDenied)
    );
    let tombstones = h
        .tenants
        .list_users(with_token(
            pb::ListUsersRequest {
                tenant_id: acme.id.to_string(),
                status: pb::UserStatus::Deleted as i32,
                ..Default::default()
            },
            &h.admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .users;
    assert_eq!(tombstones.len(), 2);
    assert!(
        tombstones
            .iter()
            .all(|u| u.email.is_empty() && u.display_name.is_empty())
    );
    // Deleting again returns the tombstone; nothing can be added to it.
    let again = h
        .tenants
        .delete_tenant(delete(&acme.slug, &h.admin))
        .await
        .unwrap();
    assert_eq!(
        again.into_inner().tenant.unwrap().state,
        pb::TenantState::Deleted as i32
    );
    let status = h
        .tenants
        .create_user(with_token(
            pb::CreateUserRequest {
                tenant_id: acme.id.to_string(),
                email: "late@acme.test".into(),
                display_name: "Late".into(),
                role: String::new(),
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    // And the store refuses on its own, inside the insert's transaction, so a CreateUser
    // that passed its check just before the deletion began cannot land after it.
    let store = penny_tenants::store::Store::new(
        penny_platform::db::connect(&h.fleet.tenants().database.url)
            .await
            .unwrap(),
    );
    let now = penny_tenants::domain::now();
    let late = penny_tenants::domain::User {
        id: Uuid::now_v7(),
        tenant_id: acme.id,
        email: "late@acme.test".into(),
        display_name: "Late".into(),
        status: penny_tenants::domain::UserStatus::Active,
        suspend_reason: String::new(),
        suspend_alert_id: None,
        created_at: now,
        updated_at: now,
    };
    assert!(matches!(
        store.insert_user(&late).await,
        Err(penny_tenants::store::StoreError::NotActive)
    ));

    // The platform tenant is never deleted.
    let status = h
        .tenants
        .delete_tenant(with_token(
            pb::DeleteTenantRequest {
                tenant_id: penny_platform::principal::PLATFORM_TENANT_ID.to_string(),
                confirm_slug: "platform".into(),
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn revoking_the_owner_role_is_enforced_by_tenants_within_two_seconds() {
    let mut h = Harness::start().await;
    let acme = h.create("acme").await;
    for _ in 0..3 {
        // Allowed, and cached by the platform's decision cache.
        h.get_tenant(acme.id, &acme.owner_token).await.unwrap();
    }
    let owner = authz_pb::Subject {
        kind: PrincipalKind::User as i32,
        id: acme.owner.to_string(),
        tenant_id: acme.id.to_string(),
    };
    h.authz()
        .await
        .revoke_role(with_token(
            authz_pb::RevokeRoleRequest {
                tenant_id: acme.id.to_string(),
                subject: Some(owner.clone()),
                role: "owner".into(),
                workspace_id: String::new(),
            },
            &h.admin,
        ))
        .await
        .unwrap();
    assert_eventually!(
        Duration::from_secs(2),
        h.get_tenant(acme.id, &acme.owner_token)
            .await
            .is_err_and(|s| s.code() == Code::PermissionDenied)
    );
    // And granted back, allowed again.
    h.authz()
        .await
        .grant_role(with_token(
            authz_pb::GrantRoleRequest {
                tenant_id: acme.id.to_string(),
                subject: Some(owner),
                role: "owner".into(),
                workspace_id: String::new(),
            },
            &h.admin,
        ))
        .await
        .unwrap();
    assert_eventually!(
        Duration::from_secs(2),
        h.get_tenant(acme.id, &acme.owner_token).await.is_ok()
    );
}

/// With files in the fleet, deleting a tenant also removes its files, objects and rows,
/// after its key is shredded; another tenant's files stay.
#[tokio::test]
async fn deleting_a_tenant_removes_its_files_from_storage() {
    use penny_proto::files::v1 as files_pb;
    use penny_proto::files::v1::file_service_client::FileServiceClient;
    let mut h = Harness::start_with(TestFleet::builder().with_files()).await;
    let acme = h.create("acme").await;
    let globex = h.create("globex").await;
    let acme_member = h.user(&acme, "ann@acme.example", "member").await;
    let globex_member = h.user(&globex, "gil@globex.example", "member").await;
    let mut files = FileServiceClient::new(h.fleet.files().server.channel().await);
    let mut upload = async |tenant: &Made, member: Uuid| {
        let token = h.token_for(tenant.id, member);
        let messages = vec![
            files_pb::UploadRequest {
                part: Some(files_pb::upload_request::Part::Header(
                    files_pb::FileHeader {
                        tenant_id: tenant.id.to_string(),
                        filename: "notes.txt".into(),
                        declared_content_type: "text/plain".into(),
                        ..Default::default()
                    },
                )),
            },
            files_pb::UploadRequest {
                part: Some(files_pb::upload_request::Part::Chunk(
                    bytes::Bytes::from_static(b"some notes\n"),
                )),
            },
        ];
        let results = files
            .upload(with_token(tokio_stream::iter(messages), &token))
            .await
            .unwrap()
            .into_inner()
            .results;
        assert!(
            matches!(
                results[0].result,
                Some(files_pb::upload_result::Result::File(_))
            ),
            "{results:?}"
        );
    };
    upload(&acme, acme_member).await;
    upload(&acme, acme_member).await;
    upload(&globex, globex_member).await;
    let storage = h.fleet.files().storage_dir().to_path_buf();
    let objects_of = |tenant: Uuid| {
        let dir = storage.join(tenant.to_string());
        walk_files(&dir)
    };
    assert_eq!(objects_of(acme.id), 2);
    assert_eq!(objects_of(globex.id), 1);

    let deleted = h
        .tenants
        .delete_tenant(with_token(
            pb::DeleteTenantRequest {
                tenant_id: acme.id.to_string(),
                confirm_slug: "acme".into(),
            },
            &h.admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!(deleted.state, pb::TenantState::Deleted as i32);
    assert!(!h.key_exists(acme.id).await);
    assert_eq!(objects_of(acme.id), 0);
    assert_eq!(objects_of(globex.id), 1);
    let store = penny_files::store::Store::new(
        sea_orm::Database::connect(h.fleet.files().database.owner_url())
            .await
            .unwrap(),
    );
    assert!(hidden_file_rows(&store).await.is_empty());
    assert!(
        store
            .lowest_key_versions(None, 100)
            .await
            .unwrap()
            .iter()
            .all(|(tenant, _)| *tenant == globex.id)
    );
}

/// How many files are under `dir`, at any depth.
fn walk_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| {
            let path = entry.path();
            if path.is_dir() { walk_files(&path) } else { 1 }
        })
        .sum()
}
