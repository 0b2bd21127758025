//! The audit database: appends that extend each tenant's chain under a lock on its head,
//! reads in sequence order, and redaction.
//!
//! Every statement runs in a tenant-scoped transaction (row level security on
//! PostgreSQL). Appends to one tenant are serialized by its head row: the first statement
//! of the transaction writes it (`INSERT … ON CONFLICT DO UPDATE … RETURNING`), which
//! takes the row lock on PostgreSQL and the write lock on SQLite before anything is read,
//! so two appends never build on the same head.

use std::collections::{BTreeMap, HashMap};

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, QueryResult, Value,
};
use uuid::Uuid;

use penny_platform::db::Sql;

use crate::chain::{self, GENESIS, Hash, Payload, Record, SALT_LEN, StoredEvent};
pub use crate::chain::{REDACT_ACTION, redaction_digest};
use crate::checkpoint::{Checkpoint, Signer};

/// Rows per multi-row INSERT (events have 19 columns: well under PostgreSQL's 65,535
/// parameters).
const INSERT_CHUNK: usize = 500;
/// Events redacted per transaction (each gets its own `audit.redact` event).
pub const REDACT_CHUNK: usize = 1000;

/// An event as a producer sent it: everything but its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The covered fields; `tenant_id`, `sequence` and `receive_time_micros` are set by
    /// the store.
    pub record: Record,
    /// The personal part.
    pub payload: Payload,
}

/// What became of one appended event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored at this sequence.
    New(u64),
    /// Already stored, with the same content, at this sequence.
    Duplicate(u64),
    /// The id is taken by an event with different content.
    Conflict,
}

/// Filters of [`Store::query`].
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this principal's events.
    pub user_id: Option<String>,
    /// Only this action.
    pub action: Option<String>,
    /// Only this resource type.
    pub resource: Option<String>,
    /// Only this resource id.
    pub resource_id: Option<String>,
    /// Only this outcome.
    pub outcome: Option<i32>,
    /// Only events at or after this time (microseconds).
    pub start_micros: Option<i64>,
    /// Only events before this time (microseconds).
    pub end_micros: Option<i64>,
}

/// Which events [`Store::redact`] removes the payload of.
#[derive(Debug, Clone)]
pub enum RedactTarget {
    /// Every event of this principal.
    User(String),
    /// These events.
    Events(Vec<Uuid>),
}

/// The audit database.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
    signer: Signer,
    /// A checkpoint is signed in the same transaction once a head is this many events past
    /// its last one.
    checkpoint_every: u64,
}

/// Tenants checkpointed per pass of [`Store::checkpoint_pending`].
const CHECKPOINT_PASS: u64 = 1000;

/// The columns [`read_event`] reads, in order.
const EVENT_COLUMNS: &str = "e.tenant_id, e.sequence, e.event_id, e.service, e.action, \
     e.resource, e.resource_id, e.principal_kind, e.outcome, e.method, e.duration_micros, \
     e.status, e.trace_id, e.event_time_micros, e.receive_time_micros, e.payload_digest, \
     e.prev_hash, e.hash, p.user_id, p.ip_address, p.user_agent, p.path, p.attributes, \
     p.salt, r.redacted_at_micros, r.redaction_sequence, e.producer_id";

const EVENT_FROM: &str = " FROM audit_events e \
     LEFT JOIN audit_payloads p ON p.tenant_id = e.tenant_id AND p.sequence = e.sequence \
     LEFT JOIN audit_redactions r ON r.tenant_id = e.tenant_id AND r.sequence = e.sequence";

fn hash_of(bytes: Vec<u8>, column: &str) -> Result<Hash, DbErr> {
    bytes
        .try_into()
        .map_err(|_| DbErr::Custom(format!("audit: {column} is not 32 bytes")))
}

fn sequence_of(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn read_event(row: &QueryResult) -> Result<StoredEvent, DbErr> {
    let record = Record {
        tenant_id: row.try_get_by_index(0)?,
        sequence: sequence_of(row.try_get_by_index(1)?),
        event_id: row.try_get_by_index(2)?,
        service: row.try_get_by_index(3)?,
        producer_id: row.try_get_by_index(26)?,
        action: row.try_get_by_index(4)?,
        resource: row.try_get_by_index(5)?,
        resource_id: row.try_get_by_index(6)?,
        principal_kind: row.try_get_by_index(7)?,
        outcome: row.try_get_by_index(8)?,
        method: row.try_get_by_index(9)?,
        duration_micros: row.try_get_by_index(10)?,
        status: row.try_get_by_index(11)?,
        trace_id: row.try_get_by_index(12)?,
        event_time_micros: row.try_get_by_index(13)?,
        receive_time_micros: row.try_get_by_index(14)?,
    };
    let salt: Option<Vec<u8>> = row.try_get_by_index(23)?;
    let payload = match salt {
        Some(salt) => {
            let salt: [u8; SALT_LEN] = salt
                .try_into()
                .map_err(|_| DbErr::Custom("audit: salt is not 16 bytes".into()))?;
            let attributes: String = row.try_get_by_index(22)?;
            let attributes: BTreeMap<String, String> = serde_json::from_str(&attributes)
                .map_err(|_| DbErr::Custom("audit: attributes are not a JSON map".into()))?;
            Some((
                salt,
                Payload {
                    user_id: row.try_get_by_index(18)?,
                    ip_address: row.try_get_by_index(19)?,
                    user_agent: row.try_get_by_index(20)?,
                    path: row.try_get_by_index(21)?,
                    attributes,
                },
            ))
        }
        None => None,
    };
    let redacted_at: Option<i64> = row.try_get_by_index(24)?;
    let redacted_by: Option<i64> = row.try_get_by_index(25)?;
    Ok(StoredEvent {
        record,
        prev_hash: hash_of(row.try_get_by_index(16)?, "prev_hash")?,
        payload_digest: hash_of(row.try_get_by_index(15)?, "payload_digest")?,
        hash: hash_of(row.try_get_by_index(17)?, "hash")?,
        payload,
        redaction: redacted_at.zip(redacted_by.map(sequence_of)),
    })
}

/// Whether a stored event has the content a producer sent again.
fn same_content(stored: &StoredEvent, sent: &NewEvent) -> bool {
    let (a, b) = (&stored.record, &sent.record);
    let record_matches = a.service == b.service
        && a.action == b.action
        && a.resource == b.resource
        && a.resource_id == b.resource_id
        && a.principal_kind == b.principal_kind
        && a.outcome == b.outcome
        && a.method == b.method
        && a.duration_micros == b.duration_micros
        && a.status == b.status
        && a.trace_id == b.trace_id
        && a.event_time_micros == b.event_time_micros;
    // A redacted payload cannot be compared; the rest of the event decides.
    record_matches
        && stored
            .payload
            .as_ref()
            .is_none_or(|(_, payload)| *payload == sent.payload)
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000;
    i64::try_from(now).unwrap_or(i64::MAX)
}

fn random_salt() -> [u8; SALT_LEN] {
    let mut salt = [0u8; SALT_LEN];
    rand::fill(&mut salt[..]);
    salt
}

/// The head of a tenant's chain inside a transaction that holds its lock.
struct Head {
    sequence: u64,
    hash: Hash,
    /// The sequence of the last checkpoint.
    checkpoint: u64,
}

const CHECKPOINT_COLUMNS: &str = "tenant_id, sequence, hash, create_micros, signed_payload, \
     signature, key_id, public_key";

fn read_checkpoint(row: &QueryResult) -> Result<Checkpoint, DbErr> {
    Ok(Checkpoint {
        tenant_id: row.try_get_by_index(0)?,
        sequence: sequence_of(row.try_get_by_index(1)?),
        hash: hash_of(row.try_get_by_index(2)?, "checkpoint hash")?,
        create_micros: row.try_get_by_index(3)?,
        signed_payload: row.try_get_by_index(4)?,
        signature: row.try_get_by_index(5)?,
        key_id: row.try_get_by_index(6)?,
        public_key: row.try_get_by_index(7)?,
    })
}

impl Store {
    /// The store over a migrated database, signing a checkpoint with `signer` every
    /// `checkpoint_every` events (at least 1).
    pub fn new(db: DatabaseConnection, signer: Signer, checkpoint_every: u64) -> Self {
        Self {
            db,
            signer,
            checkpoint_every: checkpoint_every.max(1),
        }
    }

    fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        penny_platform::db::ping(&self.db).await
    }

    /// Locks (creating if needed) the head of `tenant`'s chain for this transaction.
    async fn lock_head(&self, txn: &DatabaseTransaction, tenant: Uuid) -> Result<Head, DbErr> {
        let mut sql = Sql::new(
            self.backend(),
            "INSERT INTO audit_heads (tenant_id, sequence, hash) VALUES (",
        );
        sql.bind(tenant).push(", 0, ").bind(GENESIS.to_vec()).push(
            ") ON CONFLICT (tenant_id) DO UPDATE SET sequence = audit_heads.sequence \
                 RETURNING sequence, hash, checkpoint_sequence",
        );
        let row = txn
            .query_one_raw(sql.build())
            .await?
            .ok_or_else(|| DbErr::RecordNotFound("audit_heads".into()))?;
        Ok(Head {
            sequence: sequence_of(row.try_get_by_index(0)?),
            hash: hash_of(row.try_get_by_index(1)?, "head hash")?,
            checkpoint: sequence_of(row.try_get_by_index(2)?),
        })
    }

    /// Signs and stores a checkpoint of `head` (which this transaction has locked).
    async fn checkpoint(
        &self,
        txn: &DatabaseTransaction,
        tenant: Uuid,
        head: &mut Head,
    ) -> Result<(), DbErr> {
        if head.sequence == 0 || head.sequence == head.checkpoint {
            return Ok(());
        }
        let checkpoint = self
            .signer
            .sign(tenant, head.sequence, head.hash, now_micros())
            .map_err(|e| DbErr::Custom(format!("audit: checkpoint: {e}")))?;
        let mut sql = Sql::new(self.backend(), "INSERT INTO audit_checkpoints (");
        sql.push(CHECKPOINT_COLUMNS)
            .push(") VALUES ")
            .bind_list::<Value>([
                tenant.into(),
                i64::try_from(checkpoint.sequence)
                    .unwrap_or(i64::MAX)
                    .into(),
                checkpoint.hash.to_vec().into(),
                checkpoint.create_micros.into(),
                checkpoint.signed_payload.into(),
                checkpoint.signature.into(),
                checkpoint.key_id.into(),
                checkpoint.public_key.into(),
            ]);
        txn.execute_raw(sql.build()).await?;
        head.checkpoint = head.sequence;
        Ok(())
    }

    /// Checkpoints `head` when it has gone far enough past the last checkpoint.
    async fn checkpoint_if_due(
        &self,
        txn: &DatabaseTransaction,
        tenant: Uuid,
        head: &mut Head,
    ) -> Result<(), DbErr> {
        if head.sequence >= head.checkpoint + self.checkpoint_every {
            self.checkpoint(txn, tenant, head).await?;
        }
        Ok(())
    }

    /// Checkpoints every chain that grew since its last checkpoint (the timer's pass, so
    /// a quiet tenant's last events are signed too). Returns how many were signed.
    pub async fn checkpoint_pending(&self) -> Result<u64, DbErr> {
        let txn = penny_platform::db::begin_platform(&self.db).await?;
        let mut sql = Sql::new(
            self.backend(),
            "SELECT tenant_id FROM audit_heads WHERE sequence > checkpoint_sequence LIMIT ",
        );
        sql.bind(i64::try_from(CHECKPOINT_PASS).unwrap_or(1000));
        let tenants: Vec<Uuid> = txn
            .query_all_raw(sql.build())
            .await?
            .iter()
            .map(|row| row.try_get_by_index(0))
            .collect::<Result<_, _>>()?;
        txn.commit().await?;
        let mut signed = 0;
        for tenant in tenants {
            let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
            let mut head = self.lock_head(&txn, tenant).await?;
            if head.sequence > head.checkpoint {
                self.checkpoint(&txn, tenant, &mut head).await?;
                self.save_head(&txn, tenant, &head).await?;
                signed += 1;
            }
            txn.commit().await?;
        }
        Ok(signed)
    }

    /// `tenant`'s checkpoints at or after `from`, in order.
    pub async fn checkpoints(&self, tenant: Uuid, from: u64) -> Result<Vec<Checkpoint>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut sql = Sql::new(self.backend(), "SELECT ");
        sql.push(CHECKPOINT_COLUMNS)
            .push(" FROM audit_checkpoints WHERE tenant_id = ")
            .bind(tenant)
            .push(" AND sequence >= ")
            .bind(i64::try_from(from).unwrap_or(i64::MAX))
            .push(" ORDER BY sequence");
        let rows = txn.query_all_raw(sql.build()).await?;
        txn.commit().await?;
        rows.iter().map(read_checkpoint).collect()
    }

    /// `tenant`'s latest checkpoint, or its latest at or before `at_most`.
    pub async fn latest_checkpoint(
        &self,
        tenant: Uuid,
        at_most: Option<u64>,
    ) -> Result<Option<Checkpoint>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut sql = Sql::new(self.backend(), "SELECT ");
        sql.push(CHECKPOINT_COLUMNS)
            .push(" FROM audit_checkpoints WHERE tenant_id = ")
            .bind(tenant);
        if let Some(at_most) = at_most {
            sql.push(" AND sequence <= ")
                .bind(i64::try_from(at_most).unwrap_or(i64::MAX));
        }
        sql.push(" ORDER BY sequence DESC LIMIT 1");
        let row = txn.query_one_raw(sql.build()).await?;
        txn.commit().await?;
        row.as_ref().map(read_checkpoint).transpose()
    }

    async fn save_head(
        &self,
        txn: &DatabaseTransaction,
        tenant: Uuid,
        head: &Head,
    ) -> Result<(), DbErr> {
        let mut sql = Sql::new(self.backend(), "UPDATE audit_heads SET sequence = ");
        sql.bind(i64::try_from(head.sequence).unwrap_or(i64::MAX))
            .push(", hash = ")
            .bind(head.hash.to_vec())
            .push(", checkpoint_sequence = ")
            .bind(i64::try_from(head.checkpoint).unwrap_or(i64::MAX))
            .push(" WHERE tenant_id = ")
            .bind(tenant);
        txn.execute_raw(sql.build()).await?;
        Ok(())
    }

    /// The head of `tenant`'s chain: its last sequence and hash (0 and [`GENESIS`] when
    /// it has no events).
    pub async fn head(&self, tenant: Uuid) -> Result<(u64, Hash), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut sql = Sql::new(
            self.backend(),
            "SELECT sequence, hash FROM audit_heads WHERE tenant_id = ",
        );
        sql.bind(tenant);
        let head = match txn.query_one_raw(sql.build()).await? {
            Some(row) => (
                sequence_of(row.try_get_by_index(0)?),
                hash_of(row.try_get_by_index(1)?, "head hash")?,
            ),
            None => (0, GENESIS),
        };
        txn.commit().await?;
        Ok(head)
    }

    /// The highest sequence stored for `tenant` (0 without events): above the head only
    /// when rows were added behind audit's back.
    pub async fn max_sequence(&self, tenant: Uuid) -> Result<u64, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut sql = Sql::new(
            self.backend(),
            "SELECT COALESCE(MAX(sequence), 0) FROM audit_events WHERE tenant_id = ",
        );
        sql.bind(tenant);
        let max = match txn.query_one_raw(sql.build()).await? {
            Some(row) => sequence_of(row.try_get_by_index(0)?),
            None => 0,
        };
        txn.commit().await?;
        Ok(max)
    }

    /// Stored events of `tenant` with these ids.
    async fn by_ids(
        &self,
        txn: &DatabaseTransaction,
        tenant: Uuid,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, StoredEvent>, DbErr> {
        let mut found = HashMap::new();
        for chunk in ids.chunks(INSERT_CHUNK) {
            // The ids alone first (the unique index answers), then whole rows for the few
            // that exist.
            let mut sql = Sql::new(
                self.backend(),
                "SELECT event_id FROM audit_events WHERE tenant_id = ",
            );
            sql.bind(tenant)
                .push(" AND event_id IN ")
                .bind_list(chunk.iter().copied());
            let taken: Vec<Uuid> = txn
                .query_all_raw(sql.build())
                .await?
                .iter()
                .map(|row| row.try_get_by_index(0))
                .collect::<Result<_, _>>()?;
            if taken.is_empty() {
                continue;
            }
            let mut sql = Sql::new(self.backend(), "SELECT ");
            sql.push(EVENT_COLUMNS)
                .push(EVENT_FROM)
                .push(" WHERE e.tenant_id = ")
                .bind(tenant)
                .push(" AND e.event_id IN ")
                .bind_list(taken);
            for row in txn.query_all_raw(sql.build()).await? {
                let event = read_event(&row)?;
                found.insert(event.record.event_id, event);
            }
        }
        Ok(found)
    }

    /// Appends `events` to `tenant`'s chain, in order, in one transaction: all of them are
    /// durable when this returns, or none. Ids already stored (or repeated in the batch)
    /// are duplicates when their content matches and conflicts when it does not.
    ///
    /// Optimistic first: a batch of ids never seen (the usual case) is inserted without
    /// looking them up, with `ON CONFLICT DO NOTHING`; when any id was taken, that
    /// transaction is rolled back and the batch is appended again after looking every id
    /// up.
    pub async fn append(&self, tenant: Uuid, events: &[NewEvent]) -> Result<Vec<Appended>, DbErr> {
        for optimistic in [true, false] {
            let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
            let mut head = self.lock_head(&txn, tenant).await?;
            let Some(outcomes) = self
                .append_locked(&txn, tenant, &mut head, events, optimistic)
                .await?
            else {
                txn.rollback().await?;
                continue;
            };
            self.checkpoint_if_due(&txn, tenant, &mut head).await?;
            self.save_head(&txn, tenant, &head).await?;
            txn.commit().await?;
            return Ok(outcomes);
        }
        Err(DbErr::Custom(
            "audit: an id was taken while its batch held the chain's lock".into(),
        ))
    }

    /// Chains and inserts `events` under the head lock. `optimistic`: without looking ids
    /// up first, and `None` when one turned out to be taken (roll back and go again).
    async fn append_locked(
        &self,
        txn: &DatabaseTransaction,
        tenant: Uuid,
        head: &mut Head,
        events: &[NewEvent],
        optimistic: bool,
    ) -> Result<Option<Vec<Appended>>, DbErr> {
        let existing = if optimistic {
            HashMap::new()
        } else {
            let ids: Vec<Uuid> = events.iter().map(|e| e.record.event_id).collect();
            self.by_ids(txn, tenant, &ids).await?
        };
        let receive_time = now_micros();
        let mut outcomes = Vec::with_capacity(events.len());
        let mut fresh: Vec<StoredEvent> = Vec::new();
        let mut fresh_index: HashMap<Uuid, usize> = HashMap::new();
        for event in events {
            let id = event.record.event_id;
            let earlier = existing
                .get(&id)
                .or_else(|| fresh_index.get(&id).map(|&i| &fresh[i]));
            if let Some(stored) = earlier {
                outcomes.push(if same_content(stored, event) {
                    Appended::Duplicate(stored.record.sequence)
                } else {
                    Appended::Conflict
                });
                continue;
            }
            head.sequence += 1;
            let record = Record {
                tenant_id: tenant,
                sequence: head.sequence,
                receive_time_micros: receive_time,
                ..event.record.clone()
            };
            let salt = random_salt();
            let payload_digest = chain::payload_digest(&salt, &event.payload);
            let hash = chain::event_hash(&head.hash, &record, &payload_digest);
            fresh_index.insert(id, fresh.len());
            fresh.push(StoredEvent {
                record,
                prev_hash: head.hash,
                payload_digest,
                hash,
                payload: Some((salt, event.payload.clone())),
                redaction: None,
            });
            head.hash = hash;
            outcomes.push(Appended::New(head.sequence));
        }
        for chunk in fresh.chunks(INSERT_CHUNK) {
            let inserted = self.insert_events(txn, chunk).await?;
            if inserted < chunk.len() {
                return Ok(None);
            }
        }
        Ok(Some(outcomes))
    }

    /// Inserts events (and their payloads); returns how many events were new (an id
    /// already stored is skipped, and the caller starts over).
    async fn insert_events(
        &self,
        txn: &DatabaseTransaction,
        events: &[StoredEvent],
    ) -> Result<usize, DbErr> {
        let mut sql = Sql::new(
            self.backend(),
            "INSERT INTO audit_events (tenant_id, sequence, event_id, service, action, \
             resource, resource_id, principal_kind, outcome, method, duration_micros, status, \
             trace_id, event_time_micros, receive_time_micros, payload_digest, prev_hash, hash, \
             producer_id) VALUES ",
        );
        for (i, event) in events.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            let r = &event.record;
            sql.bind_list::<Value>([
                r.tenant_id.into(),
                i64::try_from(r.sequence).unwrap_or(i64::MAX).into(),
                r.event_id.into(),
                r.service.clone().into(),
                r.action.clone().into(),
                r.resource.clone().into(),
                r.resource_id.clone().into(),
                r.principal_kind.into(),
                r.outcome.into(),
                r.method.clone().into(),
                r.duration_micros.into(),
                r.status.into(),
                r.trace_id.clone().into(),
                r.event_time_micros.into(),
                r.receive_time_micros.into(),
                event.payload_digest.to_vec().into(),
                event.prev_hash.to_vec().into(),
                event.hash.to_vec().into(),
                r.producer_id.clone().into(),
            ]);
        }
        sql.push(" ON CONFLICT (tenant_id, event_id) DO NOTHING RETURNING sequence");
        let inserted = txn.query_all_raw(sql.build()).await?.len();
        if inserted < events.len() {
            return Ok(inserted);
        }

        let with_payload: Vec<(&StoredEvent, &[u8; SALT_LEN], &Payload)> = events
            .iter()
            .filter_map(|e| e.payload.as_ref().map(|(salt, payload)| (e, salt, payload)))
            .collect();
        if with_payload.is_empty() {
            return Ok(inserted);
        }
        let mut sql = Sql::new(
            self.backend(),
            "INSERT INTO audit_payloads (tenant_id, sequence, user_id, ip_address, user_agent, \
             path, attributes, salt) VALUES ",
        );
        for (i, (event, salt, payload)) in with_payload.into_iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            let attributes = serde_json::to_string(&payload.attributes)
                .map_err(|e| DbErr::Custom(format!("audit: attributes: {e}")))?;
            sql.bind_list::<Value>([
                event.record.tenant_id.into(),
                i64::try_from(event.record.sequence)
                    .unwrap_or(i64::MAX)
                    .into(),
                payload.user_id.clone().into(),
                payload.ip_address.clone().into(),
                payload.user_agent.clone().into(),
                payload.path.clone().into(),
                attributes.into(),
                salt.to_vec().into(),
            ]);
        }
        txn.execute_raw(sql.build()).await?;
        Ok(inserted)
    }

    /// Up to `limit` events of `tenant` from `from` through `to` (inclusive), in sequence
    /// order.
    pub async fn scan(
        &self,
        tenant: Uuid,
        from: u64,
        to: u64,
        limit: u64,
    ) -> Result<Vec<StoredEvent>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let (from, to) = (
            i64::try_from(from).unwrap_or(i64::MAX),
            i64::try_from(to).unwrap_or(i64::MAX),
        );
        // The range is given for each table, so that PostgreSQL can read the three in
        // step (a merge of three range scans) rather than probe two indexes per event.
        let mut sql = Sql::new(self.backend(), "SELECT ");
        sql.push(EVENT_COLUMNS)
            .push(
                " FROM audit_events e \
                 LEFT JOIN audit_payloads p ON p.tenant_id = e.tenant_id AND p.sequence = e.sequence \
                 AND p.tenant_id = ",
            )
            .bind(tenant)
            .push(" AND p.sequence >= ")
            .bind(from)
            .push(" AND p.sequence <= ")
            .bind(to)
            .push(
                " LEFT JOIN audit_redactions r ON r.tenant_id = e.tenant_id AND r.sequence = e.sequence \
                 AND r.tenant_id = ",
            )
            .bind(tenant)
            .push(" AND r.sequence >= ")
            .bind(from)
            .push(" AND r.sequence <= ")
            .bind(to)
            .push(" WHERE e.tenant_id = ")
            .bind(tenant)
            .push(" AND e.sequence >= ")
            .bind(from)
            .push(" AND e.sequence <= ")
            .bind(to)
            .push(" ORDER BY e.sequence LIMIT ")
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let rows = txn.query_all_raw(sql.build()).await?;
        txn.commit().await?;
        rows.iter().map(read_event).collect()
    }

    /// One page of `tenant`'s events matching `filter`, after (or, newest first, before)
    /// sequence `cursor`.
    pub async fn query(
        &self,
        tenant: Uuid,
        filter: &Filter,
        cursor: Option<u64>,
        newest_first: bool,
        limit: u64,
    ) -> Result<Vec<StoredEvent>, DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
        let mut sql = Sql::new(self.backend(), "SELECT ");
        sql.push(EVENT_COLUMNS)
            .push(EVENT_FROM)
            .push(" WHERE e.tenant_id = ")
            .bind(tenant);
        if let Some(user) = &filter.user_id {
            sql.push(" AND p.user_id = ").bind(user.clone());
        }
        for (column, value) in [
            ("e.action", &filter.action),
            ("e.resource", &filter.resource),
            ("e.resource_id", &filter.resource_id),
        ] {
            if let Some(value) = value {
                sql.push(" AND ")
                    .push(column)
                    .push(" = ")
                    .bind(value.clone());
            }
        }
        if let Some(outcome) = filter.outcome {
            sql.push(" AND e.outcome = ").bind(outcome);
        }
        if let Some(start) = filter.start_micros {
            sql.push(" AND e.event_time_micros >= ").bind(start);
        }
        if let Some(end) = filter.end_micros {
            sql.push(" AND e.event_time_micros < ").bind(end);
        }
        if let Some(cursor) = cursor {
            let cursor = i64::try_from(cursor).unwrap_or(i64::MAX);
            sql.push(if newest_first {
                " AND e.sequence < "
            } else {
                " AND e.sequence > "
            })
            .bind(cursor);
        }
        sql.push(if newest_first {
            " ORDER BY e.sequence DESC LIMIT "
        } else {
            " ORDER BY e.sequence LIMIT "
        })
        .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let rows = txn.query_all_raw(sql.build()).await?;
        txn.commit().await?;
        rows.iter().map(read_event).collect()
    }

    /// Removes the payload of `target`'s events of `tenant`, at most [`REDACT_CHUNK`] per
    /// transaction. Each transaction appends one `audit.redact` event (built by `record`
    /// from the redacted sequence numbers) and records every redaction against it.
    /// Events appended after the call started are left alone. Returns how many were
    /// redacted.
    pub async fn redact(
        &self,
        tenant: Uuid,
        target: &RedactTarget,
        record: impl Fn(&[u64]) -> NewEvent,
    ) -> Result<u64, DbErr> {
        let (last, _) = self.head(tenant).await?;
        let mut total = 0;
        loop {
            let txn = penny_platform::db::begin_tenant(&self.db, tenant).await?;
            let mut head = self.lock_head(&txn, tenant).await?;
            let mut sql = Sql::new(
                self.backend(),
                "SELECT p.sequence FROM audit_payloads p JOIN audit_events e \
                 ON e.tenant_id = p.tenant_id AND e.sequence = p.sequence WHERE p.tenant_id = ",
            );
            sql.bind(tenant)
                .push(" AND p.sequence <= ")
                .bind(i64::try_from(last).unwrap_or(i64::MAX));
            match target {
                RedactTarget::User(user) => {
                    sql.push(" AND p.user_id = ").bind(user.clone());
                }
                RedactTarget::Events(ids) if ids.is_empty() => {
                    txn.commit().await?;
                    return Ok(total);
                }
                RedactTarget::Events(ids) => {
                    sql.push(" AND e.event_id IN ")
                        .bind_list(ids.iter().copied());
                }
            }
            sql.push(" ORDER BY p.sequence LIMIT ")
                .bind(i64::try_from(REDACT_CHUNK).unwrap_or(1000));
            let sequences: Vec<u64> = txn
                .query_all_raw(sql.build())
                .await?
                .iter()
                .map(|row| row.try_get_by_index::<i64>(0).map(sequence_of))
                .collect::<Result<_, _>>()?;
            if sequences.is_empty() {
                txn.commit().await?;
                return Ok(total);
            }
            let as_values = || {
                sequences
                    .iter()
                    .map(|s| i64::try_from(*s).unwrap_or(i64::MAX))
            };
            let mut delete = Sql::new(
                self.backend(),
                "DELETE FROM audit_payloads WHERE tenant_id = ",
            );
            delete
                .bind(tenant)
                .push(" AND sequence IN ")
                .bind_list(as_values());
            txn.execute_raw(delete.build()).await?;
            let outcomes = self
                .append_locked(&txn, tenant, &mut head, &[record(&sequences)], false)
                .await?
                .unwrap_or_default();
            let Some(Appended::New(by)) = outcomes.first().copied() else {
                return Err(DbErr::Custom(
                    "audit: the redaction event was not appended".into(),
                ));
            };
            let at = now_micros();
            for chunk in sequences.chunks(INSERT_CHUNK) {
                let mut insert = Sql::new(
                    self.backend(),
                    "INSERT INTO audit_redactions (tenant_id, sequence, redacted_at_micros, \
                     redaction_sequence) VALUES ",
                );
                for (i, sequence) in chunk.iter().enumerate() {
                    if i > 0 {
                        insert.push(", ");
                    }
                    insert.bind_list::<Value>([
                        tenant.into(),
                        i64::try_from(*sequence).unwrap_or(i64::MAX).into(),
                        at.into(),
                        i64::try_from(by).unwrap_or(i64::MAX).into(),
                    ]);
                }
                txn.execute_raw(insert.build()).await?;
            }
            self.checkpoint_if_due(&txn, tenant, &mut head).await?;
            self.save_head(&txn, tenant, &head).await?;
            txn.commit().await?;
            total += sequences.len() as u64;
            if sequences.len() < REDACT_CHUNK || matches!(target, RedactTarget::Events(_)) {
                return Ok(total);
            }
        }
    }
}
