//! Service clients, kept under the platform tenant. The configured list is the source of
//! truth: clients it no longer names are revoked, with a revocation on the stream.

use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, ColumnTrait, DbErr, EntityTrait, QueryFilter};
use time::OffsetDateTime;
use uuid::Uuid;

use penny_platform::principal::PLATFORM_TENANT_ID;

use super::entity::service_clients;
use super::{RevocationKind, Store};

/// A service client as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceClient {
    /// The client id.
    pub client_id: Uuid,
    /// For people and logs.
    pub name: String,
    /// SHA-256 of the secret, hex.
    pub secret_hash: String,
    /// Scopes it may ask for.
    pub scopes: Vec<String>,
    /// When it was revoked.
    pub revoked_at: Option<OffsetDateTime>,
}

fn client_from(m: service_clients::Model) -> ServiceClient {
    ServiceClient {
        client_id: m.client_id,
        name: m.name,
        secret_hash: m.secret_hash,
        scopes: m.scopes.split_whitespace().map(str::to_owned).collect(),
        revoked_at: m.revoked_at,
    }
}

/// How long a service-client revocation is kept: an hour longer than the longest lifetime
/// a service token can be configured with, so no token outlives its revocation.
const CLIENT_REVOCATION_TTL: time::Duration = time::Duration::seconds(
    crate::service_tokens::MAX_SERVICE_TOKEN_LIFETIME.as_secs() as i64 + 3600,
);

impl Store {
    /// Makes the stored clients exactly `clients`: new ones inserted, known ones updated
    /// (and un-revoked), and those no longer listed revoked, each revocation announced.
    /// Returns how many were revoked.
    pub async fn reconcile_service_clients(
        &self,
        clients: &[ServiceClient],
        now: OffsetDateTime,
    ) -> Result<u32, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, PLATFORM_TENANT_ID).await?;
        for client in clients {
            service_clients::Entity::insert(service_clients::ActiveModel {
                client_id: Set(client.client_id),
                tenant_id: Set(PLATFORM_TENANT_ID),
                name: Set(client.name.clone()),
                secret_hash: Set(client.secret_hash.clone()),
                scopes: Set(client.scopes.join(" ")),
                created_at: Set(now),
                revoked_at: Set(None),
            })
            .on_conflict(
                OnConflict::column(service_clients::Column::ClientId)
                    .update_columns([
                        service_clients::Column::Name,
                        service_clients::Column::SecretHash,
                        service_clients::Column::Scopes,
                        service_clients::Column::RevokedAt,
                    ])
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
        }
        let listed: Vec<Uuid> = clients.iter().map(|c| c.client_id).collect();
        let dropped = service_clients::Entity::find()
            .filter(service_clients::Column::TenantId.eq(PLATFORM_TENANT_ID))
            .filter(service_clients::Column::RevokedAt.is_null())
            .filter(service_clients::Column::ClientId.is_not_in(listed))
            .all(&txn)
            .await?;
        let mut revoked = 0u32;
        for client in dropped {
            service_clients::Entity::update_many()
                .col_expr(service_clients::Column::RevokedAt, Some(now).into())
                .filter(service_clients::Column::TenantId.eq(PLATFORM_TENANT_ID))
                .filter(service_clients::Column::ClientId.eq(client.client_id))
                .exec(&txn)
                .await?;
            Self::append_revocation_in(
                &txn,
                PLATFORM_TENANT_ID,
                RevocationKind::ServiceClient,
                &client.client_id.to_string(),
                now,
                Some(now + CLIENT_REVOCATION_TTL),
            )
            .await?;
            revoked += 1;
        }
        txn.commit().await?;
        if revoked > 0 {
            self.revoked.notify_waiters();
        }
        Ok(revoked)
    }

    /// A client, if it exists.
    pub async fn service_client(&self, client_id: Uuid) -> Result<Option<ServiceClient>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, PLATFORM_TENANT_ID).await?;
        let found = service_clients::Entity::find_by_id(client_id)
            .filter(service_clients::Column::TenantId.eq(PLATFORM_TENANT_ID))
            .one(&txn)
            .await?;
        txn.commit().await?;
        Ok(found.map(client_from))
    }
}
