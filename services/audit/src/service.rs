//! The audit service's operations: validation at the edge, then the store.

use std::collections::BTreeMap;
use std::net::IpAddr;

use penny_platform::validate::{Violations, sanitized};
use penny_platform::{ApiError, Principal};
use penny_proto::audit::v1 as pb;
use penny_proto::common::v1::{BatchItemError, PrincipalKind as PbKind};
use uuid::Uuid;

use crate::chain::{Broken, ChainCheck, Failure, GENESIS, Payload, Record, StoredEvent};
use crate::checkpoint::{Checkpoint, TrustedKeys};
use crate::error::AuditError;
use crate::monitor::{Monitor, Seen};
use crate::store::{Appended, Filter, NewEvent, REDACT_ACTION, RedactTarget, Store};

/// Events per Append call.
pub const MAX_APPEND: usize = 1000;
/// Events read per page while verifying.
const VERIFY_PAGE: u64 = 5000;
/// Tasks reading pages ahead of the hashing.
const VERIFY_READERS: usize = 3;
/// Attributes per event.
const MAX_ATTRIBUTES: usize = 32;
/// The earliest and latest event times accepted (2000-01-01 and 9999-12-31).
const MIN_EVENT_SECONDS: i64 = 946_684_800;
const MAX_EVENT_SECONDS: i64 = 253_402_300_799;
/// The longest call duration recorded (7 days).
const MAX_DURATION_SECONDS: i64 = 7 * 24 * 3600;

/// The audit service.
#[derive(Debug, Clone)]
pub struct Audit {
    store: Store,
    /// The keys checkpoints are checked against.
    trusted: TrustedKeys,
    /// The security monitor (with no rules when it is switched off).
    monitor: Monitor,
    /// Held by the service's clones, not by its background task: it ends when they do.
    lifetime: std::sync::Arc<()>,
}

/// Microseconds since the epoch of a timestamp, if it is a plausible event time.
fn event_micros(at: &prost_types::Timestamp) -> Option<i64> {
    if !(MIN_EVENT_SECONDS..=MAX_EVENT_SECONDS).contains(&at.seconds)
        || !(0..1_000_000_000).contains(&at.nanos)
    {
        return None;
    }
    Some(at.seconds * 1_000_000 + i64::from(at.nanos / 1000))
}

/// A timestamp from microseconds since the Unix epoch.
pub fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

fn is_lower_hex(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks an opaque identifier (a resource id, a method): `[A-Za-z0-9._:/+=-]`, at most
/// `max` bytes. Names and addresses do not fit, so they cannot land in the chain, which
/// redaction cannot touch.
fn opaque(v: &mut Violations, field: &str, value: &str, max: usize) {
    if value.len() > max {
        v.add(field, format!("must be at most {max} characters"));
    } else if !value.bytes().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'+' | b'=' | b'-')
    }) {
        v.add(
            field,
            "must be an opaque identifier of A-Z, a-z, 0-9 and . _ : / + = - (no names or addresses)",
        );
    }
}

/// Checks one event as a producer sent it; the field names are relative to the event.
/// Structural fields are refused when bad; text the producer only reports (user agent,
/// path, attribute values) is kept, made safe and cut to length, so an attacker cannot
/// keep a request out of the trail by sending an odd header.
fn new_event(event: &pb::AuditEvent) -> Result<(Uuid, NewEvent), ApiError> {
    let mut v = Violations::new();
    let event_id = v.uuid("id", &event.id);
    let tenant_id = v.uuid("tenant_id", &event.tenant_id);
    // Stored in canonical form, so erasure by id finds every spelling of it.
    let user_id = if event.user_id.is_empty() {
        String::new()
    } else {
        v.uuid("user_id", &event.user_id).to_string()
    };
    if PbKind::try_from(event.principal_kind).is_err() {
        v.add("principal_kind", "must be a PrincipalKind");
    }
    v.token("action", &event.action, 128);
    if !event.action.contains('.') {
        v.add("action", "must be <service>.<verb>, e.g. auth.login");
    }
    if !event.resource.is_empty() {
        v.token("resource", &event.resource, 64);
    }
    opaque(&mut v, "resource_id", &event.resource_id, 256);
    let metadata = event.metadata.clone().unwrap_or_default();
    opaque(&mut v, "metadata.method", &metadata.method, 256);
    let duration_micros = match &metadata.duration {
        None => 0,
        Some(d)
            if (0..=MAX_DURATION_SECONDS).contains(&d.seconds)
                && (0..1_000_000_000).contains(&d.nanos) =>
        {
            d.seconds * 1_000_000 + i64::from(d.nanos / 1000)
        }
        Some(_) => {
            v.add("metadata.duration", "must be between 0 and 7 days");
            0
        }
    };
    if !event.ip_address.is_empty() && event.ip_address.parse::<IpAddr>().is_err() {
        v.add("ip_address", "must be an IPv4 or IPv6 address");
    }
    let event_time_micros = match event.event_time.as_ref() {
        None => {
            v.add("event_time", "required");
            0
        }
        Some(at) => event_micros(at).unwrap_or_else(|| {
            v.add(
                "event_time",
                "must be a time between the years 2000 and 9999",
            );
            0
        }),
    };
    v.token("service", &event.service, 64);
    match pb::Outcome::try_from(event.outcome) {
        Ok(pb::Outcome::Unspecified) | Err(_) => {
            v.add("outcome", "must be SUCCESS, FAILURE, DENIED or ATTEMPTED");
        }
        Ok(_) => {}
    }
    if !event.trace_id.is_empty() && (event.trace_id.len() != 32 || !is_lower_hex(&event.trace_id))
    {
        v.add("trace_id", "must be 32 lowercase hex characters");
    }
    if event.attributes.len() > MAX_ATTRIBUTES {
        v.add("attributes", "must hold at most 32 entries");
    } else {
        let mut keys: Vec<&String> = event.attributes.keys().collect();
        keys.sort();
        for (i, key) in keys.into_iter().enumerate() {
            // The key itself is not echoed: it is what is being checked.
            v.token(&format!("attributes[{i}]"), key, 64);
        }
    }
    v.finish()?;
    Ok((
        tenant_id,
        NewEvent {
            record: Record {
                tenant_id,
                sequence: 0,
                event_id,
                service: event.service.clone(),
                producer_id: String::new(),
                action: event.action.clone(),
                resource: event.resource.clone(),
                resource_id: event.resource_id.clone(),
                principal_kind: event.principal_kind,
                outcome: event.outcome,
                method: metadata.method,
                duration_micros,
                status: metadata.status,
                trace_id: event.trace_id.clone(),
                event_time_micros,
                receive_time_micros: 0,
            },
            payload: Payload {
                user_id,
                ip_address: event.ip_address.clone(),
                user_agent: sanitized(&event.user_agent, 512),
                path: sanitized(&metadata.path, 2048),
                attributes: event
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.clone(), sanitized(v, 1024)))
                    .collect(),
            },
        },
    ))
}

fn item_error(err: &ApiError) -> BatchItemError {
    BatchItemError {
        code: err.code() as i32,
        reason: err.reason() as i32,
        message: err
            .violations()
            .first()
            .map_or_else(|| err.message().to_owned(), |v| v.description.clone()),
        field: err
            .violations()
            .first()
            .map(|v| v.field.clone())
            .unwrap_or_default(),
    }
}

fn conflict() -> BatchItemError {
    BatchItemError {
        code: tonic::Code::AlreadyExists as i32,
        reason: penny_platform::Reason::AuditEventConflict as i32,
        message: "an event with this id was stored with different content".into(),
        field: "id".into(),
    }
}

/// An event as the API shows it.
pub fn to_proto(event: &StoredEvent) -> pb::AuditEvent {
    let r = &event.record;
    let payload = event.payload.as_ref().map(|(_, p)| p);
    pb::AuditEvent {
        id: r.event_id.to_string(),
        tenant_id: r.tenant_id.to_string(),
        user_id: payload.map(|p| p.user_id.clone()).unwrap_or_default(),
        principal_kind: r.principal_kind,
        action: r.action.clone(),
        resource: r.resource.clone(),
        resource_id: r.resource_id.clone(),
        metadata: Some(pb::RequestMetadata {
            method: r.method.clone(),
            path: payload.map(|p| p.path.clone()).unwrap_or_default(),
            duration: Some(prost_types::Duration {
                seconds: r.duration_micros / 1_000_000,
                nanos: i32::try_from((r.duration_micros % 1_000_000) * 1000).unwrap_or(0),
            }),
            status: r.status,
        }),
        ip_address: payload.map(|p| p.ip_address.clone()).unwrap_or_default(),
        user_agent: payload.map(|p| p.user_agent.clone()).unwrap_or_default(),
        event_time: Some(timestamp(r.event_time_micros)),
        service: r.service.clone(),
        producer_id: r.producer_id.clone(),
        outcome: r.outcome,
        trace_id: r.trace_id.clone(),
        attributes: payload
            .map(|p| {
                p.attributes
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default(),
        sequence: r.sequence,
        prev_hash: event.prev_hash.to_vec(),
        payload_digest: event.payload_digest.to_vec(),
        hash: event.hash.to_vec(),
        receive_time: Some(timestamp(r.receive_time_micros)),
        redact_time: event.redaction.map(|(at, _)| timestamp(at)),
        payload_salt: event
            .payload
            .as_ref()
            .map(|(salt, _)| salt.to_vec())
            .unwrap_or_default(),
    }
}

/// Aborts a task when dropped (a verification that returns early stops its reader).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What [`Audit::verify`] found.
#[derive(Debug, Clone)]
pub struct Verification {
    /// Events verified before the first failure (all of them when valid).
    pub verified: u64,
    /// The first failure.
    pub broken: Option<Broken>,
    /// The head at verification time.
    pub head: (u64, crate::chain::Hash),
}

impl Audit {
    /// The service over a migrated store, trusting checkpoints signed by `trusted`.
    pub fn new(store: Store, trusted: TrustedKeys, monitor: Monitor) -> Self {
        let lifetime = std::sync::Arc::new(());
        monitor.spawn(std::sync::Arc::downgrade(&lifetime));
        Self {
            store,
            trusted,
            monitor,
            lifetime,
        }
    }

    /// The security monitor.
    pub fn monitor(&self) -> &Monitor {
        &self.monitor
    }

    /// Signs a checkpoint of every chain that grew, every `interval`, for as long as the
    /// service lives.
    pub fn spawn_checkpoints(&self, interval: std::time::Duration) {
        let store = self.store.clone();
        let alive = std::sync::Arc::downgrade(&self.lifetime);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                if alive.strong_count() == 0 {
                    return;
                }
                match store.checkpoint_pending().await {
                    Ok(0) => {}
                    Ok(signed) => tracing::debug!(signed, "audit checkpoints signed"),
                    Err(err) => tracing::warn!(error = %err, "audit checkpoints failed; retrying"),
                }
            }
        });
    }

    /// A tenant's latest checkpoint (at or before `at_most`).
    pub async fn checkpoint(
        &self,
        tenant: Uuid,
        at_most: Option<u64>,
    ) -> Result<Option<Checkpoint>, AuditError> {
        Ok(self.store.latest_checkpoint(tenant, at_most).await?)
    }

    /// The store (readiness).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Appends a batch. Each event is checked on its own: a bad one is reported in its
    /// result and the rest are stored. Each tenant's events are stored in one transaction,
    /// in request order; when the database fails the call fails (retrying it is safe:
    /// events already stored come back as duplicates).
    pub async fn append(
        &self,
        producer: &Principal,
        events: &[pb::AuditEvent],
    ) -> Result<Vec<pb::AppendResult>, AuditError> {
        let mut results: Vec<pb::AppendResult> = events
            .iter()
            .map(|e| pb::AppendResult {
                event_id: e.id.clone(),
                result: None,
                duplicate: false,
            })
            .collect();
        // Tenant → (request index, event), in request order.
        let mut by_tenant: BTreeMap<Uuid, Vec<(usize, NewEvent)>> = BTreeMap::new();
        for (index, event) in events.iter().enumerate() {
            match new_event(event) {
                Ok((tenant, mut event)) => {
                    event.record.producer_id.clone_from(&producer.id);
                    by_tenant.entry(tenant).or_default().push((index, event));
                }
                Err(err) => {
                    results[index].result =
                        Some(pb::append_result::Result::Error(item_error(&err)));
                }
            }
        }
        for (tenant, items) in by_tenant {
            let batch: Vec<NewEvent> = items.iter().map(|(_, e)| e.clone()).collect();
            let outcomes = self.store.append(tenant, &batch).await?;
            {
                // Each event is looked at once, when first stored; a monitor that cannot
                // count does not lose the events, which are stored already.
                let seen: Vec<Seen<'_>> = batch
                    .iter()
                    .zip(&outcomes)
                    .filter(|(_, outcome)| matches!(outcome, Appended::New(_)))
                    .map(|(event, _)| Seen {
                        tenant,
                        record: &event.record,
                        payload: &event.payload,
                    })
                    .collect();
                if let Err(err) = self.monitor.observe(&seen).await {
                    tracing::error!(error = %err, events = seen.len(), "the security monitor could not evaluate appended events");
                }
            }
            for ((index, _), outcome) in items.iter().zip(outcomes) {
                let result = &mut results[*index];
                result.result = Some(match outcome {
                    Appended::New(sequence) => pb::append_result::Result::Sequence(sequence),
                    Appended::Duplicate(sequence) => {
                        result.duplicate = true;
                        pb::append_result::Result::Sequence(sequence)
                    }
                    Appended::Conflict => pb::append_result::Result::Error(conflict()),
                });
            }
        }
        Ok(results)
    }

    /// One page of a tenant's events.
    pub async fn query(
        &self,
        tenant: Uuid,
        filter: &Filter,
        cursor: Option<u64>,
        newest_first: bool,
        limit: u64,
    ) -> Result<Vec<StoredEvent>, AuditError> {
        Ok(self
            .store
            .query(tenant, filter, cursor, newest_first, limit)
            .await?)
    }

    /// Up to `limit` events from `from` through `to`, in order (export).
    pub async fn scan(
        &self,
        tenant: Uuid,
        from: u64,
        to: u64,
        limit: u64,
    ) -> Result<Vec<StoredEvent>, AuditError> {
        Ok(self.store.scan(tenant, from, to, limit).await?)
    }

    /// The head of a tenant's chain.
    pub async fn head(&self, tenant: Uuid) -> Result<(u64, crate::chain::Hash), AuditError> {
        Ok(self.store.head(tenant).await?)
    }

    /// Verifies `start..=end` of a tenant's chain (`end` 0: through the head, which the
    /// chain must then reach), and every checkpoint signed in that range: its signature
    /// under a trusted key, and the hash of the event it names. Through the head, the chain
    /// must also reach the latest checkpoint (a tail cut off together with the head is
    /// found there).
    pub async fn verify(
        &self,
        tenant: Uuid,
        start: u64,
        end: u64,
    ) -> Result<Verification, AuditError> {
        // The highest stored sequence and the checkpoints first, then the head: appends in
        // between only move the head further, so a trail written by audit alone never
        // shows a row or a checkpoint past the head read here. (A head moved back shows
        // both.)
        let stored_max = self.store.max_sequence(tenant).await?;
        let checkpoints = self.store.checkpoints(tenant, start.max(1)).await?;
        let head = self.store.head(tenant).await?;
        let start = start.max(1);
        if start > head.0.max(1) {
            return Err(AuditError::Invalid(ApiError::invalid_field(
                "start_sequence",
                format!("is past the head of the chain, {}", head.0),
            )));
        }
        let through_head = end == 0 || end >= head.0;
        let end = if through_head { head.0 } else { end };
        let verdict = |verified, broken| Verification {
            verified,
            broken,
            head,
        };
        let mut signed_hashes = std::collections::HashMap::new();
        let mut last_signed = 0;
        for checkpoint in &checkpoints {
            if let Err(why) = self.trusted.check(checkpoint) {
                return Ok(verdict(
                    0,
                    Some(Broken {
                        sequence: checkpoint.sequence,
                        failure: Failure::CheckpointSignatureInvalid,
                        message: format!(
                            "the checkpoint at event {} does not verify ({why:?})",
                            checkpoint.sequence
                        ),
                    }),
                ));
            }
            signed_hashes.insert(checkpoint.sequence, checkpoint.hash);
            last_signed = last_signed.max(checkpoint.sequence);
        }
        // Where a range starts past 1, its first event's stored prev_hash is taken as given.
        let prev = if start == 1 {
            GENESIS
        } else {
            match self.store.scan(tenant, start, start, 1).await?.first() {
                Some(first) => first.prev_hash,
                None => GENESIS,
            }
        };
        let mut check = ChainCheck::starting_at(start, prev);
        // Pages are fixed ranges of sequence numbers, read ahead by READERS tasks in turn
        // (page i by reader i % READERS) while this one hashes: the database, the
        // decoding and the hashing run side by side. A missing event shows as a short page,
        // which the check reports.
        let mut readers = Vec::with_capacity(VERIFY_READERS);
        let mut inboxes = Vec::with_capacity(VERIFY_READERS);
        for reader in 0..VERIFY_READERS as u64 {
            let (pages_tx, pages_rx) = tokio::sync::mpsc::channel(1);
            inboxes.push(pages_rx);
            let store = self.store.clone();
            readers.push(AbortOnDrop(tokio::spawn(async move {
                let mut low = start + reader * VERIFY_PAGE;
                while low <= end {
                    let high = low.saturating_add(VERIFY_PAGE - 1).min(end);
                    let page = store.scan(tenant, low, high, VERIFY_PAGE).await;
                    let failed = page.is_err();
                    if pages_tx.send(page).await.is_err() || failed {
                        return;
                    }
                    low = low.saturating_add(VERIFY_PAGE * VERIFY_READERS as u64);
                }
            })));
        }
        for turn in 0.. {
            let Some(page) = inboxes[turn % VERIFY_READERS].recv().await else {
                break;
            };
            let page = page?;
            for event in &page {
                if let Err(broken) = check.next(event) {
                    return Ok(verdict(check.verified(), Some(broken)));
                }
                let sequence = event.record.sequence;
                if signed_hashes
                    .get(&sequence)
                    .is_some_and(|h| *h != event.hash)
                {
                    return Ok(verdict(
                        check.verified(),
                        Some(Broken {
                            sequence,
                            failure: Failure::CheckpointMismatch,
                            message: format!(
                                "event {sequence} differs from the checkpoint signed for it"
                            ),
                        }),
                    ));
                }
            }
        }
        let ended = if through_head {
            let reached = check.expected() - 1;
            if last_signed > reached {
                Err(Broken {
                    sequence: reached + 1,
                    failure: Failure::CheckpointMismatch,
                    message: format!(
                        "the chain ends at event {reached} but a checkpoint was signed at event {last_signed} (its tail is gone)"
                    ),
                })
            } else {
                match check.finish_at_head(head.0, &head.1) {
                    Ok(()) => {
                        // Rows past the head were written behind audit's back.
                        let stored = stored_max;
                        if stored > head.0 {
                            Err(Broken {
                                sequence: head.0 + 1,
                                failure: Failure::SequenceGap,
                                message: format!(
                                    "events up to {stored} are stored past the head of the chain, {}",
                                    head.0
                                ),
                            })
                        } else {
                            Ok(())
                        }
                    }
                    Err(broken) => Err(broken),
                }
            }
        } else if check.expected() <= end {
            Err(Broken {
                sequence: check.expected(),
                failure: Failure::SequenceGap,
                message: format!("event {} is missing", check.expected()),
            })
        } else {
            Ok(())
        };
        Ok(verdict(check.verified(), ended.err()))
    }

    /// Removes the personal payload of `target`'s events, recording each redaction in the
    /// chain as an `audit.redact` event made by `caller`. Returns how many were redacted.
    pub async fn redact(
        &self,
        caller: &Principal,
        tenant: Uuid,
        target: &RedactTarget,
        reason: &str,
        erasure_id: Option<Uuid>,
    ) -> Result<u64, AuditError> {
        let record = |sequences: &[u64]| {
            let now = crate::store::now_micros();
            let mut attributes = BTreeMap::from([
                ("count".to_owned(), sequences.len().to_string()),
                ("reason".to_owned(), reason.to_owned()),
            ]);
            if let Some(erasure) = erasure_id {
                attributes.insert("erasure_id".to_owned(), erasure.to_string());
            }
            NewEvent {
                record: Record {
                    tenant_id: tenant,
                    sequence: 0,
                    event_id: Uuid::now_v7(),
                    service: "audit".into(),
                    producer_id: caller.id.clone(),
                    action: REDACT_ACTION.into(),
                    resource: "audit_event".into(),
                    resource_id: crate::store::redaction_digest(sequences),
                    principal_kind: caller.kind.proto() as i32,
                    outcome: pb::Outcome::Success as i32,
                    method: "/penny.audit.v1.AuditService/Redact".into(),
                    duration_micros: 0,
                    status: 0,
                    trace_id: String::new(),
                    event_time_micros: now,
                    receive_time_micros: 0,
                },
                payload: Payload {
                    user_id: caller.id.clone(),
                    attributes,
                    ..Payload::default()
                },
            }
        };
        let redacted = self.store.redact(tenant, target, record).await?;
        if let RedactTarget::User(user) = target {
            self.monitor.forget_user(tenant, user).await?;
        }
        Ok(redacted)
    }
}
