//! The gRPC face of the authz service: decode, validate, call the domain, map errors. Thin.

use std::pin::Pin;
use std::time::Duration;

use penny_platform::page::{decode_page_token, encode_page_token, page_token_error};
use penny_platform::principal::{Principal, PrincipalKind as PlatformKind};
use penny_platform::stack::{caller, draining};
use penny_platform::validate::{Violations, page_size};
use penny_platform::wire::timestamp;
use penny_platform::{AccessPolicy, ApiError, Reason, Requirement, ServeConfig, ServiceBundle};
use penny_proto::authz::v1 as pb;
use penny_proto::authz::v1::authz_service_server::{AuthzService, AuthzServiceServer};
use penny_proto::common::v1::PrincipalKind;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::SERVICE_NAME;
use crate::domain::decision::DenyReason;
use crate::domain::roles::{MAX_ROLE_PERMISSIONS, check_custom_name};
use crate::domain::{
    Binding, Change, ChangeKind, ChangeObject, Decision, Grant, Required, Role, Subject,
    SubjectKind,
};
use crate::service::{Actor, Authz};
use crate::store::BindingFilter;

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
/// Most checks in one `BatchCheck`.
pub const MAX_BATCH_CHECKS: usize = 100;
/// Longest subject id.
const MAX_SUBJECT_ID_LEN: usize = 256;
/// Longest role description.
const MAX_DESCRIPTION_LEN: usize = 1024;
/// How often an open watch stream looks for changes committed through other replicas.
const STREAM_POLL: Duration = Duration::from_millis(200);
/// A heartbeat on every watch stream at least this often.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// Decisions and the change feed are for the fleet (the platform's enforcement layer) and
/// staff; role management is open to any authenticated caller and decided by the domain
/// (tenant boundary, `tenant:manage_roles` / `user:grant`, no escalation).
pub(crate) fn policy() -> AccessPolicy {
    use Requirement::{Authenticated, ServiceOrAdmin};
    [
        ("Check", ServiceOrAdmin),
        ("BatchCheck", ServiceOrAdmin),
        ("ListPermissions", ServiceOrAdmin),
        ("Explain", ServiceOrAdmin),
        ("WatchChanges", ServiceOrAdmin),
        ("CreateRole", Authenticated),
        ("UpdateRole", Authenticated),
        ("DeleteRole", Authenticated),
        ("ListRoles", Authenticated),
        ("GrantRole", Authenticated),
        ("RevokeRole", Authenticated),
        ("ListRoleBindings", Authenticated),
    ]
    .into_iter()
    .fold(AccessPolicy::new(), |policy, (method, requirement)| {
        policy.rpc(SERVICE_NAME, method, requirement)
    })
}

pub(crate) fn bundle(authz: Authz, serve_config: &ServeConfig) -> ServiceBundle {
    let probe = authz.clone();
    let server = AuthzServiceServer::new(AuthzGrpc {
        authz,
        audit: serve_config.audit.clone(),
    })
    .max_decoding_message_size(serve_config.max_message_bytes)
    .max_encoding_message_size(serve_config.max_message_bytes);
    ServiceBundle {
        name: "authz",
        routes: tonic::service::Routes::new(server),
        grpc_services: vec![SERVICE_NAME],
        policy: policy(),
        descriptors: vec![penny_proto::FILE_DESCRIPTOR_SET],
        readiness: std::sync::Arc::new(move || {
            let authz = probe.clone();
            Box::pin(async move { authz.ready().await })
        }),
    }
}

struct AuthzGrpc {
    authz: Authz,
    /// Where role grants and revocations are audited before they are made.
    audit: Option<penny_platform::AuditClient>,
}

/// What a grant or revocation is about, for its audit events.
fn binding_attributes(
    subject: &Subject,
    role: &str,
    workspace: Option<Uuid>,
) -> Vec<(&'static str, String)> {
    vec![
        ("role", role.to_owned()),
        (
            "subject_kind",
            format!("{:?}", subject.kind).to_ascii_lowercase(),
        ),
        ("subject_id", subject.id.clone()),
        (
            "workspace_id",
            workspace.map(|w| w.to_string()).unwrap_or_default(),
        ),
    ]
}

fn actor(principal: &Principal) -> Actor {
    Actor {
        subject: Subject {
            kind: match principal.kind {
                PlatformKind::User => SubjectKind::User,
                PlatformKind::ApiKey => SubjectKind::ApiKey,
                PlatformKind::Service => SubjectKind::Service,
            },
            id: principal.id.clone(),
            tenant_id: principal.tenant_id,
        },
        is_service: principal.is_service(),
        is_platform_admin: principal.is_platform_admin(),
    }
}

fn subject_in(v: &mut Violations, field: &str, subject: Option<&pb::Subject>) -> Subject {
    let Some(subject) = subject else {
        v.add(field, "required");
        return Subject {
            kind: SubjectKind::User,
            id: String::new(),
            tenant_id: Uuid::nil(),
        };
    };
    let kind = match PrincipalKind::try_from(subject.kind) {
        Ok(PrincipalKind::User) => SubjectKind::User,
        Ok(PrincipalKind::ApiKey) => SubjectKind::ApiKey,
        Ok(PrincipalKind::Service) => SubjectKind::Service,
        _ => {
            v.add(format!("{field}.kind"), "must be USER, API_KEY or SERVICE");
            SubjectKind::User
        }
    };
    v.length(&format!("{field}.id"), &subject.id, 1, MAX_SUBJECT_ID_LEN);
    let tenant_id = v.uuid(&format!("{field}.tenant_id"), &subject.tenant_id);
    Subject {
        kind,
        id: subject.id.clone(),
        tenant_id,
    }
}

fn subject_out(subject: &Subject) -> pb::Subject {
    pb::Subject {
        kind: match subject.kind {
            SubjectKind::User => PrincipalKind::User,
            SubjectKind::ApiKey => PrincipalKind::ApiKey,
            SubjectKind::Service => PrincipalKind::Service,
        } as i32,
        id: subject.id.clone(),
        tenant_id: subject.tenant_id.to_string(),
    }
}

fn optional_uuid(v: &mut Violations, field: &str, value: &str) -> Option<Uuid> {
    if value.is_empty() {
        None
    } else {
        Some(v.uuid(field, value))
    }
}

fn required_permission(v: &mut Violations, field: &str, value: &str) -> Option<Required> {
    match Required::parse(value) {
        Ok(required) => Some(required),
        Err(why) => {
            v.add_with_reason(field, why, Reason::PermissionMalformed);
            None
        }
    }
}

/// One decision question, validated: every bad field recorded under `prefix`.
struct Question {
    tenant: Uuid,
    subject: Subject,
    required: Option<Required>,
    workspace: Option<Uuid>,
}

fn question(
    v: &mut Violations,
    prefix: &str,
    tenant_id: &str,
    subject: Option<&pb::Subject>,
    permission: &str,
    workspace_id: &str,
) -> Question {
    Question {
        tenant: v.uuid(&format!("{prefix}tenant_id"), tenant_id),
        subject: subject_in(v, &format!("{prefix}subject"), subject),
        required: required_permission(v, &format!("{prefix}permission"), permission),
        workspace: optional_uuid(v, &format!("{prefix}workspace_id"), workspace_id),
    }
}

impl Question {
    /// The permission; always present once the violations were checked.
    fn required(&self) -> Result<&Required, ApiError> {
        self.required
            .as_ref()
            .ok_or_else(|| ApiError::invalid_field("permission", "required"))
    }
}

fn grants_in(v: &mut Violations, field: &str, values: &[String]) -> Vec<Grant> {
    if values.len() > MAX_ROLE_PERMISSIONS {
        v.add(field, format!("at most {MAX_ROLE_PERMISSIONS} permissions"));
        return Vec::new();
    }
    let mut grants = Vec::new();
    for (i, value) in values.iter().enumerate() {
        match Grant::parse(value) {
            Ok(grant) if !grants.contains(&grant) => grants.push(grant),
            Ok(_) => {}
            Err(why) => {
                v.add_with_reason(format!("{field}[{i}]"), why, Reason::PermissionMalformed)
            }
        }
    }
    grants
}

fn role_out(role: &Role) -> pb::Role {
    pb::Role {
        tenant_id: role.tenant_id.map(|t| t.to_string()).unwrap_or_default(),
        name: role.name.clone(),
        description: role.description.clone(),
        permissions: role.grants.iter().map(ToString::to_string).collect(),
        built_in: role.built_in(),
        create_time: Some(timestamp(role.created_at)),
        update_time: Some(timestamp(role.updated_at)),
    }
}

fn binding_out(binding: &Binding) -> pb::RoleBinding {
    pb::RoleBinding {
        id: binding.id.to_string(),
        tenant_id: binding.tenant_id.to_string(),
        subject: Some(subject_out(&binding.subject)),
        role: binding.role.clone(),
        workspace_id: binding
            .workspace_id
            .map(|w| w.to_string())
            .unwrap_or_default(),
        granter_id: binding.granter_id.clone(),
        create_time: Some(timestamp(binding.created_at)),
    }
}

fn change_out(change: &Change) -> pb::Change {
    pb::Change {
        revision: change.revision,
        change_type: match change.kind {
            ChangeKind::BindingCreated => pb::ChangeType::BindingCreated,
            ChangeKind::BindingDeleted => pb::ChangeType::BindingDeleted,
            ChangeKind::RoleCreated => pb::ChangeType::RoleCreated,
            ChangeKind::RoleUpdated => pb::ChangeType::RoleUpdated,
            ChangeKind::RoleDeleted => pb::ChangeType::RoleDeleted,
        } as i32,
        tenant_id: change.tenant_id.to_string(),
        object: Some(match &change.object {
            ChangeObject::Binding(b) => pb::change::Object::RoleBinding(binding_out(b)),
            ChangeObject::Role(r) => pb::change::Object::Role(role_out(r)),
        }),
        commit_time: Some(timestamp(change.committed_at)),
    }
}

fn role_name(v: &mut Violations, value: &str) {
    if value.is_empty() || value.len() > 64 {
        v.add("role", "must be 1-64 characters");
    }
}

/// The tenant, subject and scope of a grant or revocation, validated (and the role's name).
fn binding_target(
    tenant_id: &str,
    subject: Option<&pb::Subject>,
    role: &str,
    workspace_id: &str,
) -> Result<(Uuid, Subject, Option<Uuid>), ApiError> {
    let mut v = Violations::new();
    let tenant = v.uuid("tenant_id", tenant_id);
    let subject = subject_in(&mut v, "subject", subject);
    role_name(&mut v, role);
    let workspace = optional_uuid(&mut v, "workspace_id", workspace_id);
    v.finish()?;
    Ok((tenant, subject, workspace))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchChangesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AuthzService for AuthzGrpc {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::new();
        let q = question(
            &mut v,
            "",
            &request.tenant_id,
            request.subject.as_ref(),
            &request.permission,
            &request.workspace_id,
        );
        v.finish()?;
        self.authz.catch_up(request.min_revision).await?;
        // The revision before the decision: the answer reflects at least this much.
        let revision = self.authz.revision();
        let decision = self
            .authz
            .check(q.tenant, &q.subject, q.required()?, q.workspace)
            .await?;
        Ok(Response::new(pb::CheckResponse {
            allowed: decision.allowed(),
            revision,
        }))
    }

    async fn batch_check(
        &self,
        request: Request<pb::BatchCheckRequest>,
    ) -> Result<Response<pb::BatchCheckResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::new();
        v.count("items", request.items.len(), 1, MAX_BATCH_CHECKS);
        let mut checks = Vec::new();
        if request.items.len() <= MAX_BATCH_CHECKS {
            for (i, item) in request.items.iter().enumerate() {
                checks.push(question(
                    &mut v,
                    &format!("items[{i}]."),
                    &item.tenant_id,
                    item.subject.as_ref(),
                    &item.permission,
                    &item.workspace_id,
                ));
            }
        }
        v.finish()?;
        let revision = self.authz.revision();
        let mut results = Vec::with_capacity(checks.len());
        for q in checks {
            let allowed = self
                .authz
                .check(q.tenant, &q.subject, q.required()?, q.workspace)
                .await?
                .allowed();
            results.push(pb::BatchCheckResult { allowed });
        }
        Ok(Response::new(pb::BatchCheckResponse { results, revision }))
    }

    async fn list_permissions(
        &self,
        request: Request<pb::ListPermissionsRequest>,
    ) -> Result<Response<pb::ListPermissionsResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        let subject = subject_in(&mut v, "subject", request.subject.as_ref());
        let workspace = optional_uuid(&mut v, "workspace_id", &request.workspace_id);
        let size = page_size(&mut v, request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE) as usize;
        v.finish()?;
        let after = decode_page_token(&request.page_token)?;
        let mut permissions: Vec<String> = self
            .authz
            .grants(tenant, &subject, workspace)
            .await?
            .iter()
            .map(ToString::to_string)
            .collect();
        permissions.sort();
        if let Some(after) = after {
            permissions.retain(|p| *p > after);
        }
        let next_page_token = if permissions.len() > size {
            permissions.truncate(size);
            permissions
                .last()
                .map(|p| encode_page_token(p))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListPermissionsResponse {
            permissions,
            next_page_token,
        }))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::new();
        let q = question(
            &mut v,
            "",
            &request.tenant_id,
            request.subject.as_ref(),
            &request.permission,
            &request.workspace_id,
        );
        v.finish()?;
        let required = q.required()?;
        let revision = self.authz.revision();
        let decision = self
            .authz
            .check(q.tenant, &q.subject, required, q.workspace)
            .await?;
        let (tenant, subject) = (q.tenant, &q.subject);
        let evaluated = self.authz.bindings_for_explain(tenant, subject).await?;
        let evaluated_bindings = evaluated.iter().map(binding_out).collect();
        let reply = match decision {
            Decision::Allowed {
                binding,
                role,
                grant,
            } => pb::ExplainResponse {
                allowed: true,
                r#match: Some(pb::Match {
                    role_binding: Some(binding_out(&binding)),
                    role: Some(role_out(&role)),
                    permission: grant.to_string(),
                }),
                deny_reason: pb::DenyReason::Unspecified as i32,
                message: format!(
                    "allowed: role {} grants {} which covers {}",
                    role.name, grant, required
                ),
                evaluated_bindings,
                revision,
            },
            Decision::Denied(reason) => {
                let (reason, message) = match reason {
                    DenyReason::TenantMismatch => (
                        pb::DenyReason::TenantMismatch,
                        "denied: the subject belongs to another tenant; no role was considered"
                            .to_owned(),
                    ),
                    DenyReason::NoBinding => (
                        pb::DenyReason::NoBinding,
                        "denied: the subject has no role binding in scope".to_owned(),
                    ),
                    DenyReason::NoMatchingPermission => (
                        pb::DenyReason::NoMatchingPermission,
                        format!("denied: no role of the subject grants {required}"),
                    ),
                };
                pb::ExplainResponse {
                    allowed: false,
                    r#match: None,
                    deny_reason: reason as i32,
                    message,
                    evaluated_bindings,
                    revision,
                }
            }
        };
        Ok(Response::new(reply))
    }

    async fn create_role(
        &self,
        request: Request<pb::CreateRoleRequest>,
    ) -> Result<Response<pb::CreateRoleResponse>, Status> {
        let actor = actor(caller(&request)?);
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        if let Err(why) = check_custom_name(&request.name) {
            v.add("name", why);
        }
        v.length("description", &request.description, 0, MAX_DESCRIPTION_LEN);
        let grants = grants_in(&mut v, "permissions", &request.permissions);
        if request.permissions.is_empty() {
            v.add("permissions", "a role grants at least one permission");
        }
        v.finish()?;
        let role = self
            .authz
            .create_role(&actor, tenant, &request.name, &request.description, grants)
            .await?;
        Ok(Response::new(pb::CreateRoleResponse {
            role: Some(role_out(&role)),
        }))
    }

    async fn update_role(
        &self,
        request: Request<pb::UpdateRoleRequest>,
    ) -> Result<Response<pb::UpdateRoleResponse>, Status> {
        let actor = actor(caller(&request)?);
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        v.length("name", &request.name, 1, 64);
        let paths: Vec<String> = request.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            v.add(
                "update_mask",
                "name the fields to change: description, permissions",
            );
        }
        let mut description = None;
        let mut grants = None;
        for (i, path) in paths.iter().enumerate() {
            match path.as_str() {
                "description" => {
                    v.length("description", &request.description, 0, MAX_DESCRIPTION_LEN);
                    description = Some(request.description.clone());
                }
                "permissions" => {
                    if request.permissions.is_empty() {
                        v.add("permissions", "a role grants at least one permission");
                    }
                    grants = Some(grants_in(&mut v, "permissions", &request.permissions));
                }
                _ => v.add(
                    format!("update_mask.paths[{i}]"),
                    "only description and permissions can change",
                ),
            }
        }
        v.finish()?;
        let role = self
            .authz
            .update_role(&actor, tenant, &request.name, description, grants)
            .await?;
        Ok(Response::new(pb::UpdateRoleResponse {
            role: Some(role_out(&role)),
        }))
    }

    async fn delete_role(
        &self,
        request: Request<pb::DeleteRoleRequest>,
    ) -> Result<Response<pb::DeleteRoleResponse>, Status> {
        let actor = actor(caller(&request)?);
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        v.length("name", &request.name, 1, 64);
        v.finish()?;
        let revoked = self
            .authz
            .delete_role(&actor, tenant, &request.name, request.force)
            .await?;
        Ok(Response::new(pb::DeleteRoleResponse {
            revoked_binding_count: u32::try_from(revoked).unwrap_or(u32::MAX),
        }))
    }

    async fn list_roles(
        &self,
        request: Request<pb::ListRolesRequest>,
    ) -> Result<Response<pb::ListRolesResponse>, Status> {
        let actor = actor(caller(&request)?);
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        let size = page_size(&mut v, request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE) as usize;
        v.finish()?;
        let after = decode_page_token(&request.page_token)?;
        let roles = self.authz.list_roles(&actor, tenant).await?;
        let start = match &after {
            Some(name) => roles
                .iter()
                .position(|r| r.name == *name)
                .map(|i| i + 1)
                .ok_or_else(page_token_error)?,
            None => 0,
        };
        let page: Vec<&Role> = roles.iter().skip(start).take(size).collect();
        let next_page_token = if start + page.len() < roles.len() {
            page.last()
                .map(|r| encode_page_token(&r.name))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListRolesResponse {
            roles: page.into_iter().map(role_out).collect(),
            next_page_token,
        }))
    }

    async fn grant_role(
        &self,
        request: Request<pb::GrantRoleRequest>,
    ) -> Result<Response<pb::GrantRoleResponse>, Status> {
        let principal = caller(&request)?.clone();
        let actor = actor(&principal);
        let request = request.into_inner();
        let (tenant, subject, workspace) = binding_target(
            &request.tenant_id,
            request.subject.as_ref(),
            &request.role,
            &request.workspace_id,
        )?;
        // A grant is security-critical: audited before it is made, or not made.
        let audited = penny_platform::CriticalAction::begin(
            self.audit.as_ref(),
            "authz",
            "/penny.authz.v1.AuthzService/GrantRole",
            &principal,
            tenant,
            ("role_binding", String::new()),
            &binding_attributes(&subject, &request.role, workspace),
        )
        .await?;
        let granted = self
            .authz
            .grant(&actor, tenant, subject, &request.role, workspace)
            .await
            .map_err(Status::from);
        audited.finish(
            &granted,
            &granted
                .as_ref()
                .map(|(binding, created, privilege_change)| {
                    vec![
                        ("binding_id", binding.id.to_string()),
                        ("created", created.to_string()),
                        ("privilege_change", privilege_change.to_string()),
                    ]
                })
                .unwrap_or_default(),
        );
        let (binding, created, privilege_change) = granted?;
        Ok(Response::new(pb::GrantRoleResponse {
            role_binding: Some(binding_out(&binding)),
            created,
            privilege_change,
        }))
    }

    async fn revoke_role(
        &self,
        request: Request<pb::RevokeRoleRequest>,
    ) -> Result<Response<pb::RevokeRoleResponse>, Status> {
        let principal = caller(&request)?.clone();
        let actor = actor(&principal);
        let request = request.into_inner();
        let (tenant, subject, workspace) = binding_target(
            &request.tenant_id,
            request.subject.as_ref(),
            &request.role,
            &request.workspace_id,
        )?;
        let audited = penny_platform::CriticalAction::begin(
            self.audit.as_ref(),
            "authz",
            "/penny.authz.v1.AuthzService/RevokeRole",
            &principal,
            tenant,
            ("role_binding", String::new()),
            &binding_attributes(&subject, &request.role, workspace),
        )
        .await?;
        let revoked = self
            .authz
            .revoke(&actor, tenant, &subject, &request.role, workspace)
            .await
            .map_err(Status::from);
        audited.finish(
            &revoked,
            &revoked
                .as_ref()
                .map(|binding| vec![("binding_id", binding.id.to_string())])
                .unwrap_or_default(),
        );
        let binding = revoked?;
        Ok(Response::new(pb::RevokeRoleResponse {
            role_binding: Some(binding_out(&binding)),
        }))
    }

    async fn list_role_bindings(
        &self,
        request: Request<pb::ListRoleBindingsRequest>,
    ) -> Result<Response<pb::ListRoleBindingsResponse>, Status> {
        let actor = actor(caller(&request)?);
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        let subject = request
            .subject
            .as_ref()
            .map(|s| subject_in(&mut v, "subject", Some(s)));
        let workspace_id = optional_uuid(&mut v, "workspace_id", &request.workspace_id);
        let size = page_size(&mut v, request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE);
        v.finish()?;
        let after = match decode_page_token(&request.page_token)? {
            Some(text) => Some(Uuid::try_parse(&text).map_err(|_| page_token_error())?),
            None => None,
        };
        let filter = BindingFilter {
            subject,
            role: (!request.role.is_empty()).then(|| request.role.clone()),
            workspace_id,
        };
        let mut bindings = self
            .authz
            .list_bindings(&actor, tenant, &filter, after, u64::from(size) + 1)
            .await?;
        let next_page_token = if bindings.len() > size as usize {
            bindings.truncate(size as usize);
            bindings
                .last()
                .map(|b| encode_page_token(&b.id.to_string()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListRoleBindingsResponse {
            role_bindings: bindings.iter().map(binding_out).collect(),
            next_page_token,
        }))
    }

    type WatchChangesStream = WatchStream;

    async fn watch_changes(
        &self,
        request: Request<pb::WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        let mut draining = draining(&request);
        let after = request.into_inner().after_revision;
        let authz = self.authz.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::WatchChangesResponse, Status>>(16);
        tokio::spawn(async move {
            let mut updates = authz.subscribe();
            let current = authz.revision();
            let mut last = if after == 0 || after > current {
                // From now: the receiver starts with a clean cache.
                let hello = pb::WatchChangesResponse {
                    changes: Vec::new(),
                    revision: current,
                    reset: true,
                };
                if tx.send(Ok(hello)).await.is_err() {
                    return;
                }
                current
            } else {
                after
            };
            let mut next_heartbeat = tokio::time::Instant::now() + HEARTBEAT;
            loop {
                // Apply what was committed (through any replica), then send it: a watcher
                // that drops a cached decision on a change must not be able to ask this
                // replica again before its own cache has dropped it too.
                if let Err(err) = authz.apply_committed().await {
                    let _ = tx.send(Err(Status::from(err))).await;
                    return;
                }
                let applied = authz.revision();
                while last < applied {
                    let changes = match authz.changes_after(last, 500).await {
                        Ok(changes) => changes,
                        Err(err) => {
                            let _ = tx.send(Err(Status::from(err))).await;
                            return;
                        }
                    };
                    let changes: Vec<_> = changes
                        .into_iter()
                        .filter(|c| c.revision <= applied)
                        .collect();
                    let Some(newest) = changes.last().map(|c| c.revision) else {
                        break;
                    };
                    last = newest;
                    let message = pb::WatchChangesResponse {
                        changes: changes.iter().map(change_out).collect(),
                        revision: last,
                        reset: false,
                    };
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                    next_heartbeat = tokio::time::Instant::now() + HEARTBEAT;
                }
                tokio::select! {
                    changed = updates.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = tokio::time::sleep_until(next_heartbeat) => {
                        let heartbeat = pb::WatchChangesResponse { changes: Vec::new(), revision: last, reset: false };
                        if tx.send(Ok(heartbeat)).await.is_err() {
                            return;
                        }
                        next_heartbeat = tokio::time::Instant::now() + HEARTBEAT;
                    }
                    // Changes committed through other replicas reach this stream within a poll,
                    // whatever this replica's own follower is doing.
                    () = tokio::time::sleep(STREAM_POLL) => {}
                    () = tx.closed() => return,
                    // The server is shutting down: end the stream; watchers reconnect.
                    () = draining.started() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
