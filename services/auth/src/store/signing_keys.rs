//! Token-signing keys, kept under the platform tenant.

use sea_orm::{ActiveValue::Set, ColumnTrait, DbErr, EntityTrait, QueryFilter, QueryOrder};
use time::OffsetDateTime;

use penny_platform::principal::PLATFORM_TENANT_ID;

use super::Store;
use super::entity::signing_keys;

/// A signing key as stored: the private half only as KeyService ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSigningKey {
    /// Key id.
    pub kid: String,
    /// The public key (JWK `x`).
    pub public_key: String,
    /// The sealed PKCS#8 document.
    pub private_ciphertext: String,
    /// When it was made (and published).
    pub created_at: OffsetDateTime,
    /// When it starts signing.
    pub activates_at: OffsetDateTime,
    /// When a newer key took over.
    pub retired_at: Option<OffsetDateTime>,
    /// When it stops being published.
    pub expires_at: Option<OffsetDateTime>,
}

fn key_from(m: signing_keys::Model) -> StoredSigningKey {
    StoredSigningKey {
        kid: m.kid,
        public_key: m.public_key,
        private_ciphertext: m.private_ciphertext,
        created_at: m.created_at,
        activates_at: m.activates_at,
        retired_at: m.retired_at,
        expires_at: m.expires_at,
    }
}

impl Store {
    /// Every key still published at `now`, oldest first.
    pub async fn signing_keys(&self, now: OffsetDateTime) -> Result<Vec<StoredSigningKey>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, PLATFORM_TENANT_ID).await?;
        let rows = signing_keys::Entity::find()
            .filter(signing_keys::Column::TenantId.eq(PLATFORM_TENANT_ID))
            .filter(
                sea_orm::Condition::any()
                    .add(signing_keys::Column::ExpiresAt.is_null())
                    .add(signing_keys::Column::ExpiresAt.gt(now)),
            )
            .order_by_asc(signing_keys::Column::ActivatesAt)
            .order_by_asc(signing_keys::Column::Kid)
            .all(&txn)
            .await?;
        txn.commit().await?;
        Ok(rows.into_iter().map(key_from).collect())
    }

    /// Stores a new key.
    pub async fn insert_signing_key(&self, key: &StoredSigningKey) -> Result<(), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, PLATFORM_TENANT_ID).await?;
        signing_keys::Entity::insert(signing_keys::ActiveModel {
            kid: Set(key.kid.clone()),
            tenant_id: Set(PLATFORM_TENANT_ID),
            public_key: Set(key.public_key.clone()),
            private_ciphertext: Set(key.private_ciphertext.clone()),
            created_at: Set(key.created_at),
            activates_at: Set(key.activates_at),
            retired_at: Set(key.retired_at),
            expires_at: Set(key.expires_at),
        })
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await
    }

    /// Retires every active key activated before `successor_activated`, keeping it
    /// published until `expires_at`.
    pub async fn retire_signing_keys(
        &self,
        successor_kid: &str,
        successor_activated: OffsetDateTime,
        now: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Result<u64, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, PLATFORM_TENANT_ID).await?;
        let done = signing_keys::Entity::update_many()
            .col_expr(signing_keys::Column::RetiredAt, Some(now).into())
            .col_expr(signing_keys::Column::ExpiresAt, Some(expires_at).into())
            .filter(signing_keys::Column::TenantId.eq(PLATFORM_TENANT_ID))
            .filter(signing_keys::Column::RetiredAt.is_null())
            .filter(signing_keys::Column::Kid.ne(successor_kid))
            .filter(signing_keys::Column::ActivatesAt.lte(successor_activated))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(done.rows_affected)
    }
}
