//! The gRPC face of the tenants service: decode, validate, scope to the caller's tenant,
//! call the domain, map errors. Thin.

use std::time::Duration;

use penny_platform::page::{decode_page_token, encode_page_token, page_token_error};
use penny_platform::stack::{caller, caller_credential, tenant_scope};
use penny_platform::validate::{Violations, page_size};
use penny_platform::wire::timestamp;
use penny_platform::{AccessPolicy, Requirement, ServeConfig, ServiceBundle};
use penny_proto::tenants::v1 as pb;
use penny_proto::tenants::v1::tenant_service_server::{TenantService, TenantServiceServer};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::SERVICE_NAME;
use crate::domain::{
    MAX_DESCRIPTION_LEN, MAX_NAME_LEN, MAX_REASON_LEN, Plan, SecurityPolicy, Tenant, TenantState,
    User, UserStatus, Workspace, email_problem, fold_case, policy_bounds, slug_problem,
};
use crate::service::{NewTenant, PolicyField, TenantChanges, Tenants, UserChanges};

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
/// Longest role name a CreateUser may carry (authz's own bound).
const MAX_ROLE_LEN: usize = 64;

/// Who may call what. Creating, listing and deleting tenants is for platform staff; the
/// rest needs a permission in the caller's own tenant (the owner role holds `tenant:*`,
/// `user:*` and `workspace:*`), and the handler then refuses any other tenant's ids with
/// NOT_FOUND. Fleet services (the security monitor suspending a user) and staff pass.
pub(crate) fn policy() -> AccessPolicy {
    use Requirement::{Permission, PlatformAdmin};
    [
        ("CreateTenant", PlatformAdmin),
        ("GetTenant", Permission("tenant:read")),
        ("ListTenants", PlatformAdmin),
        ("UpdateTenant", Permission("tenant:update")),
        ("DeleteTenant", PlatformAdmin),
        ("CreateUser", Permission("user:create")),
        ("GetUser", Permission("user:read")),
        ("ListUsers", Permission("user:read")),
        ("UpdateUser", Permission("user:update")),
        ("SuspendUser", Permission("user:suspend")),
        ("ReactivateUser", Permission("user:reactivate")),
        ("CreateWorkspace", Permission("workspace:create")),
        ("ListWorkspaces", Permission("workspace:read")),
    ]
    .into_iter()
    .fold(AccessPolicy::new(), |policy, (method, requirement)| {
        policy.rpc(SERVICE_NAME, method, requirement)
    })
}

pub(crate) fn bundle(tenants: Tenants, serve_config: &ServeConfig) -> ServiceBundle {
    let probe = tenants.clone();
    let server = TenantServiceServer::new(TenantGrpc {
        tenants,
        audit: serve_config.audit.clone(),
    })
    .max_decoding_message_size(serve_config.max_message_bytes)
    .max_encoding_message_size(serve_config.max_message_bytes);
    ServiceBundle {
        name: "tenants",
        routes: tonic::service::Routes::new(server),
        grpc_services: vec![SERVICE_NAME],
        policy: policy(),
        descriptors: vec![penny_proto::FILE_DESCRIPTOR_SET],
        readiness: std::sync::Arc::new(move || {
            let tenants = probe.clone();
            Box::pin(async move { tenants.ready().await })
        }),
    }
}

struct TenantGrpc {
    tenants: Tenants,
    /// Where erasures are audited before they are done.
    audit: Option<penny_platform::AuditClient>,
}

fn duration_out(value: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(value.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

fn plan_out(plan: Plan) -> pb::Plan {
    match plan {
        Plan::Free => pb::Plan::Free,
        Plan::Starter => pb::Plan::Starter,
        Plan::Pro => pb::Plan::Pro,
        Plan::Enterprise => pb::Plan::Enterprise,
    }
}

fn tenant_out(t: &Tenant) -> pb::Tenant {
    pb::Tenant {
        id: t.id.to_string(),
        name: t.name.clone(),
        slug: t.slug.clone(),
        plan: plan_out(t.plan) as i32,
        security_policy: Some(pb::SecurityPolicy {
            mfa_required: t.policy.mfa_required,
            session_lifetime: Some(duration_out(t.policy.session_lifetime)),
            lockout_threshold: t.policy.lockout_threshold,
            lockout_window: Some(duration_out(t.policy.lockout_window)),
            lockout_duration: Some(duration_out(t.policy.lockout_duration)),
        }),
        state: match t.state {
            TenantState::Active => pb::TenantState::Active,
            TenantState::Pending => pb::TenantState::Pending,
            TenantState::Deleted => pb::TenantState::Deleted,
        } as i32,
        platform: t.platform,
        create_time: Some(timestamp(t.created_at)),
        update_time: Some(timestamp(t.updated_at)),
    }
}

fn user_out(u: &User) -> pb::User {
    pb::User {
        id: u.id.to_string(),
        tenant_id: u.tenant_id.to_string(),
        email: u.email.clone(),
        display_name: u.display_name.clone(),
        status: match u.status {
            UserStatus::Active => pb::UserStatus::Active,
            UserStatus::Suspended => pb::UserStatus::Suspended,
            UserStatus::Deleted => pb::UserStatus::Deleted,
        } as i32,
        suspend_reason: u.suspend_reason.clone(),
        create_time: Some(timestamp(u.created_at)),
        update_time: Some(timestamp(u.updated_at)),
    }
}

fn workspace_out(w: &Workspace) -> pb::Workspace {
    pb::Workspace {
        id: w.id.to_string(),
        tenant_id: w.tenant_id.to_string(),
        name: w.name.clone(),
        description: w.description.clone(),
        create_time: Some(timestamp(w.created_at)),
    }
}

/// A plan from the wire; UNSPECIFIED is `unspecified`.
fn plan_in(v: &mut Violations, field: &str, value: i32, unspecified: Option<Plan>) -> Plan {
    match pb::Plan::try_from(value) {
        Ok(pb::Plan::Free) => Plan::Free,
        Ok(pb::Plan::Starter) => Plan::Starter,
        Ok(pb::Plan::Pro) => Plan::Pro,
        Ok(pb::Plan::Enterprise) => Plan::Enterprise,
        Ok(pb::Plan::Unspecified) => unspecified.unwrap_or_else(|| {
            v.add(field, "required");
            Plan::Free
        }),
        Err(_) => {
            v.add(field, "not a known plan");
            Plan::Free
        }
    }
}

/// A duration setting: unset takes `default`; otherwise whole `min..=max`.
fn duration_in(
    v: &mut Violations,
    field: &str,
    value: Option<&prost_types::Duration>,
    default: Duration,
    (min, max): (Duration, Duration),
) -> Duration {
    let Some(value) = value else {
        return default;
    };
    let parsed = u64::try_from(value.seconds)
        .ok()
        .filter(|_| value.nanos >= 0)
        .map(Duration::from_secs);
    match parsed {
        Some(d) if d >= min && d <= max => d,
        _ => {
            v.add(
                field,
                format!("must be {}s..{}s", min.as_secs(), max.as_secs()),
            );
            default
        }
    }
}

/// A security policy from the wire, defaults for unset settings, every bound checked.
fn policy_in(v: &mut Violations, value: Option<&pb::SecurityPolicy>) -> SecurityPolicy {
    use policy_bounds::{
        LOCKOUT_MAX, LOCKOUT_MIN, SESSION_MAX, SESSION_MIN, THRESHOLD_MAX, THRESHOLD_MIN,
    };
    let defaults = SecurityPolicy::default();
    let Some(value) = value else {
        return defaults;
    };
    let lockout_threshold = match value.lockout_threshold {
        0 => defaults.lockout_threshold,
        n if (THRESHOLD_MIN..=THRESHOLD_MAX).contains(&n) => n,
        _ => {
            v.add(
                "security_policy.lockout_threshold",
                format!("must be {THRESHOLD_MIN}..{THRESHOLD_MAX} (0 means 5)"),
            );
            defaults.lockout_threshold
        }
    };
    SecurityPolicy {
        mfa_required: value.mfa_required,
        session_lifetime: duration_in(
            v,
            "security_policy.session_lifetime",
            value.session_lifetime.as_ref(),
            defaults.session_lifetime,
            (SESSION_MIN, SESSION_MAX),
        ),
        lockout_threshold,
        lockout_window: duration_in(
            v,
            "security_policy.lockout_window",
            value.lockout_window.as_ref(),
            defaults.lockout_window,
            (LOCKOUT_MIN, LOCKOUT_MAX),
        ),
        lockout_duration: duration_in(
            v,
            "security_policy.lockout_duration",
            value.lockout_duration.as_ref(),
            defaults.lockout_duration,
            (LOCKOUT_MIN, LOCKOUT_MAX),
        ),
    }
}

fn email_in(v: &mut Violations, field: &str, email: &str) {
    if let Some(problem) = email_problem(email) {
        v.add(field, problem);
    }
}

fn optional_uuid(v: &mut Violations, field: &str, value: &str) -> Option<Uuid> {
    (!value.is_empty()).then(|| v.uuid(field, value))
}

fn uuid_token(token: &str) -> Result<Option<Uuid>, Status> {
    Ok(decode_page_token(token)?
        .map(|text| Uuid::try_parse(&text).map_err(|_| page_token_error()))
        .transpose()?)
}

/// One page of `items` fetched with `limit + 1`: the page and the next token.
fn page<T>(mut items: Vec<T>, size: u32, cursor: impl Fn(&T) -> String) -> (Vec<T>, String) {
    let size = size as usize;
    if items.len() > size {
        items.truncate(size);
        let token = items.last().map(|last| encode_page_token(&cursor(last)));
        (items, token.unwrap_or_default())
    } else {
        (items, String::new())
    }
}

/// The tenant a request names, scoped to the caller (another tenant's id: NOT_FOUND).
fn scoped<T>(request: &Request<T>, v: &mut Violations, tenant_id: &str) -> Result<Uuid, Status> {
    let tenant = v.uuid("tenant_id", tenant_id);
    if tenant.is_nil() {
        return Ok(tenant);
    }
    Ok(tenant_scope(caller(request)?, tenant)?)
}

#[tonic::async_trait]
impl TenantService for TenantGrpc {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::new();
        let request_id = v.uuid("request_id", &request.request_id);
        v.text("name", &request.name, 1, MAX_NAME_LEN);
        if let Some(problem) = slug_problem(&request.slug) {
            v.add("slug", problem);
        }
        let plan = plan_in(&mut v, "plan", request.plan, Some(Plan::Free));
        let policy = policy_in(&mut v, request.security_policy.as_ref());
        let owner = request.owner.unwrap_or_default();
        email_in(&mut v, "owner.email", &owner.email);
        v.text("owner.display_name", &owner.display_name, 1, MAX_NAME_LEN);
        v.finish()?;
        let (tenant, owner) = self
            .tenants
            .create_tenant(NewTenant {
                request_id,
                name: request.name,
                slug: request.slug,
                plan,
                policy,
                owner_email: owner.email,
                owner_name: owner.display_name,
            })
            .await?;
        Ok(Response::new(pb::CreateTenantResponse {
            tenant: Some(tenant_out(&tenant)),
            owner: Some(user_out(&owner)),
        }))
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::GetTenantResponse>, Status> {
        let mut v = Violations::new();
        let tenant = scoped(&request, &mut v, &request.get_ref().tenant_id)?;
        v.finish()?;
        let tenant = self.tenants.tenant(tenant).await?;
        Ok(Response::new(pb::GetTenantResponse {
            tenant: Some(tenant_out(&tenant)),
        }))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::new();
        let state = match pb::TenantState::try_from(request.state) {
            Ok(pb::TenantState::Unspecified) => None,
            Ok(pb::TenantState::Active) => Some(TenantState::Active),
            Ok(pb::TenantState::Pending) => Some(TenantState::Pending),
            Ok(pb::TenantState::Deleted) => Some(TenantState::Deleted),
            Err(_) => {
                v.add("state", "not a known state");
                None
            }
        };
        let size = page_size(&mut v, request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE);
        v.finish()?;
        let after = uuid_token(&request.page_token)?;
        let tenants = self
            .tenants
            .list_tenants(state, after, u64::from(size) + 1)
            .await?;
        let (tenants, next_page_token) = page(tenants, size, |t| t.id.to_string());
        Ok(Response::new(pb::ListTenantsResponse {
            tenants: tenants.iter().map(tenant_out).collect(),
            next_page_token,
        }))
    }

    async fn update_tenant(
        &self,
        request: Request<pb::UpdateTenantRequest>,
    ) -> Result<Response<pb::UpdateTenantResponse>, Status> {
        const PATHS: &[&str] = &[
            "name",
            "plan",
            "security_policy",
            "security_policy.mfa_required",
            "security_policy.session_lifetime",
            "security_policy.lockout_threshold",
            "security_policy.lockout_window",
            "security_policy.lockout_duration",
        ];
        let mut v = Violations::new();
        let tenant = scoped(&request, &mut v, &request.get_ref().tenant_id)?;
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let paths = v.field_mask("update_mask", request.update_mask.as_ref(), PATHS);
        let mut changes = TenantChanges::default();
        for path in &paths {
            match path.as_str() {
                "name" => {
                    v.text("name", &request.name, 1, MAX_NAME_LEN);
                    changes.name = Some(request.name.clone());
                }
                "plan" => changes.plan = Some(plan_in(&mut v, "plan", request.plan, None)),
                "security_policy" => changes.policy_fields.extend(PolicyField::ALL),
                "security_policy.mfa_required" => {
                    changes.policy_fields.push(PolicyField::MfaRequired);
                }
                "security_policy.session_lifetime" => {
                    changes.policy_fields.push(PolicyField::SessionLifetime);
                }
                "security_policy.lockout_threshold" => {
                    changes.policy_fields.push(PolicyField::LockoutThreshold);
                }
                "security_policy.lockout_window" => {
                    changes.policy_fields.push(PolicyField::LockoutWindow);
                }
                _ => changes.policy_fields.push(PolicyField::LockoutDuration),
            }
        }
        if !changes.policy_fields.is_empty() {
            changes.policy = policy_in(&mut v, request.security_policy.as_ref());
        }
        v.finish()?;
        let tenant = self
            .tenants
            .update_tenant(&principal, tenant, changes)
            .await?;
        Ok(Response::new(pb::UpdateTenantResponse {
            tenant: Some(tenant_out(&tenant)),
        }))
    }

    async fn delete_tenant(
        &self,
        request: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        let credential = caller_credential(&request)?;
        let principal = penny_platform::stack::caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        v.length("confirm_slug", &request.confirm_slug, 1, 63);
        v.finish()?;
        // Erasure is security-critical: audited before it is done, or not done. The event
        // goes to the platform's chain, which outlives the tenant's.
        let audited = penny_platform::CriticalAction::begin(
            self.audit.as_ref(),
            "tenants",
            "/penny.tenants.v1.TenantService/DeleteTenant",
            &principal,
            penny_platform::principal::PLATFORM_TENANT_ID,
            ("tenant", tenant.to_string()),
            &[],
        )
        .await?;
        let deleted = self
            .tenants
            .delete_tenant(tenant, &request.confirm_slug, &credential)
            .await
            .map_err(Status::from);
        audited.finish(&deleted, &[]);
        let tenant = deleted?;
        Ok(Response::new(pb::DeleteTenantResponse {
            tenant: Some(tenant_out(&tenant)),
        }))
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let mut v = Violations::new();
        let tenant = scoped(&request, &mut v, &request.get_ref().tenant_id)?;
        let credential = caller_credential(&request)?;
        let request = request.into_inner();
        email_in(&mut v, "email", &request.email);
        v.text("display_name", &request.display_name, 1, MAX_NAME_LEN);
        let role = (!request.role.is_empty()).then(|| {
            v.length("role", &request.role, 1, MAX_ROLE_LEN);
            request.role.clone()
        });
        v.finish()?;
        let now = crate::domain::now();
        let user = User {
            id: Uuid::now_v7(),
            tenant_id: tenant,
            email: request.email,
            display_name: request.display_name,
            status: UserStatus::Active,
            suspend_reason: String::new(),
            suspend_alert_id: None,
            created_at: now,
            updated_at: now,
        };
        let user = self.tenants.create_user(&credential, user, role).await?;
        Ok(Response::new(pb::CreateUserResponse {
            user: Some(user_out(&user)),
        }))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let mut v = Violations::new();
        let tenant = scoped(&request, &mut v, &request.get_ref().tenant_id)?;
        let user = v.uuid("user_id", &request.get_ref().user_id);
        v.finish()?;
        let user = self.tenants.user(tenant, user).await?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(user_out(&user)),
        }))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let mut v = Violations::new();
        let tenant = scoped(&request, &mut v, &request.get_ref().tenant_id)?;
        let request = request.into_inner();
        let statuses: &[UserStatus] = match pb::UserStatus::try_from(request.status) {
            Ok(pb::UserStatus::Unspecified) => &[UserStatus::Active, UserStatus::Suspended],
            Ok(pb::UserStatus::Active) => &[UserStatus::Active],
            Ok(pb::UserStatus::Suspended) => &[UserStatus::Suspended],
            Ok(pb::UserStatus::Deleted) => &[UserStatus::Deleted],
            Err(_) => {
                v.add("status", "not a known status");
                &[]
            }
        };
        let email = (!request.email.is_empty()).then(|| {
            v.length("email", &request.email, 1, 254);
            request.email.as_str()
        });
        let size = page_size(&mut v, request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE);
        v.finish()?;
        let after = uuid_token(&request.page_token)?;
        let users = self
            .tenants
            .list_users(tenant, statuses, email, after, u64::from(size) + 1)
            .await?;
        let (users, next_page_token) = page(users, size, |u| u.id.to_string());
        Ok(Response::new(pb::ListUsersResponse {
            users: users.iter().map(user_out).collect(),
            next_page_token,
        }))
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        const PATHS: &[&str] = &["email", "display_name"];
        let mut v = Violations::new();
        let tenant = scoped(&request, &mut v, &request.get_ref().tenant_id)?;
        let request = request.into_inner();
        let user = v.uuid("user_id", &request.user_id);
        let mut changes = UserChanges::default();
        for path in v.field_mask("update_mask", request.update_mask.as_ref(), PATHS) {
            if path == "email" {
                email_in(&mut v, "email", &request.email);
                changes.email = Some(request.email.clone());
            } else {
                v.text("display_name", &request.display_name, 1, MAX_NAME_LEN);
                changes.display_name = Some(request.display_name.clone());
            }
        }
        v.finish()?;
        let user = self.tenants.update_user(tenant, user, changes).await?;
        Ok(Response::new(pb::UpdateUserResponse {
            user: Some(user_out(&user)),
        }))
    }

    async fn suspend_user(
        &self,
        request: Request<pb::SuspendUserRequest>,
    ) -> Result<Response<pb::SuspendUserResponse>, Status> {
        let mut v = Violations::new();
        let tenant = scoped(&request, &mut v, &request.get_ref().tenant_id)?;
        let request = request.into_inner();
        let user = v.uuid("user_id", &request.user_id);
        v.text("reason", &request.reason, 1, MAX_REASON_LEN);
        let alert = optional_uuid(&mut v, "alert_id", &request.alert_id);
        v.finish()?;
        let user = self
            .tenants
            .suspend_user(tenant, user, request.reason, alert)
            .await?;
        Ok(Response::new(pb::SuspendUserResponse {
            user: Some(user_out(&user)),
        }))
    }

    async fn reactivate_user(
        &self,
        request: Request<pb::ReactivateUserRequest>,
    ) -> Result<Response<pb::ReactivateUserResponse>, Status> {
        let mut v = Violations::new();
        let tenant = scoped(&request, &mut v, &request.get_ref().tenant_id)?;
        let request = request.into_inner();
        let user = v.uuid("user_id", &request.user_id);
        v.text("reason", &request.reason, 0, MAX_REASON_LEN);
        v.finish()?;
        let user = self.tenants.reactivate_user(tenant, user).await?;
        Ok(Response::new(pb::ReactivateUserResponse {
            user: Some(user_out(&user)),
        }))
    }

    async fn create_workspace(
        &self,
        request: Request<pb::CreateWorkspaceRequest>,
    ) -> Result<Response<pb::CreateWorkspaceResponse>, Status> {
        let mut v = Violations::new();
        let tenant = scoped(&request, &mut v, &request.get_ref().tenant_id)?;
        let request = request.into_inner();
        v.text("name", &request.name, 1, MAX_NAME_LEN);
        v.text("description", &request.description, 0, MAX_DESCRIPTION_LEN);
        v.finish()?;
        let workspace = self
            .tenants
            .create_workspace(Workspace {
                id: Uuid::now_v7(),
                tenant_id: tenant,
                name: request.name,
                description: request.description,
                created_at: crate::domain::now(),
            })
            .await?;
        Ok(Response::new(pb::CreateWorkspaceResponse {
            workspace: Some(workspace_out(&workspace)),
        }))
    }

    async fn list_workspaces(
        &self,
        request: Request<pb::ListWorkspacesRequest>,
    ) -> Result<Response<pb::ListWorkspacesResponse>, Status> {
        let mut v = Violations::new();
        let tenant = scoped(&request, &mut v, &request.get_ref().tenant_id)?;
        let request = request.into_inner();
        let size = page_size(&mut v, request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE);
        v.finish()?;
        let after = decode_page_token(&request.page_token)?;
        let workspaces = self
            .tenants
            .list_workspaces(tenant, after.as_deref(), u64::from(size) + 1)
            .await?;
        let (workspaces, next_page_token) = page(workspaces, size, |w| fold_case(&w.name));
        Ok(Response::new(pb::ListWorkspacesResponse {
            workspaces: workspaces.iter().map(workspace_out).collect(),
            next_page_token,
        }))
    }
}
