//! API keys. Only the SHA-256 of a secret is stored; revoking a key appends to the
//! revocation log in the same transaction.

use sea_orm::{
    ActiveValue::Set, ColumnTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::entity::api_keys;
use super::{RevocationKind, Store};

/// An API key as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// The key id (UUIDv7).
    pub id: Uuid,
    /// The tenant it acts in.
    pub tenant_id: Uuid,
    /// Display name.
    pub name: String,
    /// `pk_live_` and the secret's first 8 characters.
    pub prefix: String,
    /// SHA-256 of the secret, hex.
    pub secret_hash: String,
    /// Role names bound to it at tenant scope.
    pub roles: Vec<String>,
    /// The principal that created it.
    pub creator_id: String,
    /// When it was made.
    pub created_at: OffsetDateTime,
    /// When it stops working; never when `None`.
    pub expires_at: Option<OffsetDateTime>,
    /// When it was last used (approximate).
    pub last_used_at: Option<OffsetDateTime>,
    /// When it was revoked.
    pub revoked_at: Option<OffsetDateTime>,
}

impl ApiKeyRecord {
    /// Usable now: not revoked, not expired.
    pub fn active(&self, now: OffsetDateTime) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|t| t > now)
    }
}

fn record_from(m: api_keys::Model) -> ApiKeyRecord {
    ApiKeyRecord {
        id: m.id,
        tenant_id: m.tenant_id,
        name: m.name,
        prefix: m.prefix,
        secret_hash: m.secret_hash,
        roles: m
            .roles
            .split(',')
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect(),
        creator_id: m.creator_id,
        created_at: m.created_at,
        expires_at: m.expires_at,
        last_used_at: m.last_used_at,
        revoked_at: m.revoked_at,
    }
}

impl Store {
    /// Stores a new key.
    pub async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<(), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, key.tenant_id).await?;
        api_keys::Entity::insert(api_keys::ActiveModel {
            id: Set(key.id),
            tenant_id: Set(key.tenant_id),
            name: Set(key.name.clone()),
            prefix: Set(key.prefix.clone()),
            secret_hash: Set(key.secret_hash.clone()),
            roles: Set(key.roles.join(",")),
            creator_id: Set(key.creator_id.clone()),
            created_at: Set(key.created_at),
            expires_at: Set(key.expires_at),
            last_used_at: Set(None),
            revoked_at: Set(None),
        })
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await
    }

    /// Removes a key that never became usable (its role grant was refused).
    pub async fn delete_api_key(&self, tenant: Uuid, id: Uuid) -> Result<(), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        api_keys::Entity::delete_many()
            .filter(api_keys::Column::TenantId.eq(tenant))
            .filter(api_keys::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        txn.commit().await
    }

    /// One key of the tenant.
    pub async fn api_key(&self, tenant: Uuid, id: Uuid) -> Result<Option<ApiKeyRecord>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let found = api_keys::Entity::find_by_id(id)
            .filter(api_keys::Column::TenantId.eq(tenant))
            .one(&txn)
            .await?;
        txn.commit().await?;
        Ok(found.map(record_from))
    }

    /// A page of the tenant's keys, newest first, after `after`; with `active_at`, only
    /// those usable then.
    pub async fn list_api_keys(
        &self,
        tenant: Uuid,
        after: Option<Uuid>,
        limit: u64,
        active_at: Option<OffsetDateTime>,
    ) -> Result<Vec<ApiKeyRecord>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut query = api_keys::Entity::find().filter(api_keys::Column::TenantId.eq(tenant));
        if let Some(after) = after {
            query = query.filter(api_keys::Column::Id.lt(after));
        }
        if let Some(now) = active_at {
            query = query.filter(api_keys::Column::RevokedAt.is_null()).filter(
                sea_orm::Condition::any()
                    .add(api_keys::Column::ExpiresAt.is_null())
                    .add(api_keys::Column::ExpiresAt.gt(now)),
            );
        }
        let rows = query
            .order_by_desc(api_keys::Column::Id)
            .limit(limit)
            .all(&txn)
            .await?;
        txn.commit().await?;
        Ok(rows.into_iter().map(record_from).collect())
    }

    /// Revokes a key and announces it on the revocation stream, in one transaction.
    /// Returns the key as it is now, or `None` when the tenant has no such key. Revoking a
    /// revoked key changes nothing.
    pub async fn revoke_api_key(
        &self,
        tenant: Uuid,
        id: Uuid,
        now: OffsetDateTime,
    ) -> Result<Option<ApiKeyRecord>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let updated = api_keys::Entity::update_many()
            .col_expr(api_keys::Column::RevokedAt, Some(now).into())
            .filter(api_keys::Column::TenantId.eq(tenant))
            .filter(api_keys::Column::Id.eq(id))
            .filter(api_keys::Column::RevokedAt.is_null())
            .exec(&txn)
            .await?;
        let found = api_keys::Entity::find_by_id(id)
            .filter(api_keys::Column::TenantId.eq(tenant))
            .one(&txn)
            .await?
            .map(record_from);
        if updated.rows_affected == 1
            && let Some(key) = &found
        {
            Self::append_revocation_in(
                &txn,
                tenant,
                RevocationKind::ApiKey,
                &id.to_string(),
                now,
                key.expires_at,
            )
            .await?;
        }
        txn.commit().await?;
        if updated.rows_affected == 1 {
            self.revoked.notify_waiters();
        }
        Ok(found)
    }

    /// The key whose secret has this SHA-256, in any tenant: a presented secret does not
    /// say its tenant, so this one lookup reads across tenants (ValidateApiKey is for fleet
    /// services only).
    pub async fn api_key_by_hash(&self, secret_hash: &str) -> Result<Option<ApiKeyRecord>, DbErr> {
        let txn = penny_platform::db::begin_platform(&self.db).await?;
        let found = api_keys::Entity::find()
            .filter(api_keys::Column::SecretHash.eq(secret_hash))
            .one(&txn)
            .await?;
        txn.commit().await?;
        Ok(found.map(record_from))
    }

    /// Records when keys were last used (a batch, written in the background).
    pub async fn touch_api_keys(&self, uses: &[(Uuid, Uuid, OffsetDateTime)]) -> Result<(), DbErr> {
        for (tenant, id, at) in uses {
            let txn = penny_platform::db::begin_tenant(&self.db, *tenant).await?;
            api_keys::Entity::update_many()
                .col_expr(api_keys::Column::LastUsedAt, Some(*at).into())
                .filter(api_keys::Column::TenantId.eq(*tenant))
                .filter(api_keys::Column::Id.eq(*id))
                .exec(&txn)
                .await?;
            txn.commit().await?;
        }
        Ok(())
    }
}
