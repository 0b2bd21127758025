//! The keys database: keyrings and their (wrapped) versions. Returns domain types.
//!
//! Deleting a keyring deletes its wrapped versions in the same transaction; on SQLite
//! `secure_delete` (set by the platform on every connection) overwrites the freed pages so
//! the wrapped material does not linger.

mod entity;

use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::{BackendKind, KeyConfigChange, KeyInfo, KeyVersionInfo, TenantId};
use entity::{key_versions, keyrings};

/// A keyring with its wrapped version keys (local engine).
#[derive(Debug, Clone)]
pub struct StoredKeyring {
    /// Metadata.
    pub info: KeyInfo,
    /// `(version, wrapped key)`, oldest first.
    pub wrapped: Vec<(u32, Vec<u8>)>,
}

/// The keys service's database.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
}

fn to_u32(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

fn to_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn backend_from(value: &str) -> BackendKind {
    if value == "vault" {
        BackendKind::Vault
    } else {
        BackendKind::Local
    }
}

fn info_from(ring: keyrings::Model, versions: &[key_versions::Model]) -> KeyInfo {
    KeyInfo {
        tenant_id: TenantId(ring.tenant_id),
        latest_version: to_u32(ring.latest_version),
        min_decryption_version: to_u32(ring.min_decryption_version),
        min_encryption_version: to_u32(ring.min_encryption_version),
        deletion_allowed: ring.deletion_allowed,
        backend: backend_from(&ring.backend),
        versions: versions
            .iter()
            .map(|v| KeyVersionInfo {
                version: to_u32(v.version),
                created_at: v.created_at,
            })
            .collect(),
        created_at: ring.created_at,
    }
}

impl Store {
    /// Wraps a connection whose schema is migrated.
    /// (On SQLite, `penny_platform::db::connect` turns `secure_delete` on for every pooled
    /// connection, so deleted wrapped keys do not linger in free pages.)
    pub async fn new(db: DatabaseConnection) -> Result<Self, DbErr> {
        Ok(Self { db })
    }

    /// The connection, for readiness probes.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Creates a keyring with version 1 unless the tenant has one. Returns whether it was
    /// created.
    pub async fn create(
        &self,
        tenant: TenantId,
        backend: BackendKind,
        first_wrapped: Vec<u8>,
        now: OffsetDateTime,
    ) -> Result<bool, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant.0).await?;
        let inserted = keyrings::Entity::insert(keyrings::ActiveModel {
            tenant_id: Set(tenant.0),
            backend: Set(backend.as_str().to_owned()),
            latest_version: Set(1),
            min_decryption_version: Set(1),
            min_encryption_version: Set(0),
            deletion_allowed: Set(false),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .on_conflict(
            OnConflict::column(keyrings::Column::TenantId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        if inserted == 0 {
            txn.rollback().await?;
            return Ok(false);
        }
        key_versions::Entity::insert(key_versions::ActiveModel {
            tenant_id: Set(tenant.0),
            version: Set(1),
            wrapped_key: Set(first_wrapped),
            created_at: Set(now),
        })
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await?;
        Ok(true)
    }

    /// The keyring of `tenant`, with its wrapped versions.
    pub async fn load(&self, tenant: TenantId) -> Result<Option<StoredKeyring>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant.0).await?;
        let Some(ring) = keyrings::Entity::find_by_id(tenant.0).one(&txn).await? else {
            txn.commit().await?;
            return Ok(None);
        };
        let versions = key_versions::Entity::find()
            .filter(key_versions::Column::TenantId.eq(tenant.0))
            .order_by_asc(key_versions::Column::Version)
            .all(&txn)
            .await?;
        txn.commit().await?;
        let wrapped = versions
            .iter()
            .map(|v| (to_u32(v.version), v.wrapped_key.clone()))
            .collect();
        Ok(Some(StoredKeyring {
            info: info_from(ring, &versions),
            wrapped,
        }))
    }

    /// Keyrings ordered by tenant id, after `after`, at most `limit`.
    pub async fn list(&self, after: Option<Uuid>, limit: u64) -> Result<Vec<KeyInfo>, DbErr> {
        let mut query = keyrings::Entity::find().order_by_asc(keyrings::Column::TenantId);
        if let Some(after) = after {
            query = query.filter(keyrings::Column::TenantId.gt(after));
        }
        // Every tenant's keyring: a platform-scope read (ListKeys is for platform staff).
        let txn = penny_platform::db::begin_platform(&self.db).await?;
        let rings = query.limit(limit).all(&txn).await?;
        let ids: Vec<Uuid> = rings.iter().map(|r| r.tenant_id).collect();
        let versions = key_versions::Entity::find()
            .filter(key_versions::Column::TenantId.is_in(ids))
            .order_by_asc(key_versions::Column::Version)
            .all(&txn)
            .await?;
        txn.commit().await?;
        Ok(rings
            .into_iter()
            .map(|ring| {
                let own: Vec<_> = versions
                    .iter()
                    .filter(|v| v.tenant_id == ring.tenant_id)
                    .cloned()
                    .collect();
                info_from(ring, &own)
            })
            .collect())
    }

    /// Adds version `expected_latest + 1` if the latest is still `expected_latest`.
    /// Returns false when another rotation won the race.
    pub async fn add_version(
        &self,
        tenant: TenantId,
        expected_latest: u32,
        wrapped: Vec<u8>,
        now: OffsetDateTime,
    ) -> Result<bool, DbErr> {
        let next = expected_latest.saturating_add(1);
        let txn = penny_platform::db::begin_tenant(&self.db, tenant.0).await?;
        let updated = keyrings::Entity::update_many()
            .col_expr(keyrings::Column::LatestVersion, Expr::value(to_i32(next)))
            .col_expr(keyrings::Column::UpdatedAt, Expr::value(now))
            .filter(keyrings::Column::TenantId.eq(tenant.0))
            .filter(keyrings::Column::LatestVersion.eq(to_i32(expected_latest)))
            .exec(&txn)
            .await?;
        if updated.rows_affected != 1 {
            txn.rollback().await?;
            return Ok(false);
        }
        key_versions::Entity::insert(key_versions::ActiveModel {
            tenant_id: Set(tenant.0),
            version: Set(to_i32(next)),
            wrapped_key: Set(wrapped),
            created_at: Set(now),
        })
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await?;
        Ok(true)
    }

    /// Applies a configuration change already validated against the keyring.
    pub async fn update_config(
        &self,
        tenant: TenantId,
        change: &KeyConfigChange,
        now: OffsetDateTime,
    ) -> Result<bool, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant.0).await?;
        let mut update = keyrings::Entity::update_many()
            .col_expr(keyrings::Column::UpdatedAt, Expr::value(now))
            .filter(keyrings::Column::TenantId.eq(tenant.0));
        if let Some(min) = change.min_decryption_version {
            update = update.col_expr(
                keyrings::Column::MinDecryptionVersion,
                Expr::value(to_i32(min)),
            );
        }
        if let Some(allowed) = change.deletion_allowed {
            update = update.col_expr(keyrings::Column::DeletionAllowed, Expr::value(allowed));
        }
        let updated = update.exec(&txn).await?;
        txn.commit().await?;
        Ok(updated.rows_affected == 1)
    }

    /// Mirrors metadata read from an external engine (Vault), creating the row if needed.
    pub async fn mirror(&self, info: &KeyInfo, now: OffsetDateTime) -> Result<(), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, info.tenant_id.0).await?;
        keyrings::Entity::insert(keyrings::ActiveModel {
            tenant_id: Set(info.tenant_id.0),
            backend: Set(info.backend.as_str().to_owned()),
            latest_version: Set(to_i32(info.latest_version)),
            min_decryption_version: Set(to_i32(info.min_decryption_version)),
            min_encryption_version: Set(to_i32(info.min_encryption_version)),
            deletion_allowed: Set(info.deletion_allowed),
            created_at: Set(info.created_at),
            updated_at: Set(now),
        })
        .on_conflict(
            OnConflict::column(keyrings::Column::TenantId)
                .update_columns([
                    keyrings::Column::LatestVersion,
                    keyrings::Column::MinDecryptionVersion,
                    keyrings::Column::MinEncryptionVersion,
                    keyrings::Column::DeletionAllowed,
                    keyrings::Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        for version in &info.versions {
            key_versions::Entity::insert(key_versions::ActiveModel {
                tenant_id: Set(info.tenant_id.0),
                version: Set(to_i32(version.version)),
                wrapped_key: Set(Vec::new()),
                created_at: Set(version.created_at),
            })
            .on_conflict(
                OnConflict::columns([
                    key_versions::Column::TenantId,
                    key_versions::Column::Version,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
        }
        txn.commit().await
    }

    /// Destroys a keyring and every wrapped version. Returns whether one existed.
    pub async fn delete(&self, tenant: TenantId) -> Result<bool, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant.0).await?;
        key_versions::Entity::delete_many()
            .filter(key_versions::Column::TenantId.eq(tenant.0))
            .exec(&txn)
            .await?;
        let deleted = keyrings::Entity::delete_by_id(tenant.0).exec(&txn).await?;
        txn.commit().await?;
        Ok(deleted.rows_affected == 1)
    }
}
