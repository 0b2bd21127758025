//! The tenant model's operations, and the sagas that span services.
//!
//! Creating a tenant writes the tenant (PENDING) and its owner in one transaction, then
//! creates the tenant's key in KeyService and binds the owner's `owner` role in
//! AuthzService, then marks the tenant ACTIVE. Both remote steps are idempotent, so a
//! failure leaves a PENDING tenant that a retry with the same `request_id` completes;
//! nothing half-made is ever ACTIVE. Deleting runs the other way: PENDING, every binding
//! revoked, the key destroyed (crypto-shredding), users tombstoned, DELETED; calling again
//! resumes it.

use penny_platform::Authorizer;
use penny_platform::principal::Principal;
use penny_platform::stack::CallerCredential;
use penny_proto::auth::v1 as auth_pb;
use penny_proto::auth::v1::auth_service_client::AuthServiceClient;
use penny_proto::authz::v1 as authz_pb;
use penny_proto::authz::v1::authz_service_client::AuthzServiceClient;
use penny_proto::common::v1::PrincipalKind;
use penny_proto::files::v1 as files_pb;
use penny_proto::files::v1::file_service_client::FileServiceClient;
use penny_proto::keys::v1 as keys_pb;
use penny_proto::keys::v1::key_service_client::KeyServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::domain::{Plan, Saga, SecurityPolicy, Tenant, TenantState, User, UserStatus, Workspace};
use crate::error::TenantsError;
use crate::store::{Store, StoreError};

/// The built-in role a new tenant's first user receives.
pub const OWNER_ROLE: &str = "owner";
/// The role that exists only in the platform tenant.
pub const ADMIN_ROLE: &str = "admin";
/// Bindings revoked per page while deleting a tenant.
const REVOKE_PAGE: i32 = 1000;
/// Pages of bindings a deletion works through before giving up (a million bindings).
const MAX_REVOKE_PAGES: usize = 1000;
/// Users whose sessions are ended per page while deleting a tenant.
const REVOKE_PAGE_USERS: u64 = 500;

/// What `CreateTenant` asks for.
#[derive(Debug, Clone)]
pub struct NewTenant {
    /// Idempotency key.
    pub request_id: Uuid,
    /// Display name.
    pub name: String,
    /// Unique handle.
    pub slug: String,
    /// The plan.
    pub plan: Plan,
    /// The security policy.
    pub policy: SecurityPolicy,
    /// The owner's email.
    pub owner_email: String,
    /// The owner's display name.
    pub owner_name: String,
}

/// One security-policy setting to change.
#[derive(Debug, Clone, Copy)]
pub enum PolicyField {
    /// `mfa_required`.
    MfaRequired,
    /// `session_lifetime`.
    SessionLifetime,
    /// `lockout_threshold`.
    LockoutThreshold,
    /// `lockout_window`.
    LockoutWindow,
    /// `lockout_duration`.
    LockoutDuration,
}

impl PolicyField {
    /// Every setting, for a whole-policy update.
    pub const ALL: [Self; 5] = [
        Self::MfaRequired,
        Self::SessionLifetime,
        Self::LockoutThreshold,
        Self::LockoutWindow,
        Self::LockoutDuration,
    ];

    fn apply(self, target: &mut SecurityPolicy, source: &SecurityPolicy) {
        match self {
            Self::MfaRequired => target.mfa_required = source.mfa_required,
            Self::SessionLifetime => target.session_lifetime = source.session_lifetime,
            Self::LockoutThreshold => target.lockout_threshold = source.lockout_threshold,
            Self::LockoutWindow => target.lockout_window = source.lockout_window,
            Self::LockoutDuration => target.lockout_duration = source.lockout_duration,
        }
    }
}

/// What `UpdateTenant` changes: only what the update mask named.
#[derive(Debug, Clone, Default)]
pub struct TenantChanges {
    /// A new name.
    pub name: Option<String>,
    /// A new plan.
    pub plan: Option<Plan>,
    /// Settings to copy from `policy`.
    pub policy_fields: Vec<PolicyField>,
    /// The requested policy (defaults filled in).
    pub policy: SecurityPolicy,
}

/// What `UpdateUser` changes.
#[derive(Debug, Clone, Default)]
pub struct UserChanges {
    /// A new email.
    pub email: Option<String>,
    /// A new display name.
    pub display_name: Option<String>,
}

/// The tenants service: its store and the services its sagas call.
#[derive(Clone)]
pub struct Tenants {
    store: Store,
    keys: KeyServiceClient<Channel>,
    authorizer: Authorizer,
    /// The auth service, which ends suspended and deleted users' sessions. Absent when the
    /// fleet runs without auth: then no session exists to end.
    auth: Option<AuthServiceClient<Channel>>,
    /// The files service, which removes a deleted tenant's files. Absent when the fleet
    /// runs without files.
    files: Option<FileServiceClient<Channel>>,
}

impl std::fmt::Debug for Tenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenants").finish_non_exhaustive()
    }
}

/// Maps a failed call to another service: unreachable means "retry", anything else is not
/// something the caller can fix and is logged as internal.
fn dependency(service: &'static str, resume: &'static str, status: &Status) -> TenantsError {
    if penny_platform::error::is_transient(status) {
        TenantsError::Dependency { service, resume }
    } else {
        TenantsError::Internal(format!(
            "{service} refused a saga step: {:?}",
            status.code()
        ))
    }
}

impl Tenants {
    /// The service over a migrated store, calling keys at `keys` and authz through the
    /// platform's authorizer (which holds this service's own token).
    pub fn new(
        store: Store,
        keys: Channel,
        authorizer: Authorizer,
        auth: Option<Channel>,
        files: Option<Channel>,
    ) -> Self {
        Self {
            store,
            keys: KeyServiceClient::new(keys),
            authorizer,
            auth: auth.map(AuthServiceClient::new),
            files: files.map(FileServiceClient::new),
        }
    }

    /// Removes a deleted tenant's files through files (their key is gone already, so they
    /// were unreadable): one call, which removes what about five seconds allow; more left
    /// fails the step, to be resumed.
    async fn purge_files(&self, tenant: Uuid, resume: &'static str) -> Result<(), TenantsError> {
        let Some(files) = &self.files else {
            tracing::error!(
                tenant = %tenant,
                "no files service configured (PENNY_FILES_URL): the deleted tenant's files stay in storage, unreadable"
            );
            return Ok(());
        };
        let purged = files
            .clone()
            .purge_tenant_files(
                self.as_service(files_pb::PurgeTenantFilesRequest {
                    tenant_id: tenant.to_string(),
                })
                .await?,
            )
            .await
            .map_err(|status| dependency("files", resume, &status))?
            .into_inner();
        if !purged.done {
            return Err(TenantsError::Dependency {
                service: "files",
                resume: "more files remain than one call removes: call DeleteTenant again",
            });
        }
        Ok(())
    }

    /// Ends every session of a user through auth, so every service refuses the user's
    /// tokens within the revocation stream's delay.
    async fn end_user_sessions(
        &self,
        tenant: Uuid,
        user: Uuid,
        reason: &str,
        resume: &'static str,
    ) -> Result<(), TenantsError> {
        let Some(auth) = &self.auth else {
            tracing::error!(
                tenant = %tenant,
                "no auth service configured (PENNY_AUTH_URL): the user's sessions are not ended"
            );
            return Ok(());
        };
        auth.clone()
            .revoke_session(
                self.as_service(auth_pb::RevokeSessionRequest {
                    tenant_id: tenant.to_string(),
                    target: Some(auth_pb::revoke_session_request::Target::UserId(
                        user.to_string(),
                    )),
                    reason: reason.to_owned(),
                })
                .await?,
            )
            .await
            .map_err(|status| dependency("auth", resume, &status))?;
        Ok(())
    }

    /// Whether the database answers.
    pub async fn ready(&self) -> bool {
        penny_platform::db::ping(self.store.connection()).await
    }

    fn authz(&self) -> AuthzServiceClient<Channel> {
        self.authorizer.authz_client()
    }

    /// `message` as a call on this service's own behalf; without a usable credential of
    /// its own, the caller gets UNAVAILABLE (retry later) as it is.
    async fn as_service<T>(&self, message: T) -> Result<tonic::Request<T>, TenantsError> {
        self.authorizer
            .service_request(message)
            .await
            .map_err(|e| TenantsError::Refused(Box::new(e.into())))
    }

    /// A tenant that must exist.
    pub async fn tenant(&self, id: Uuid) -> Result<Tenant, TenantsError> {
        self.store
            .tenant(id)
            .await?
            .ok_or(TenantsError::NotFound("tenant"))
    }

    /// A tenant that must exist and be ACTIVE.
    async fn active_tenant(&self, id: Uuid) -> Result<Tenant, TenantsError> {
        let tenant = self.tenant(id).await?;
        if tenant.state == TenantState::Active {
            Ok(tenant)
        } else {
            Err(TenantsError::FailedPrecondition(
                "the tenant is not active (being created or deleted)",
            ))
        }
    }

    /// Creates a tenant and its owner, or resumes / returns the one this request id made.
    pub async fn create_tenant(&self, new: NewTenant) -> Result<(Tenant, User), TenantsError> {
        if let Some(existing) = self.store.tenant_by_request(new.request_id).await? {
            return self.resume_create(existing, &new).await;
        }
        let now = crate::domain::now();
        let id = Uuid::now_v7();
        let owner = User {
            id: Uuid::now_v7(),
            tenant_id: id,
            email: new.owner_email.clone(),
            display_name: new.owner_name.clone(),
            status: UserStatus::Active,
            suspend_reason: String::new(),
            suspend_alert_id: None,
            created_at: now,
            updated_at: now,
        };
        let tenant = Tenant {
            id,
            name: new.name.clone(),
            slug: new.slug.clone(),
            plan: new.plan,
            policy: new.policy,
            state: TenantState::Pending,
            saga: Saga::Create,
            platform: false,
            request_id: Some(new.request_id),
            owner_id: Some(owner.id),
            created_at: now,
            updated_at: now,
        };
        match self.store.insert_tenant(&tenant, &owner).await {
            Ok(()) => {}
            Err(StoreError::RequestIdTaken | StoreError::SlugTaken)
                if self
                    .store
                    .tenant_by_request(new.request_id)
                    .await?
                    .is_some() =>
            {
                // A concurrent retry of the same request got there first (its slug, checked
                // first, is the same): continue with it.
                let existing = self
                    .store
                    .tenant_by_request(new.request_id)
                    .await?
                    .ok_or(TenantsError::NotFound("tenant"))?;
                return self.resume_create(existing, &new).await;
            }
            Err(err) => return Err(err.into()),
        }
        let tenant = self.finish_create(tenant).await?;
        Ok((tenant, owner))
    }

    async fn resume_create(
        &self,
        existing: Tenant,
        new: &NewTenant,
    ) -> Result<(Tenant, User), TenantsError> {
        if existing.slug != new.slug {
            return Err(TenantsError::Invalid(
                "request_id",
                "was used by another CreateTenant request".into(),
            ));
        }
        let owner_id = existing
            .owner_id
            .ok_or_else(|| TenantsError::Internal("a created tenant has no owner".into()))?;
        let owner = self
            .store
            .user(existing.id, owner_id)
            .await?
            .ok_or_else(|| TenantsError::Internal("a created tenant's owner is missing".into()))?;
        let tenant = if existing.state == TenantState::Pending && existing.saga == Saga::Create {
            self.finish_create(existing).await?
        } else {
            existing
        };
        Ok((tenant, owner))
    }

    /// The remote steps of creation, each idempotent, then ACTIVE.
    async fn finish_create(&self, tenant: Tenant) -> Result<Tenant, TenantsError> {
        const RESUME: &str =
            "the tenant stays PENDING: retry CreateTenant with the same request_id";
        let owner = tenant
            .owner_id
            .ok_or_else(|| TenantsError::Internal("a created tenant has no owner".into()))?;
        self.keys
            .clone()
            .create_key(
                self.as_service(keys_pb::CreateKeyRequest {
                    tenant_id: tenant.id.to_string(),
                })
                .await?,
            )
            .await
            .map_err(|status| dependency("keys", RESUME, &status))?;
        self.authz()
            .grant_role(
                self.as_service(authz_pb::GrantRoleRequest {
                    tenant_id: tenant.id.to_string(),
                    subject: Some(user_subject(tenant.id, owner)),
                    role: OWNER_ROLE.to_owned(),
                    workspace_id: String::new(),
                })
                .await?,
            )
            .await
            .map_err(|status| dependency("authz", RESUME, &status))?;
        self.store
            .update_tenant(tenant.id, |t| {
                // A deletion that started meanwhile wins: never resurrect a tenant.
                if t.state == TenantState::Pending && t.saga == Saga::Create {
                    t.state = TenantState::Active;
                    t.saga = Saga::Idle;
                    Ok::<_, TenantsError>(true)
                } else {
                    Ok(false)
                }
            })
            .await
    }

    /// Tenants for platform staff.
    pub async fn list_tenants(
        &self,
        state: Option<TenantState>,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<Tenant>, TenantsError> {
        Ok(self.store.list_tenants(state, after, limit).await?)
    }

    /// Changes what `changes` names. Only platform staff and fleet services change a plan.
    pub async fn update_tenant(
        &self,
        caller: &Principal,
        id: Uuid,
        changes: TenantChanges,
    ) -> Result<Tenant, TenantsError> {
        if changes.plan.is_some() && !(caller.is_platform_admin() || caller.is_service()) {
            return Err(TenantsError::PermissionDenied(
                "only platform staff change a tenant's plan",
            ));
        }
        self.store
            .update_tenant(id, |tenant| {
                if tenant.state != TenantState::Active {
                    return Err(TenantsError::FailedPrecondition(
                        "the tenant is not active (being created or deleted)",
                    ));
                }
                if let Some(name) = &changes.name {
                    tenant.name.clone_from(name);
                }
                if let Some(plan) = changes.plan {
                    tenant.plan = plan;
                }
                for field in &changes.policy_fields {
                    field.apply(&mut tenant.policy, &changes.policy);
                }
                Ok(true)
            })
            .await
            .map_err(not_found_as("tenant"))
    }

    /// Deletes a tenant, or resumes a deletion. `caller` is the platform admin's own
    /// credential: destroying a key is an admin operation in KeyService, not one a service
    /// may do.
    pub async fn delete_tenant(
        &self,
        id: Uuid,
        confirm_slug: &str,
        caller: &CallerCredential,
    ) -> Result<Tenant, TenantsError> {
        let tenant = self.tenant(id).await?;
        if tenant.platform {
            return Err(TenantsError::FailedPrecondition(
                "the platform tenant cannot be deleted",
            ));
        }
        if confirm_slug != tenant.slug {
            return Err(TenantsError::Invalid(
                "confirm_slug",
                "must equal the tenant's slug".into(),
            ));
        }
        let tenant = self
            .store
            .update_tenant(id, |t| {
                if t.state == TenantState::Deleted {
                    Ok::<_, TenantsError>(false)
                } else {
                    t.state = TenantState::Pending;
                    t.saga = Saga::Delete;
                    Ok(true)
                }
            })
            .await?;
        if tenant.state == TenantState::Deleted {
            return Ok(tenant);
        }
        self.finish_delete(tenant, caller).await
    }

    async fn finish_delete(
        &self,
        tenant: Tenant,
        caller: &CallerCredential,
    ) -> Result<Tenant, TenantsError> {
        const RESUME: &str = "the tenant stays PENDING: call DeleteTenant again to finish";
        let tenant_id = tenant.id.to_string();
        // 1. Every binding: the tenant's principals lose every permission at once.
        let mut authz = self.authz();
        let mut emptied = false;
        for _ in 0..MAX_REVOKE_PAGES {
            let page = authz
                .list_role_bindings(
                    self.as_service(authz_pb::ListRoleBindingsRequest {
                        tenant_id: tenant_id.clone(),
                        page_size: REVOKE_PAGE,
                        ..Default::default()
                    })
                    .await?,
                )
                .await
                .map_err(|status| dependency("authz", RESUME, &status))?
                .into_inner();
            if page.role_bindings.is_empty() {
                emptied = true;
                break;
            }
            for binding in page.role_bindings {
                let revoked = authz
                    .revoke_role(
                        self.as_service(authz_pb::RevokeRoleRequest {
                            tenant_id: tenant_id.clone(),
                            subject: binding.subject,
                            role: binding.role,
                            workspace_id: binding.workspace_id,
                        })
                        .await?,
                    )
                    .await;
                match revoked {
                    Ok(_) => {}
                    Err(status) if status.code() == Code::NotFound => {}
                    Err(status) => return Err(dependency("authz", RESUME, &status)),
                }
            }
        }
        if !emptied {
            // Never destroy the key while bindings remain: the next call goes on revoking.
            return Err(TenantsError::Dependency {
                service: "authz",
                resume: "more bindings remain than one call revokes: call DeleteTenant again",
            });
        }
        // 2. The key: everything encrypted under it becomes unreadable.
        let mut keys = self.keys.clone();
        let allowed = keys
            .update_key_config(caller.request(keys_pb::UpdateKeyConfigRequest {
                tenant_id: tenant_id.clone(),
                min_decryption_version: None,
                deletion_allowed: Some(true),
            }))
            .await;
        match allowed {
            Ok(_) => {
                match keys
                    .delete_key(caller.request(keys_pb::DeleteKeyRequest {
                        tenant_id: tenant_id.clone(),
                    }))
                    .await
                {
                    Ok(_) => {}
                    Err(status) if status.code() == Code::NotFound => {}
                    Err(status) => return Err(dependency("keys", RESUME, &status)),
                }
            }
            // Already destroyed by an earlier attempt.
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => return Err(dependency("keys", RESUME, &status)),
        }
        // 2b. The files, unreadable since the key went, leave storage.
        self.purge_files(tenant.id, RESUME).await?;
        // 3. Every user's sessions end.
        let mut after = None;
        loop {
            let users = self
                .store
                .list_users(
                    tenant.id,
                    &[UserStatus::Active, UserStatus::Suspended],
                    None,
                    after,
                    REVOKE_PAGE_USERS,
                )
                .await?;
            let Some(last) = users.last().map(|u| u.id) else {
                break;
            };
            for user in &users {
                self.end_user_sessions(tenant.id, user.id, "tenant deleted", RESUME)
                    .await?;
            }
            after = Some(last);
        }
        // 4. Users keep a tombstone without personal data.
        self.store.tombstone_users(tenant.id).await?;
        self.store
            .update_tenant(tenant.id, |t| {
                t.state = TenantState::Deleted;
                t.saga = Saga::Idle;
                Ok::<_, TenantsError>(true)
            })
            .await
    }

    /// Creates a user; with a role, binds it through authz *as the caller*, so authz's
    /// rules (no escalation, no `admin` in a customer tenant) judge the caller. When the
    /// binding is refused the user is removed again.
    pub async fn create_user(
        &self,
        caller: &CallerCredential,
        user: User,
        role: Option<String>,
    ) -> Result<User, TenantsError> {
        if role.as_deref() == Some(ADMIN_ROLE) {
            return Err(TenantsError::Escalation(
                "admin is granted only in the platform tenant, through AuthzService.GrantRole",
            ));
        }
        self.active_tenant(user.tenant_id).await?;
        self.store.insert_user(&user).await?;
        if let Some(role) = role {
            let granted = self
                .authz()
                .grant_role(caller.request(authz_pb::GrantRoleRequest {
                    tenant_id: user.tenant_id.to_string(),
                    subject: Some(user_subject(user.tenant_id, user.id)),
                    role,
                    workspace_id: String::new(),
                }))
                .await;
            if let Err(status) = granted {
                self.store.remove_new_user(user.tenant_id, user.id).await?;
                return Err(match status.code() {
                    Code::NotFound => {
                        TenantsError::Invalid("role", "no such role in this tenant".into())
                    }
                    Code::PermissionDenied | Code::InvalidArgument | Code::FailedPrecondition => {
                        TenantsError::Refused(Box::new(status))
                    }
                    _ => dependency(
                        "authz",
                        "the user was not created: retry CreateUser",
                        &status,
                    ),
                });
            }
        }
        Ok(user)
    }

    /// A user of `tenant`.
    pub async fn user(&self, tenant: Uuid, id: Uuid) -> Result<User, TenantsError> {
        self.store
            .user(tenant, id)
            .await?
            .ok_or(TenantsError::NotFound("user"))
    }

    /// A tenant's users.
    pub async fn list_users(
        &self,
        tenant: Uuid,
        statuses: &[UserStatus],
        email: Option<&str>,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<User>, TenantsError> {
        self.tenant(tenant).await?;
        Ok(self
            .store
            .list_users(tenant, statuses, email, after, limit)
            .await?)
    }

    /// Changes a user's profile; never its status, tenant or roles.
    pub async fn update_user(
        &self,
        tenant: Uuid,
        id: Uuid,
        changes: UserChanges,
    ) -> Result<User, TenantsError> {
        self.active_tenant(tenant).await?;
        self.store
            .update_user(tenant, id, |user| {
                if user.status == UserStatus::Deleted {
                    return Err(TenantsError::FailedPrecondition(
                        "a deleted user cannot be changed",
                    ));
                }
                if let Some(email) = &changes.email {
                    user.email.clone_from(email);
                }
                if let Some(name) = &changes.display_name {
                    user.display_name.clone_from(name);
                }
                Ok(true)
            })
            .await
            .map_err(not_found_as("user"))
    }

    /// Suspends a user. Idempotent: an already suspended user keeps the first reason.
    pub async fn suspend_user(
        &self,
        tenant: Uuid,
        id: Uuid,
        reason: String,
        alert_id: Option<Uuid>,
    ) -> Result<User, TenantsError> {
        let user = self
            .store
            .update_user(tenant, id, |user| match user.status {
                UserStatus::Deleted => Err(TenantsError::FailedPrecondition(
                    "a deleted user cannot be suspended",
                )),
                UserStatus::Suspended => Ok(false),
                UserStatus::Active => {
                    user.status = UserStatus::Suspended;
                    user.suspend_reason = reason;
                    user.suspend_alert_id = alert_id;
                    Ok(true)
                }
            })
            .await
            .map_err(not_found_as("user"))?;
        // After the status change, so a sign-in racing it is refused or revoked; also when
        // already suspended, so a retry after auth was unreachable finishes the job.
        self.end_user_sessions(
            tenant,
            id,
            "user suspended",
            "the user is suspended but their sessions may live on: call SuspendUser again",
        )
        .await?;
        Ok(user)
    }

    /// Reactivates a suspended user. Idempotent.
    pub async fn reactivate_user(&self, tenant: Uuid, id: Uuid) -> Result<User, TenantsError> {
        self.active_tenant(tenant).await?;
        self.store
            .update_user(tenant, id, |user| match user.status {
                UserStatus::Deleted => Err(TenantsError::FailedPrecondition(
                    "a deleted user cannot be reactivated",
                )),
                UserStatus::Active => Ok(false),
                UserStatus::Suspended => {
                    user.status = UserStatus::Active;
                    user.suspend_reason.clear();
                    user.suspend_alert_id = None;
                    Ok(true)
                }
            })
            .await
            .map_err(not_found_as("user"))
    }

    /// Creates a workspace.
    pub async fn create_workspace(&self, workspace: Workspace) -> Result<Workspace, TenantsError> {
        self.active_tenant(workspace.tenant_id).await?;
        self.store.insert_workspace(&workspace).await?;
        Ok(workspace)
    }

    /// A tenant's workspaces by name.
    pub async fn list_workspaces(
        &self,
        tenant: Uuid,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<Workspace>, TenantsError> {
        self.tenant(tenant).await?;
        Ok(self.store.list_workspaces(tenant, after, limit).await?)
    }
}

/// Names what was not found in a store `NotFound`.
fn not_found_as(what: &'static str) -> impl Fn(TenantsError) -> TenantsError {
    move |err| match err {
        TenantsError::NotFound(_) => TenantsError::NotFound(what),
        other => other,
    }
}

fn user_subject(tenant: Uuid, user: Uuid) -> authz_pb::Subject {
    authz_pb::Subject {
        kind: PrincipalKind::User as i32,
        id: user.to_string(),
        tenant_id: tenant.to_string(),
    }
}
