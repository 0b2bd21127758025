//! The authz database: custom roles, bindings and the change feed. Returns domain types.
//!
//! Every mutation commits together with a change-feed row whose revision comes from a
//! one-row counter updated in the same transaction: the row lock (PostgreSQL) or the write
//! lock (SQLite) orders writers, so revisions are committed in increasing order and a
//! reader polling "after revision N" never skips a change that commits late.

mod entity;

use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr,
    EntityTrait, QueryFilter, QueryOrder, QuerySelect, Statement,
};
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::{Binding, Change, ChangeKind, ChangeObject, Grant, Role, Subject, SubjectKind};
use entity::{bindings, changes, roles};

/// Filters of `ListRoleBindings`.
#[derive(Debug, Clone, Default)]
pub struct BindingFilter {
    /// Only this subject.
    pub subject: Option<Subject>,
    /// Only this role.
    pub role: Option<String>,
    /// Only this workspace.
    pub workspace_id: Option<Uuid>,
}

/// Why a store write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing already exists.
    #[error("already exists")]
    Exists,
    /// The thing does not exist.
    #[error("not found")]
    NotFound,
    /// A role still has bindings and `force` was not given.
    #[error("role in use by {0} binding(s)")]
    InUse(u64),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbErr),
}

/// The authz service's database.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
}

fn ws_to_db(workspace: Option<Uuid>) -> String {
    workspace.map(|w| w.to_string()).unwrap_or_default()
}

fn ws_from_db(text: &str) -> Option<Uuid> {
    Uuid::try_parse(text).ok()
}

fn binding_from(model: bindings::Model) -> Option<Binding> {
    Some(Binding {
        id: model.id,
        tenant_id: model.tenant_id,
        subject: Subject {
            kind: SubjectKind::parse(&model.subject_kind)?,
            id: model.subject_id,
            tenant_id: model.subject_tenant_id,
        },
        role: model.role,
        workspace_id: ws_from_db(&model.workspace_id),
        granter_id: model.granter_id,
        created_at: model.created_at,
    })
}

fn grants_to_db(grants: &[Grant]) -> String {
    Value::from(grants.iter().map(ToString::to_string).collect::<Vec<_>>()).to_string()
}

fn grants_from_db(text: &str) -> Vec<Grant> {
    serde_json::from_str::<Vec<String>>(text)
        .unwrap_or_default()
        .iter()
        .filter_map(|g| Grant::parse(g).ok())
        .collect()
}

fn role_from(model: roles::Model) -> Role {
    Role {
        tenant_id: Some(model.tenant_id),
        name: model.name,
        description: model.description,
        grants: grants_from_db(&model.permissions),
        created_at: model.created_at,
        updated_at: model.updated_at,
    }
}

fn binding_json(b: &Binding) -> Value {
    json!({
        "id": b.id,
        "tenant_id": b.tenant_id,
        "subject_kind": b.subject.kind.as_str(),
        "subject_id": b.subject.id,
        "subject_tenant_id": b.subject.tenant_id,
        "role": b.role,
        "workspace_id": ws_to_db(b.workspace_id),
        "granter_id": b.granter_id,
        "created_at": b.created_at.unix_timestamp(),
    })
}

fn role_json(r: &Role) -> Value {
    json!({
        "tenant_id": r.tenant_id,
        "name": r.name,
        "description": r.description,
        "permissions": r.grants.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "created_at": r.created_at.unix_timestamp(),
        "updated_at": r.updated_at.unix_timestamp(),
    })
}

fn ts(value: &Value) -> OffsetDateTime {
    value
        .as_i64()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn str_of(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn uuid_of(value: &Value, key: &str) -> Option<Uuid> {
    value
        .get(key)
        .and_then(Value::as_str)
        .and_then(|s| Uuid::try_parse(s).ok())
}

fn change_from(model: changes::Model) -> Option<Change> {
    let kind = ChangeKind::parse(&model.kind)?;
    let payload: Value = serde_json::from_str(&model.payload).ok()?;
    let object = match kind {
        ChangeKind::BindingCreated | ChangeKind::BindingDeleted => ChangeObject::Binding(Binding {
            id: uuid_of(&payload, "id")?,
            tenant_id: uuid_of(&payload, "tenant_id")?,
            subject: Subject {
                kind: SubjectKind::parse(&str_of(&payload, "subject_kind"))?,
                id: str_of(&payload, "subject_id"),
                tenant_id: uuid_of(&payload, "subject_tenant_id")?,
            },
            role: str_of(&payload, "role"),
            workspace_id: ws_from_db(&str_of(&payload, "workspace_id")),
            granter_id: str_of(&payload, "granter_id"),
            created_at: ts(&payload["created_at"]),
        }),
        ChangeKind::RoleCreated | ChangeKind::RoleUpdated | ChangeKind::RoleDeleted => {
            ChangeObject::Role(Role {
                tenant_id: uuid_of(&payload, "tenant_id"),
                name: str_of(&payload, "name"),
                description: str_of(&payload, "description"),
                grants: payload
                    .get("permissions")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .filter_map(|g| Grant::parse(g).ok())
                            .collect()
                    })
                    .unwrap_or_default(),
                created_at: ts(&payload["created_at"]),
                updated_at: ts(&payload["updated_at"]),
            })
        }
    };
    Some(Change {
        revision: u64::try_from(model.revision).ok()?,
        kind,
        tenant_id: model.tenant_id,
        object,
        committed_at: model.created_at,
    })
}

/// Takes the next revision inside `txn` (holding the counter's lock until commit).
async fn next_revision(txn: &DatabaseTransaction) -> Result<i64, DbErr> {
    let backend = txn.get_database_backend();
    txn.execute_raw(Statement::from_string(
        backend,
        "UPDATE authz_revision SET value = value + 1 WHERE id = 1",
    ))
    .await?;
    let row = txn
        .query_one_raw(Statement::from_string(
            backend,
            "SELECT value FROM authz_revision WHERE id = 1",
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("authz_revision".into()))?;
    row.try_get_by_index::<i64>(0)
}

async fn record(
    txn: &DatabaseTransaction,
    tenant: Uuid,
    kind: ChangeKind,
    payload: Value,
) -> Result<u64, DbErr> {
    let revision = next_revision(txn).await?;
    changes::Entity::insert(changes::ActiveModel {
        revision: Set(revision),
        tenant_id: Set(tenant),
        kind: Set(kind.as_str().to_owned()),
        payload: Set(payload.to_string()),
        created_at: Set(OffsetDateTime::now_utc()),
    })
    .exec_without_returning(txn)
    .await?;
    Ok(u64::try_from(revision).unwrap_or(0))
}

impl Store {
    /// Wraps a migrated connection.
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// The connection, for readiness probes.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// A tenant's custom roles, by name.
    pub async fn roles(&self, tenant: Uuid) -> Result<Vec<Role>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let rows = roles::Entity::find()
            .filter(roles::Column::TenantId.eq(tenant))
            .order_by_asc(roles::Column::Name)
            .all(&txn)
            .await?;
        txn.commit().await?;
        Ok(rows.into_iter().map(role_from).collect())
    }

    /// Creates a custom role.
    pub async fn insert_role(&self, role: &Role) -> Result<u64, StoreError> {
        let tenant = role.tenant_id.ok_or(StoreError::NotFound)?;
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let inserted = roles::Entity::insert(roles::ActiveModel {
            tenant_id: Set(tenant),
            name: Set(role.name.clone()),
            description: Set(role.description.clone()),
            permissions: Set(grants_to_db(&role.grants)),
            created_at: Set(role.created_at),
            updated_at: Set(role.updated_at),
        })
        .on_conflict(
            OnConflict::columns([roles::Column::TenantId, roles::Column::Name])
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        if inserted == 0 {
            txn.rollback().await?;
            return Err(StoreError::Exists);
        }
        let revision = record(&txn, tenant, ChangeKind::RoleCreated, role_json(role)).await?;
        txn.commit().await?;
        Ok(revision)
    }

    /// Replaces a custom role's description and grants.
    pub async fn update_role(&self, role: &Role) -> Result<u64, StoreError> {
        let tenant = role.tenant_id.ok_or(StoreError::NotFound)?;
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let updated = roles::Entity::update_many()
            .col_expr(roles::Column::Description, role.description.clone().into())
            .col_expr(
                roles::Column::Permissions,
                grants_to_db(&role.grants).into(),
            )
            .col_expr(roles::Column::UpdatedAt, role.updated_at.into())
            .filter(roles::Column::TenantId.eq(tenant))
            .filter(roles::Column::Name.eq(role.name.clone()))
            .exec(&txn)
            .await?;
        if updated.rows_affected != 1 {
            txn.rollback().await?;
            return Err(StoreError::NotFound);
        }
        let revision = record(&txn, tenant, ChangeKind::RoleUpdated, role_json(role)).await?;
        txn.commit().await?;
        Ok(revision)
    }

    /// Deletes a custom role; with `force`, its bindings too. Returns (revision, revoked).
    pub async fn delete_role(
        &self,
        tenant: Uuid,
        name: &str,
        force: bool,
    ) -> Result<(u64, u64), StoreError> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let Some(role) = roles::Entity::find_by_id((tenant, name.to_owned()))
            .one(&txn)
            .await?
        else {
            txn.rollback().await?;
            return Err(StoreError::NotFound);
        };
        let bound = bindings::Entity::find()
            .filter(bindings::Column::TenantId.eq(tenant))
            .filter(bindings::Column::Role.eq(name))
            .all(&txn)
            .await?;
        if !bound.is_empty() && !force {
            txn.rollback().await?;
            return Err(StoreError::InUse(bound.len() as u64));
        }
        let mut revision = 0;
        for binding in bound.iter().cloned().filter_map(binding_from) {
            bindings::Entity::delete_by_id(binding.id)
                .exec(&txn)
                .await?;
            revision = record(
                &txn,
                tenant,
                ChangeKind::BindingDeleted,
                binding_json(&binding),
            )
            .await?;
        }
        roles::Entity::delete_by_id((tenant, name.to_owned()))
            .exec(&txn)
            .await?;
        let role = role_from(role);
        revision =
            revision.max(record(&txn, tenant, ChangeKind::RoleDeleted, role_json(&role)).await?);
        txn.commit().await?;
        Ok((revision, bound.len() as u64))
    }

    /// A subject's bindings in a tenant.
    pub async fn bindings_of(
        &self,
        tenant: Uuid,
        subject: &Subject,
    ) -> Result<Vec<Binding>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let rows = bindings::Entity::find()
            .filter(bindings::Column::TenantId.eq(tenant))
            .filter(bindings::Column::SubjectKind.eq(subject.kind.as_str()))
            .filter(bindings::Column::SubjectId.eq(subject.id.clone()))
            .order_by_asc(bindings::Column::CreatedAt)
            .order_by_asc(bindings::Column::Id)
            .all(&txn)
            .await?;
        txn.commit().await?;
        Ok(rows.into_iter().filter_map(binding_from).collect())
    }

    /// A page of a tenant's bindings, ordered by id, after `after`.
    pub async fn list_bindings(
        &self,
        tenant: Uuid,
        filter: &BindingFilter,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<Binding>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut query = bindings::Entity::find()
            .filter(bindings::Column::TenantId.eq(tenant))
            .order_by_asc(bindings::Column::Id);
        if let Some(subject) = &filter.subject {
            query = query
                .filter(bindings::Column::SubjectKind.eq(subject.kind.as_str()))
                .filter(bindings::Column::SubjectId.eq(subject.id.clone()));
        }
        if let Some(role) = &filter.role {
            query = query.filter(bindings::Column::Role.eq(role.clone()));
        }
        if let Some(workspace) = filter.workspace_id {
            query = query.filter(bindings::Column::WorkspaceId.eq(workspace.to_string()));
        }
        if let Some(after) = after {
            query = query.filter(bindings::Column::Id.gt(after));
        }
        let rows = query.limit(limit).all(&txn).await?;
        txn.commit().await?;
        Ok(rows.into_iter().filter_map(binding_from).collect())
    }

    /// Creates a binding unless the same one exists. Returns it, whether it was created,
    /// and the revision of the change (0 when nothing changed).
    pub async fn insert_binding(&self, binding: &Binding) -> Result<(Binding, bool, u64), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, binding.tenant_id).await?;
        let inserted = bindings::Entity::insert(bindings::ActiveModel {
            id: Set(binding.id),
            tenant_id: Set(binding.tenant_id),
            subject_kind: Set(binding.subject.kind.as_str().to_owned()),
            subject_id: Set(binding.subject.id.clone()),
            subject_tenant_id: Set(binding.subject.tenant_id),
            role: Set(binding.role.clone()),
            workspace_id: Set(ws_to_db(binding.workspace_id)),
            granter_id: Set(binding.granter_id.clone()),
            created_at: Set(binding.created_at),
        })
        .on_conflict(
            OnConflict::columns([
                bindings::Column::TenantId,
                bindings::Column::SubjectKind,
                bindings::Column::SubjectId,
                bindings::Column::Role,
                bindings::Column::WorkspaceId,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        if inserted == 0 {
            let existing = find_binding(
                &txn,
                binding.tenant_id,
                &binding.subject,
                &binding.role,
                binding.workspace_id,
            )
            .await?
            .ok_or_else(|| DbErr::RecordNotFound("binding".into()))?;
            txn.commit().await?;
            return Ok((existing, false, 0));
        }
        let revision = record(
            &txn,
            binding.tenant_id,
            ChangeKind::BindingCreated,
            binding_json(binding),
        )
        .await?;
        txn.commit().await?;
        Ok((binding.clone(), true, revision))
    }

    /// Deletes a binding. Returns it (as it was) and the change's revision.
    pub async fn delete_binding(
        &self,
        tenant: Uuid,
        subject: &Subject,
        role: &str,
        workspace: Option<Uuid>,
    ) -> Result<Option<(Binding, u64)>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let Some(binding) = find_binding(&txn, tenant, subject, role, workspace).await? else {
            txn.rollback().await?;
            return Ok(None);
        };
        bindings::Entity::delete_by_id(binding.id)
            .exec(&txn)
            .await?;
        let revision = record(
            &txn,
            tenant,
            ChangeKind::BindingDeleted,
            binding_json(&binding),
        )
        .await?;
        txn.commit().await?;
        Ok(Some((binding, revision)))
    }

    /// Changes after `revision`, oldest first, at most `limit`.
    pub async fn changes_after(&self, revision: u64, limit: u64) -> Result<Vec<Change>, DbErr> {
        let after = i64::try_from(revision).unwrap_or(i64::MAX);
        // The feed spans every tenant: a platform-scope read (for services and staff only).
        let txn = penny_platform::db::begin_platform(&self.db).await?;
        let rows = changes::Entity::find()
            .filter(changes::Column::Revision.gt(after))
            .order_by_asc(changes::Column::Revision)
            .limit(limit)
            .all(&txn)
            .await?;
        txn.commit().await?;
        Ok(rows.into_iter().filter_map(change_from).collect())
    }

    /// The newest committed revision.
    pub async fn current_revision(&self) -> Result<u64, DbErr> {
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                self.db.get_database_backend(),
                "SELECT value FROM authz_revision WHERE id = 1",
            ))
            .await?
            .ok_or_else(|| DbErr::RecordNotFound("authz_revision".into()))?;
        Ok(u64::try_from(row.try_get_by_index::<i64>(0)?).unwrap_or(0))
    }
}

async fn find_binding(
    txn: &DatabaseTransaction,
    tenant: Uuid,
    subject: &Subject,
    role: &str,
    workspace: Option<Uuid>,
) -> Result<Option<Binding>, DbErr> {
    Ok(bindings::Entity::find()
        .filter(bindings::Column::TenantId.eq(tenant))
        .filter(bindings::Column::SubjectKind.eq(subject.kind.as_str()))
        .filter(bindings::Column::SubjectId.eq(subject.id.clone()))
        .filter(bindings::Column::Role.eq(role))
        .filter(bindings::Column::WorkspaceId.eq(ws_to_db(workspace)))
        .one(txn)
        .await?
        .and_then(binding_from))
}
