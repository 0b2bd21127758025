//! The IP block list: per tenant or global, with optional expiry. Sign-in checks it before
//! anything else; the security monitor fills it.
//!
//! Each replica keeps a tenant's parsed ranges for at most [`CACHE_TTL`], so a block made
//! through another replica binds here within that; blocks made here bind at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use penny_platform::stack::tenant_scope;
use penny_platform::{ApiError, Principal, Reason};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::cidr::Cidr;
use crate::error::AuthError;
use crate::service::Auth;
use crate::store::IpBlock;

/// The tenant id global blocks are stored under.
pub use crate::store::GLOBAL_BLOCKS;

/// How long a replica trusts its copy of a tenant's ranges.
pub const CACHE_TTL: Duration = Duration::from_secs(1);
/// Most active ranges one tenant (or the global list) may hold; sign-in checks them all.
pub const MAX_RANGES: u64 = 10_000;

/// One tenant's parsed active ranges, and when they were read.
type Ranges = (Instant, Arc<Vec<Cidr>>);

/// Parsed active ranges per tenant, briefly cached.
#[derive(Debug, Default, Clone)]
pub struct BlockCache {
    entries: Arc<Mutex<HashMap<Uuid, Ranges>>>,
}

impl BlockCache {
    fn get(&self, tenant: Uuid) -> Option<Arc<Vec<Cidr>>> {
        let entries = self.entries.lock().ok()?;
        let (at, ranges) = entries.get(&tenant)?;
        (at.elapsed() < CACHE_TTL).then(|| ranges.clone())
    }

    fn put(&self, tenant: Uuid, ranges: Arc<Vec<Cidr>>) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() > 10_000 {
                entries.clear();
            }
            entries.insert(tenant, (Instant::now(), ranges));
        }
    }

    fn forget(&self, tenant: Uuid) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(&tenant);
        }
    }
}

/// Who may manage the blocks of `tenant` (`None`: the global list).
fn scope(caller: &Principal, tenant: Option<Uuid>) -> Result<Uuid, AuthError> {
    match tenant {
        Some(tenant) => Ok(tenant_scope(caller, tenant)?),
        None if caller.is_service() || caller.is_platform_admin() => Ok(GLOBAL_BLOCKS),
        None => Err(ApiError::permission_denied(
            "only platform staff and fleet services manage the global block list",
        )
        .into()),
    }
}

impl Auth {
    /// Blocks a range in a tenant (or globally), replacing an existing block of it.
    pub async fn block_ip(
        &self,
        caller: &Principal,
        tenant: Option<Uuid>,
        cidr: Cidr,
        reason: String,
        duration: Option<Duration>,
    ) -> Result<IpBlock, AuthError> {
        let tenant = scope(caller, tenant)?;
        let now = OffsetDateTime::now_utc();
        // Past the cap a new range would not be enforced: refuse it instead.
        let active = self.store.ip_blocks(tenant, now, None, MAX_RANGES).await?;
        if active.len() as u64 >= MAX_RANGES && !active.iter().any(|b| b.cidr == cidr.to_string()) {
            return Err(ApiError::new(
                tonic::Code::ResourceExhausted,
                Reason::BatchTooLarge,
                format!("at most {MAX_RANGES} ranges may be blocked in one list"),
            )
            .into());
        }
        let block = IpBlock {
            tenant_id: tenant,
            cidr: cidr.to_string(),
            reason,
            creator_id: caller.id.clone(),
            created_at: now,
            expires_at: duration.map(|d| now + d),
        };
        self.store.put_ip_block(&block).await?;
        self.blocks.forget(tenant);
        Ok(block)
    }

    /// Removes a block; NOT_FOUND when the range is not blocked.
    pub async fn unblock_ip(
        &self,
        caller: &Principal,
        tenant: Option<Uuid>,
        cidr: Cidr,
    ) -> Result<(), AuthError> {
        let tenant = scope(caller, tenant)?;
        let removed = self
            .store
            .delete_ip_block(tenant, &cidr.to_string(), OffsetDateTime::now_utc())
            .await?;
        self.blocks.forget(tenant);
        if removed {
            Ok(())
        } else {
            Err(ApiError::not_found(Reason::NotFound, "no such block").into())
        }
    }

    /// A page of active blocks, by CIDR.
    pub async fn list_ip_blocks(
        &self,
        caller: &Principal,
        tenant: Option<Uuid>,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<IpBlock>, AuthError> {
        let tenant = scope(caller, tenant)?;
        Ok(self
            .store
            .ip_blocks(tenant, OffsetDateTime::now_utc(), after, limit)
            .await?)
    }

    async fn ranges(&self, tenant: Uuid) -> Result<Arc<Vec<Cidr>>, AuthError> {
        if let Some(ranges) = self.blocks.get(tenant) {
            return Ok(ranges);
        }
        let blocks = self
            .store
            .ip_blocks(tenant, OffsetDateTime::now_utc(), None, MAX_RANGES)
            .await?;
        let ranges: Arc<Vec<Cidr>> = Arc::new(
            blocks
                .iter()
                .filter_map(|b| Cidr::parse(&b.cidr).ok())
                .collect(),
        );
        self.blocks.put(tenant, ranges.clone());
        Ok(ranges)
    }

    /// Whether `ip` is blocked in `tenant` or globally.
    pub async fn ip_blocked(&self, tenant: Uuid, ip: IpAddr) -> Result<bool, AuthError> {
        for scope in [GLOBAL_BLOCKS, tenant] {
            if self.ranges(scope).await?.iter().any(|r| r.contains(ip)) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
