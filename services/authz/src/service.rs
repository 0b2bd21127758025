//! Authorization over the store: decisions from an in-memory cache kept exact by the change
//! feed, and the management rules (tenant boundary for callers, no escalation).
//!
//! Decisions never read the database on the hot path: a subject's bindings and a tenant's
//! custom roles are cached per tenant. Every write invalidates its tenant at once, and a
//! feed follower reads the change feed every 200 ms, so writes made through another replica
//! invalidate within that bound.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;
use uuid::Uuid;

use crate::domain::decision::{covers_all, decide, effective_grants};
use crate::domain::roles::{self, ADMIN_ROLE, OWNER_ROLE};
use crate::domain::{Binding, Change, Decision, Grant, Required, Role, Subject};
use crate::error::AuthzError;
use crate::store::{BindingFilter, Store};

/// How often the feed follower looks for changes made elsewhere, by default.
pub const FEED_POLL: Duration = Duration::from_millis(200);

/// The caller of a management operation.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Who it is.
    pub subject: Subject,
    /// A fleet service: trusted to manage any customer tenant (never the platform tenant,
    /// never `admin`).
    pub is_service: bool,
    /// Platform staff: may manage any tenant, and `admin` in the platform tenant.
    pub is_platform_admin: bool,
}

/// A tenant's cached state.
#[derive(Default)]
struct TenantCache {
    roles: Option<Arc<HashMap<String, Role>>>,
    subjects: HashMap<(crate::domain::SubjectKind, String), Arc<Vec<Binding>>>,
}

/// Cached tenants, and a generation per tenant bumped by every invalidation: a load that
/// raced with a write (read before it committed, stored after its invalidation) sees the
/// generation moved and does not store what it read.
#[derive(Default)]
struct CacheState {
    tenants: HashMap<Uuid, TenantCache>,
    generations: HashMap<Uuid, u64>,
}

impl CacheState {
    fn generation(&self, tenant: Uuid) -> u64 {
        self.generations.get(&tenant).copied().unwrap_or(0)
    }
}

type Cache = Arc<RwLock<CacheState>>;

/// Stops the feed follower when the last handle of an [`Authz`] is dropped.
struct FeedGuard(watch::Sender<bool>);

impl Drop for FeedGuard {
    fn drop(&mut self) {
        let _stopped = self.0.send(true);
    }
}

/// Authorization.
#[derive(Clone)]
pub struct Authz {
    store: Store,
    platform_tenant: Uuid,
    cache: Cache,
    revision: watch::Sender<u64>,
    _feed: Arc<FeedGuard>,
}

impl std::fmt::Debug for Authz {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authz").finish_non_exhaustive()
    }
}

/// The permission needed to create, change and delete custom roles.
pub const MANAGE_ROLES: &str = "tenant:manage_roles";
/// The permission needed to grant and revoke roles.
pub const GRANT_ROLES: &str = "user:grant";
/// The permission needed to list roles and bindings.
pub const READ_ROLES: &str = "user:read";

impl Authz {
    /// Authorization over `store`; `platform_tenant` is where `admin` lives. Starts the
    /// feed follower, which runs until the last handle is dropped.
    pub async fn new(
        store: Store,
        platform_tenant: Uuid,
        feed_poll: Duration,
    ) -> Result<Self, AuthzError> {
        let current = store.current_revision().await?;
        let (revision, _) = watch::channel(current);
        let (stop_tx, stop_rx) = watch::channel(false);
        let cache: Cache = Arc::new(RwLock::new(CacheState::default()));
        tokio::spawn(follow_feed(
            store.clone(),
            cache.clone(),
            revision.clone(),
            feed_poll,
            stop_rx,
        ));
        Ok(Self {
            store,
            platform_tenant,
            cache,
            revision,
            _feed: Arc::new(FeedGuard(stop_tx)),
        })
    }

    /// Readiness: the database answers.
    pub async fn ready(&self) -> bool {
        penny_platform::db::ping(self.store.connection()).await
    }

    /// The newest revision this replica has applied.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// A receiver woken whenever the applied revision moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Applies every committed change up to at least `min` before returning (a caller that
    /// heard of a change through another replica must not get an answer from before it).
    pub async fn catch_up(&self, min: u64) -> Result<(), AuthzError> {
        while self.revision() < min {
            if !self.apply_next().await? {
                // Asked for a revision nobody has committed: decide with what exists.
                break;
            }
        }
        Ok(())
    }

    /// Applies every change committed so far (through any replica).
    pub async fn apply_committed(&self) -> Result<(), AuthzError> {
        while self.apply_next().await? {}
        Ok(())
    }

    /// Applies the next page of committed changes; false when there was none.
    async fn apply_next(&self) -> Result<bool, AuthzError> {
        let changes = self.store.changes_after(self.revision(), 1000).await?;
        let Some(newest) = changes.last().map(|c| c.revision) else {
            return Ok(false);
        };
        for change in &changes {
            self.invalidate(change.tenant_id);
        }
        advance(&self.revision, newest);
        Ok(true)
    }

    /// Changes after `revision`.
    pub async fn changes_after(
        &self,
        revision: u64,
        limit: u64,
    ) -> Result<Vec<Change>, AuthzError> {
        Ok(self.store.changes_after(revision, limit).await?)
    }

    fn invalidate(&self, tenant: Uuid) {
        invalidate(&self.cache, tenant);
    }

    fn committed(&self, tenant: Uuid, revision: u64) {
        self.invalidate(tenant);
        advance(&self.revision, revision);
    }

    fn generation(&self, tenant: Uuid) -> u64 {
        self.cache
            .read()
            .map(|c| c.generation(tenant))
            .unwrap_or(u64::MAX)
    }

    async fn custom_roles(&self, tenant: Uuid) -> Result<Arc<HashMap<String, Role>>, AuthzError> {
        if let Ok(cache) = self.cache.read()
            && let Some(roles) = cache.tenants.get(&tenant).and_then(|t| t.roles.clone())
        {
            return Ok(roles);
        }
        let generation = self.generation(tenant);
        let loaded: Arc<HashMap<String, Role>> = Arc::new(
            self.store
                .roles(tenant)
                .await?
                .into_iter()
                .map(|r| (r.name.clone(), r))
                .collect(),
        );
        if let Ok(mut cache) = self.cache.write()
            && cache.generation(tenant) == generation
        {
            if cache.tenants.len() >= MAX_CACHED_TENANTS && !cache.tenants.contains_key(&tenant) {
                cache.tenants.clear();
            }
            cache.tenants.entry(tenant).or_default().roles = Some(loaded.clone());
        }
        Ok(loaded)
    }

    async fn bindings_of(
        &self,
        tenant: Uuid,
        subject: &Subject,
    ) -> Result<Arc<Vec<Binding>>, AuthzError> {
        let key = (subject.kind, subject.id.clone());
        if let Ok(cache) = self.cache.read()
            && let Some(bindings) = cache
                .tenants
                .get(&tenant)
                .and_then(|t| t.subjects.get(&key).cloned())
        {
            return Ok(bindings);
        }
        let generation = self.generation(tenant);
        let loaded = Arc::new(self.store.bindings_of(tenant, subject).await?);
        if let Ok(mut cache) = self.cache.write()
            && cache.generation(tenant) == generation
        {
            if cache.tenants.len() >= MAX_CACHED_TENANTS && !cache.tenants.contains_key(&tenant) {
                cache.tenants.clear();
            }
            cache
                .tenants
                .entry(tenant)
                .or_default()
                .subjects
                .insert(key, loaded.clone());
        }
        Ok(loaded)
    }

    /// A role by name in a tenant: built-in or custom.
    async fn role(&self, tenant: Uuid, name: &str) -> Result<Option<Role>, AuthzError> {
        if let Some(role) = roles::built_in(name) {
            return Ok(Some(role));
        }
        Ok(self.custom_roles(tenant).await?.get(name).cloned())
    }

    /// Decides one check.
    pub async fn check(
        &self,
        tenant: Uuid,
        subject: &Subject,
        required: &Required,
        workspace: Option<Uuid>,
    ) -> Result<Decision, AuthzError> {
        if subject.tenant_id != tenant {
            // The boundary first: nothing of the other tenant is even loaded.
            return Ok(decide(
                tenant,
                self.platform_tenant,
                subject,
                required,
                workspace,
                &[],
                |_| None,
            ));
        }
        let bindings = self.bindings_of(tenant, subject).await?;
        let custom = self.custom_roles(tenant).await?;
        let builtins = builtin_roles();
        Ok(decide(
            tenant,
            self.platform_tenant,
            subject,
            required,
            workspace,
            &bindings,
            |name| builtins.get(name).or_else(|| custom.get(name)),
        ))
    }

    /// Every grant a subject holds.
    pub async fn grants(
        &self,
        tenant: Uuid,
        subject: &Subject,
        workspace: Option<Uuid>,
    ) -> Result<Vec<Grant>, AuthzError> {
        if subject.tenant_id != tenant {
            return Ok(Vec::new());
        }
        let bindings = self.bindings_of(tenant, subject).await?;
        let custom = self.custom_roles(tenant).await?;
        let builtins = builtin_roles();
        Ok(effective_grants(
            tenant,
            self.platform_tenant,
            subject,
            workspace,
            &bindings,
            |name| builtins.get(name).or_else(|| custom.get(name)),
        ))
    }

    /// The subject's bindings in scope (for Explain).
    pub async fn bindings_for_explain(
        &self,
        tenant: Uuid,
        subject: &Subject,
    ) -> Result<Vec<Binding>, AuthzError> {
        if subject.tenant_id != tenant {
            return Ok(Vec::new());
        }
        Ok(self.bindings_of(tenant, subject).await?.as_ref().clone())
    }

    /// Fails unless `actor` may perform `permission` in `tenant`. Callers from another
    /// tenant get NOT_FOUND: the tenant's existence is not theirs to learn.
    async fn authorize(
        &self,
        actor: &Actor,
        tenant: Uuid,
        permission: &str,
    ) -> Result<(), AuthzError> {
        if actor.is_platform_admin || (actor.is_service && tenant != self.platform_tenant) {
            return Ok(());
        }
        if actor.subject.tenant_id != tenant {
            return Err(AuthzError::NotFound("tenant"));
        }
        let required =
            Required::parse(permission).map_err(|_| AuthzError::PermissionDenied("not allowed"))?;
        if self
            .check(tenant, &actor.subject, &required, None)
            .await?
            .allowed()
        {
            Ok(())
        } else {
            Err(AuthzError::PermissionDenied(
                "the caller may not manage roles in this tenant",
            ))
        }
    }

    /// Fails unless `actor` holds every grant of `grants` (no escalation).
    async fn may_hand_out(
        &self,
        actor: &Actor,
        tenant: Uuid,
        grants: &[Grant],
    ) -> Result<(), AuthzError> {
        if grants.contains(&Grant::All)
            && !(actor.is_platform_admin && tenant == self.platform_tenant)
        {
            return Err(AuthzError::Escalation(
                "only platform staff may grant admin, and only in the platform tenant",
            ));
        }
        if actor.is_platform_admin || actor.is_service {
            return Ok(());
        }
        let held = self.grants(tenant, &actor.subject, None).await?;
        if covers_all(&held, grants) {
            Ok(())
        } else {
            Err(AuthzError::Escalation(
                "the caller may grant only permissions it holds itself",
            ))
        }
    }

    /// A tenant's roles: the built-ins, then its custom roles by name.
    pub async fn list_roles(&self, actor: &Actor, tenant: Uuid) -> Result<Vec<Role>, AuthzError> {
        self.authorize(actor, tenant, READ_ROLES).await?;
        let mut all = roles::built_ins();
        if tenant != self.platform_tenant {
            all.retain(|r| r.name != ADMIN_ROLE);
        }
        let mut custom: Vec<Role> = self.custom_roles(tenant).await?.values().cloned().collect();
        custom.sort_by(|a, b| a.name.cmp(&b.name));
        all.extend(custom);
        Ok(all)
    }

    /// Creates a custom role.
    pub async fn create_role(
        &self,
        actor: &Actor,
        tenant: Uuid,
        name: &str,
        description: &str,
        grants: Vec<Grant>,
    ) -> Result<Role, AuthzError> {
        if roles::built_in(name).is_some() {
            return Err(AuthzError::BuiltInReadOnly);
        }
        self.authorize(actor, tenant, MANAGE_ROLES).await?;
        refuse_everything(&grants)?;
        self.may_hand_out(actor, tenant, &grants).await?;
        let now = OffsetDateTime::now_utc();
        let role = Role {
            tenant_id: Some(tenant),
            name: name.to_owned(),
            description: description.to_owned(),
            grants,
            created_at: now,
            updated_at: now,
        };
        let revision = self.store.insert_role(&role).await?;
        self.committed(tenant, revision);
        Ok(role)
    }

    /// Changes a custom role's description and/or permissions.
    pub async fn update_role(
        &self,
        actor: &Actor,
        tenant: Uuid,
        name: &str,
        description: Option<String>,
        grants: Option<Vec<Grant>>,
    ) -> Result<Role, AuthzError> {
        if roles::built_in(name).is_some() {
            return Err(AuthzError::BuiltInReadOnly);
        }
        self.authorize(actor, tenant, MANAGE_ROLES).await?;
        self.invalidate(tenant);
        let mut role = self
            .custom_roles(tenant)
            .await?
            .get(name)
            .cloned()
            .ok_or(AuthzError::NotFound("role"))?;
        if let Some(grants) = grants {
            refuse_everything(&grants)?;
            self.may_hand_out(actor, tenant, &grants).await?;
            role.grants = grants;
        }
        if let Some(description) = description {
            role.description = description;
        }
        role.updated_at = OffsetDateTime::now_utc();
        let revision = self.store.update_role(&role).await?;
        self.committed(tenant, revision);
        Ok(role)
    }

    /// Deletes a custom role (with `force`, its bindings too).
    pub async fn delete_role(
        &self,
        actor: &Actor,
        tenant: Uuid,
        name: &str,
        force: bool,
    ) -> Result<u64, AuthzError> {
        if roles::built_in(name).is_some() {
            return Err(AuthzError::BuiltInReadOnly);
        }
        self.authorize(actor, tenant, MANAGE_ROLES).await?;
        let (revision, revoked) = self.store.delete_role(tenant, name, force).await?;
        self.committed(tenant, revision);
        Ok(revoked)
    }

    /// Grants a role. Returns the binding, whether it was created, and whether the grant
    /// is a privilege change (owner or admin) that the audit trail must flag.
    pub async fn grant(
        &self,
        actor: &Actor,
        tenant: Uuid,
        subject: Subject,
        role_name: &str,
        workspace: Option<Uuid>,
    ) -> Result<(Binding, bool, bool), AuthzError> {
        self.authorize(actor, tenant, GRANT_ROLES).await?;
        if subject.tenant_id != tenant {
            return Err(AuthzError::Invalid(
                "subject.tenant_id".into(),
                "a role is granted only to a subject of the same tenant".into(),
            ));
        }
        if role_name == ADMIN_ROLE && tenant != self.platform_tenant {
            return Err(AuthzError::Escalation(
                "admin can never be granted inside a customer tenant",
            ));
        }
        if role_name == ADMIN_ROLE && !actor.is_platform_admin {
            return Err(AuthzError::Escalation(
                "only platform staff may grant admin",
            ));
        }
        let role = self
            .role(tenant, role_name)
            .await?
            .ok_or(AuthzError::NotFound("role"))?;
        self.may_hand_out(actor, tenant, &role.grants).await?;
        let binding = Binding {
            id: Uuid::now_v7(),
            tenant_id: tenant,
            subject,
            role: role_name.to_owned(),
            workspace_id: workspace,
            granter_id: actor.subject.id.clone(),
            created_at: OffsetDateTime::now_utc(),
        };
        let (binding, created, revision) = self.store.insert_binding(&binding).await?;
        if created {
            self.committed(tenant, revision);
        }
        let privilege_change = role_name == OWNER_ROLE || role_name == ADMIN_ROLE;
        if created && privilege_change {
            tracing::warn!(
                tenant = %tenant,
                role = role_name,
                subject = %binding.subject.id,
                granter = %binding.granter_id,
                "privilege change: role granted"
            );
        }
        Ok((binding, created, privilege_change))
    }

    /// Revokes a role. Revoking needs the same authority as granting it.
    pub async fn revoke(
        &self,
        actor: &Actor,
        tenant: Uuid,
        subject: &Subject,
        role_name: &str,
        workspace: Option<Uuid>,
    ) -> Result<Binding, AuthzError> {
        self.authorize(actor, tenant, GRANT_ROLES).await?;
        if role_name == ADMIN_ROLE && !actor.is_platform_admin {
            return Err(AuthzError::Escalation(
                "only platform staff may revoke admin",
            ));
        }
        if let Some(role) = self.role(tenant, role_name).await? {
            self.may_hand_out(actor, tenant, &role.grants).await?;
        }
        let (binding, revision) = self
            .store
            .delete_binding(tenant, subject, role_name, workspace)
            .await?
            .ok_or(AuthzError::NotFound("role binding"))?;
        self.committed(tenant, revision);
        Ok(binding)
    }

    /// A page of bindings.
    pub async fn list_bindings(
        &self,
        actor: &Actor,
        tenant: Uuid,
        filter: &BindingFilter,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<Binding>, AuthzError> {
        self.authorize(actor, tenant, READ_ROLES).await?;
        Ok(self
            .store
            .list_bindings(tenant, filter, after, limit)
            .await?)
    }
}

/// `*` belongs to the built-in `admin` alone: no custom role may hold it, whoever asks.
fn refuse_everything(grants: &[Grant]) -> Result<(), AuthzError> {
    if grants.contains(&Grant::All) {
        Err(AuthzError::Escalation(
            "'*' belongs to the built-in admin role alone",
        ))
    } else {
        Ok(())
    }
}

/// Most tenants cached at once; past it the cache starts over (decisions reload lazily).
const MAX_CACHED_TENANTS: usize = 10_000;

fn invalidate(cache: &Cache, tenant: Uuid) {
    if let Ok(mut cache) = cache.write() {
        cache.tenants.remove(&tenant);
        *cache.generations.entry(tenant).or_default() += 1;
    }
}

fn advance(revision: &watch::Sender<u64>, to: u64) {
    revision.send_if_modified(|current| {
        if to > *current {
            *current = to;
            true
        } else {
            false
        }
    });
}

/// Follows the change feed until `stop` flips: invalidates the tenants that changed (through
/// any replica) and publishes the newest revision to watchers.
async fn follow_feed(
    store: Store,
    cache: Cache,
    revision: watch::Sender<u64>,
    poll: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen = *revision.borrow();
    loop {
        match store.changes_after(seen, 1000).await {
            Ok(changes) => {
                for change in &changes {
                    invalidate(&cache, change.tenant_id);
                    seen = seen.max(change.revision);
                }
                advance(&revision, seen);
            }
            Err(err) => tracing::warn!(error = %err, "authz change feed unreadable; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            _ = stop.changed() => return,
        }
    }
}

fn builtin_roles() -> &'static HashMap<String, Role> {
    static ROLES: std::sync::OnceLock<HashMap<String, Role>> = std::sync::OnceLock::new();
    ROLES.get_or_init(|| {
        roles::built_ins()
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect()
    })
}
