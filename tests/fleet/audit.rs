//! The audit trail: chained per tenant, idempotent, append-only for the serving role,
//! tamper found at the exact event, and redaction that removes the personal payload while
//! the chain still verifies.

use std::collections::HashMap;

use penny_audit::chain::{ChainCheck, Failure, GENESIS};
use penny_audit::checkpoint::{Checkpoint, TrustedKeys};
use penny_audit::offline::{OfflineError, verify_export};
use penny_proto::audit::v1 as pb;
use penny_proto::audit::v1::audit_service_client::AuditServiceClient;
use penny_tests::{TestFleet, error_reason, with_token};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

struct Harness {
    fleet: TestFleet,
    audit: AuditServiceClient<Channel>,
    service: String,
    admin: String,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(TestFleet::builder().with_audit()).await
    }

    async fn start_with(builder: penny_tests::TestFleetBuilder) -> Self {
        let fleet = builder.start().await;
        let audit = AuditServiceClient::new(fleet.audit().server.channel().await);
        let service = fleet.service_token();
        let admin = fleet.admin_token();
        Self {
            fleet,
            audit,
            service,
            admin,
        }
    }

    async fn append(&self, events: Vec<pb::AuditEvent>) -> Vec<pb::AppendResult> {
        self.audit
            .clone()
            .append(with_token(pb::AppendRequest { events }, &self.service))
            .await
            .unwrap()
            .into_inner()
            .results
    }

    async fn verify(&self, tenant: Uuid) -> pb::VerifyChainResponse {
        self.audit
            .clone()
            .verify_chain(with_token(
                pb::VerifyChainRequest {
                    tenant_id: tenant.to_string(),
                    ..Default::default()
                },
                &self.admin,
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn query(&self, request: pb::QueryRequest) -> pb::QueryResponse {
        self.audit
            .clone()
            .query(with_token(request, &self.admin))
            .await
            .unwrap()
            .into_inner()
    }

    async fn owner_db(&self) -> DatabaseConnection {
        penny_platform::db::connect(&self.fleet.audit().database.owner_url())
            .await
            .unwrap()
    }
}

fn event(tenant: Uuid, n: u32, user: Uuid, ip: &str) -> pb::AuditEvent {
    pb::AuditEvent {
        id: Uuid::new_v4().to_string(),
        tenant_id: tenant.to_string(),
        user_id: user.to_string(),
        principal_kind: penny_proto::common::v1::PrincipalKind::User as i32,
        action: if n.is_multiple_of(3) {
            "auth.login".into()
        } else {
            "keys.encrypt".into()
        },
        resource: "key".into(),
        resource_id: format!("key-{n}"),
        metadata: Some(pb::RequestMetadata {
            method: "/penny.keys.v1.KeyService/Encrypt".into(),
            path: String::new(),
            duration: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1_500_000,
            }),
            status: 0,
        }),
        ip_address: ip.into(),
        user_agent: "grpcurl/1.8".into(),
        event_time: Some(prost_types::Timestamp {
            seconds: 1_764_900_000 + i64::from(n),
            nanos: 0,
        }),
        service: "keys".into(),
        outcome: pb::Outcome::Success as i32,
        trace_id: String::new(),
        attributes: HashMap::from([("n".to_owned(), n.to_string())]),
        ..Default::default()
    }
}

async fn chain_of(h: &Harness, n: u32) -> Uuid {
    let tenant = Uuid::new_v4();
    let user = Uuid::new_v4();
    let results = h
        .append(
            (1..=n)
                .map(|i| event(tenant, i, user, "203.0.113.9"))
                .collect(),
        )
        .await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r.result, Some(pb::append_result::Result::Sequence(_))))
    );
    tenant
}

/// SQL naming the tenant's id as the backend stores it.
fn tenant_sql(db: &DatabaseConnection, tenant: Uuid) -> String {
    match db.get_database_backend() {
        DbBackend::Postgres => format!("'{tenant}'::uuid"),
        _ => format!("X'{}'", tenant.simple()),
    }
}

fn new_id_sql(db: &DatabaseConnection) -> &'static str {
    match db.get_database_backend() {
        DbBackend::Postgres => "gen_random_uuid()",
        _ => "randomblob(16)",
    }
}

/// What a database owner (or an attacker with its rights) can do: switch the triggers
/// off. The serving role cannot (see below).
async fn drop_guards(db: &DatabaseConnection) {
    let statements: &[&str] = match db.get_database_backend() {
        DbBackend::Postgres => &[
            "DROP TRIGGER audit_events_append_only ON audit_events",
            "DROP TRIGGER audit_payloads_no_update ON audit_payloads",
            "DROP TRIGGER audit_heads_forward ON audit_heads",
        ],
        _ => &[
            "DROP TRIGGER audit_events_no_update",
            "DROP TRIGGER audit_events_no_delete",
            "DROP TRIGGER audit_payloads_no_update",
            "DROP TRIGGER audit_heads_forward",
        ],
    };
    for sql in statements {
        db.execute_unprepared(sql).await.unwrap();
    }
}

const EVENT_COLUMNS: &str = "service, action, resource, resource_id, principal_kind, outcome, \
    method, duration_micros, status, trace_id, event_time_micros, receive_time_micros, \
    payload_digest, prev_hash, hash";

/// Renumbers events (and payloads) `from..` of `tenant` by `by`.
async fn shift(db: &DatabaseConnection, t: &str, from: u64, by: i64) {
    for table in ["audit_events", "audit_payloads"] {
        db.execute_unprepared(&format!(
            "UPDATE {table} SET sequence = sequence + 100000 WHERE tenant_id = {t} AND sequence >= {from}"
        ))
        .await
        .unwrap();
        db.execute_unprepared(&format!(
            "UPDATE {table} SET sequence = sequence - 100000 + ({by}) WHERE tenant_id = {t} AND sequence >= 100000"
        ))
        .await
        .unwrap();
    }
}

async fn renumber(db: &DatabaseConnection, t: &str, from: u64, to: u64) {
    for table in ["audit_events", "audit_payloads"] {
        db.execute_unprepared(&format!(
            "UPDATE {table} SET sequence = {to} WHERE tenant_id = {t} AND sequence = {from}"
        ))
        .await
        .unwrap();
    }
}

fn failure(response: &pb::VerifyChainResponse) -> (bool, Option<u64>, pb::ChainFailure) {
    (
        response.valid,
        response.first_bad_sequence,
        pb::ChainFailure::try_from(response.failure).unwrap(),
    )
}

#[tokio::test]
async fn every_kind_of_tampering_is_reported_at_the_exact_event() {
    let h = Harness::start().await;
    let untouched = chain_of(&h, 20).await;
    let verified = h.verify(untouched).await;
    assert!(verified.valid, "{verified:?}");
    assert_eq!((verified.verified_count, verified.head_sequence), (20, 20));

    let db = h.owner_db().await;
    drop_guards(&db).await;

    // Edited: one field of event 7.
    let edited = chain_of(&h, 20).await;
    let t = tenant_sql(&db, edited);
    db.execute_unprepared(&format!(
        "UPDATE audit_events SET action = 'auth.logout' WHERE tenant_id = {t} AND sequence = 7"
    ))
    .await
    .unwrap();
    assert_eq!(
        failure(&h.verify(edited).await),
        (false, Some(7), pb::ChainFailure::HashMismatch)
    );

    // Edited: the personal payload of event 7.
    let payload_edited = chain_of(&h, 20).await;
    let t = tenant_sql(&db, payload_edited);
    db.execute_unprepared(&format!(
        "UPDATE audit_payloads SET ip_address = '198.51.100.1' WHERE tenant_id = {t} AND sequence = 7"
    ))
    .await
    .unwrap();
    assert_eq!(
        failure(&h.verify(payload_edited).await),
        (false, Some(7), pb::ChainFailure::HashMismatch)
    );

    // Deleted: event 7.
    let deleted = chain_of(&h, 20).await;
    let t = tenant_sql(&db, deleted);
    db.execute_unprepared(&format!(
        "DELETE FROM audit_events WHERE tenant_id = {t} AND sequence = 7"
    ))
    .await
    .unwrap();
    assert_eq!(
        failure(&h.verify(deleted).await),
        (false, Some(7), pb::ChainFailure::SequenceGap)
    );

    // Inserted: a copy of event 6 put in at 7, the rest renumbered after it.
    let inserted = chain_of(&h, 20).await;
    let t = tenant_sql(&db, inserted);
    shift(&db, &t, 7, 1).await;
    let new_id = new_id_sql(&db);
    db.execute_unprepared(&format!(
        "INSERT INTO audit_events (tenant_id, sequence, event_id, {EVENT_COLUMNS}) \
         SELECT tenant_id, 7, {new_id}, {EVENT_COLUMNS} FROM audit_events \
         WHERE tenant_id = {t} AND sequence = 6"
    ))
    .await
    .unwrap();
    db.execute_unprepared(&format!(
        "INSERT INTO audit_payloads (tenant_id, sequence, user_id, ip_address, user_agent, path, attributes, salt) \
         SELECT tenant_id, 7, user_id, ip_address, user_agent, path, attributes, salt FROM audit_payloads \
         WHERE tenant_id = {t} AND sequence = 6"
    ))
    .await
    .unwrap();
    assert_eq!(
        failure(&h.verify(inserted).await),
        (false, Some(7), pb::ChainFailure::PrevHashMismatch)
    );

    // Reordered: events 7 and 8 swapped.
    let reordered = chain_of(&h, 20).await;
    let t = tenant_sql(&db, reordered);
    renumber(&db, &t, 7, 1007).await;
    renumber(&db, &t, 8, 7).await;
    renumber(&db, &t, 1007, 8).await;
    assert_eq!(
        failure(&h.verify(reordered).await),
        (false, Some(7), pb::ChainFailure::PrevHashMismatch)
    );

    // Truncated: the last three events dropped.
    let truncated = chain_of(&h, 20).await;
    let t = tenant_sql(&db, truncated);
    db.execute_unprepared(&format!(
        "DELETE FROM audit_events WHERE tenant_id = {t} AND sequence >= 18"
    ))
    .await
    .unwrap();
    assert_eq!(
        failure(&h.verify(truncated).await),
        (false, Some(18), pb::ChainFailure::CheckpointMismatch)
    );

    // A payload removed without a redaction.
    let vanished = chain_of(&h, 20).await;
    let t = tenant_sql(&db, vanished);
    db.execute_unprepared(&format!(
        "DELETE FROM audit_payloads WHERE tenant_id = {t} AND sequence = 7"
    ))
    .await
    .unwrap();
    assert_eq!(
        failure(&h.verify(vanished).await),
        (false, Some(7), pb::ChainFailure::RedactionInvalid)
    );

    // A payload deleted and a redaction row forged for it, naming an event that does not
    // exist (what the serving role's own rights allow).
    let forged = chain_of(&h, 20).await;
    let t = tenant_sql(&db, forged);
    db.execute_unprepared(&format!(
        "DELETE FROM audit_payloads WHERE tenant_id = {t} AND sequence = 7"
    ))
    .await
    .unwrap();
    db.execute_unprepared(&format!(
        "INSERT INTO audit_redactions (tenant_id, sequence, redacted_at_micros, redaction_sequence) \
         VALUES ({t}, 7, 1, 9000000000000)"
    ))
    .await
    .unwrap();
    assert_eq!(
        failure(&h.verify(forged).await),
        (false, Some(7), pb::ChainFailure::RedactionInvalid)
    );

    // The head moved back over events that are still stored: they are found past it.
    let rewound = chain_of(&h, 20).await;
    let t = tenant_sql(&db, rewound);
    db.execute_unprepared(&format!(
        "UPDATE audit_heads SET sequence = 15, hash = \
         (SELECT hash FROM audit_events WHERE tenant_id = {t} AND sequence = 15) \
         WHERE tenant_id = {t}"
    ))
    .await
    .unwrap();
    assert_eq!(
        failure(&h.verify(rewound).await),
        (false, Some(16), pb::ChainFailure::SequenceGap)
    );

    // None of it touched the untouched tenant's chain.
    assert!(h.verify(untouched).await.valid);
}

#[tokio::test]
async fn the_serving_role_cannot_change_or_delete_written_events() {
    // A checkpoint every two events, so that table has rows too.
    let h = Harness::start_with(TestFleet::builder().with_audit().audit_checkpoint_every(2)).await;
    let tenant = chain_of(&h, 3).await;
    // One redaction recorded, so every table has rows to refuse changing.
    let first = h
        .query(pb::QueryRequest {
            tenant_id: tenant.to_string(),
            ..Default::default()
        })
        .await
        .events[0]
        .id
        .clone();
    h.audit
        .clone()
        .redact(with_token(
            pb::RedactRequest {
                tenant_id: tenant.to_string(),
                event_ids: vec![first],
                reason: "test".into(),
                ..Default::default()
            },
            &h.admin,
        ))
        .await
        .unwrap();
    // The URL the service serves through: on PostgreSQL the unprivileged app role.
    let db = penny_platform::db::connect(&h.fleet.audit().database.url)
        .await
        .unwrap();
    let postgres = db.get_database_backend() == DbBackend::Postgres;
    let scope = |sql: &str| {
        if postgres {
            format!(
                "BEGIN; SELECT set_config('app.current_tenant', '{tenant}', true); {sql}; COMMIT"
            )
        } else {
            sql.to_owned()
        }
    };
    let mut refused = vec![
        "UPDATE audit_events SET action = 'x.y'",
        "DELETE FROM audit_events",
        "UPDATE audit_payloads SET ip_address = ''",
        "UPDATE audit_redactions SET redaction_sequence = 0",
        "DELETE FROM audit_redactions",
        "UPDATE audit_checkpoints SET key_id = 'mine'",
        "DELETE FROM audit_checkpoints",
        // Heads may be written (appends move them), but only forward.
        "UPDATE audit_heads SET sequence = 1",
        "DELETE FROM audit_heads",
    ];
    let other_hash = format!("UPDATE audit_heads SET hash = {}", bytes_sql(&db, &[0; 32]));
    refused.push(&other_hash);
    if postgres {
        refused.extend([
            "TRUNCATE audit_events",
            "TRUNCATE audit_payloads",
            "TRUNCATE audit_checkpoints",
        ]);
    }
    // The same wrapping works for what the role may do (so the refusals below are
    // refusals, not broken statements): read, add heads, and delete payloads (redaction).
    for sql in [
        "SELECT count(*) FROM audit_events",
        "DELETE FROM audit_payloads WHERE sequence = -1",
    ] {
        db.execute_unprepared(&scope(sql))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    for sql in refused {
        let result = db.execute_unprepared(&scope(sql)).await;
        assert!(result.is_err(), "{sql} was allowed");
        if postgres {
            let _ = db.execute_unprepared("ROLLBACK").await;
        }
    }
    // Everything is still there and verifies.
    let verified = h.verify(tenant).await;
    assert!(verified.valid, "{verified:?}");
    assert_eq!(verified.verified_count, 4);
}

#[tokio::test]
async fn append_is_idempotent_per_item_and_serializes_concurrent_producers() {
    let h = Harness::start().await;
    let tenant = Uuid::new_v4();
    let user = Uuid::new_v4();
    let batch: Vec<pb::AuditEvent> = (1..=5).map(|n| event(tenant, n, user, "")).collect();
    let first = h.append(batch.clone()).await;
    let again = h.append(batch.clone()).await;
    for (a, b) in first.iter().zip(&again) {
        assert!(!a.duplicate && b.duplicate);
        assert_eq!(a.result, b.result);
    }
    // The same id with other content is a conflict; a bad item is reported on its own;
    // the good one beside them is stored.
    let mut changed = batch[0].clone();
    changed.action = "auth.logout".into();
    let mut bad = event(tenant, 6, user, "not-an-ip");
    bad.trace_id = "XYZ".into();
    let good = event(tenant, 7, user, "");
    let results = h.append(vec![changed, bad, good]).await;
    match &results[0].result {
        Some(pb::append_result::Result::Error(e)) => {
            assert_eq!(e.code, Code::AlreadyExists as i32);
            assert_eq!(
                e.reason,
                penny_proto::common::v1::ErrorReason::AuditEventConflict as i32
            );
        }
        other => panic!("{other:?}"),
    }
    match &results[1].result {
        Some(pb::append_result::Result::Error(e)) => {
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert_eq!(e.field, "ip_address");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        results[2].result,
        Some(pb::append_result::Result::Sequence(6))
    );

    // Eight producers at once into one tenant: every event gets its own place.
    let mut tasks = Vec::new();
    for producer in 0..8u32 {
        let client = h.audit.clone();
        let token = h.service.clone();
        tasks.push(tokio::spawn(async move {
            let events = (0..50)
                .map(|i| event(tenant, producer * 100 + i, user, ""))
                .collect();
            client
                .clone()
                .append(with_token(pb::AppendRequest { events }, &token))
                .await
                .unwrap()
                .into_inner()
                .results
        }));
    }
    let mut sequences = Vec::new();
    for task in tasks {
        for result in task.await.unwrap() {
            match result.result {
                Some(pb::append_result::Result::Sequence(s)) => sequences.push(s),
                other => panic!("{other:?}"),
            }
        }
    }
    sequences.sort_unstable();
    assert_eq!(sequences, (7..=406).collect::<Vec<u64>>());
    let verified = h.verify(tenant).await;
    assert!(verified.valid, "{verified:?}");
    assert_eq!(verified.verified_count, 406);

    // Stored with who appended it; text the producer only reports is kept, made safe,
    // never refused (an odd header must not keep a request out of the trail).
    let mut odd = event(tenant, 2000, user, "");
    odd.user_agent = format!("evil\n\u{202e}agent{}", "x".repeat(600));
    let results = h.append(vec![odd.clone()]).await;
    assert!(matches!(
        results[0].result,
        Some(pb::append_result::Result::Sequence(_))
    ));
    let stored = h
        .query(pb::QueryRequest {
            tenant_id: tenant.to_string(),
            newest_first: true,
            page_size: 1,
            ..Default::default()
        })
        .await
        .events
        .remove(0);
    assert_eq!(stored.id, odd.id);
    assert_eq!(stored.producer_id, "svc-test");
    assert_eq!(stored.user_agent.chars().count(), 512);
    assert!(stored.user_agent.starts_with("evil\u{fffd}\u{fffd}agent"));
    // A resource id that is a name or an address is refused: the chain keeps it forever.
    let mut named = event(tenant, 2001, user, "");
    named.resource_id = "ada@example.com".into();
    match &h.append(vec![named]).await[0].result {
        Some(pb::append_result::Result::Error(e)) => assert_eq!(e.field, "resource_id"),
        other => panic!("{other:?}"),
    }

    // Ranges: a slice verifies on its own; a start past the head is refused.
    let slice = h
        .audit
        .clone()
        .verify_chain(with_token(
            pb::VerifyChainRequest {
                tenant_id: tenant.to_string(),
                start_sequence: 5,
                end_sequence: 10,
            },
            &h.admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(slice.valid, "{slice:?}");
    assert_eq!(slice.verified_count, 6);
    let status = h
        .audit
        .clone()
        .verify_chain(with_token(
            pb::VerifyChainRequest {
                tenant_id: tenant.to_string(),
                start_sequence: 10_000,
                end_sequence: 0,
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Only fleet services append: not staff, not users.
    let status = h
        .audit
        .clone()
        .append(with_token(
            pb::AppendRequest {
                events: vec![event(tenant, 1000, user, "")],
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // An empty or oversized batch is refused as a whole.
    let status = h
        .audit
        .clone()
        .append(with_token(pb::AppendRequest { events: vec![] }, &h.service))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn redaction_removes_the_payload_and_the_chain_still_verifies_online_and_offline() {
    let h = Harness::start().await;
    let tenant = Uuid::new_v4();
    let (ada, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut events = Vec::new();
    for n in 1..=6 {
        let mut ada_event = event(tenant, n, ada, "203.0.113.77");
        // However the producer spells Ada's id, erasure finds it.
        if n == 3 {
            ada_event.user_id = ada.to_string().to_uppercase();
        }
        if n == 4 {
            ada_event.user_id = ada.simple().to_string();
        }
        events.push(ada_event);
        events.push(event(tenant, n + 100, bob, "198.51.100.23"));
    }
    h.append(events).await;

    let redact = |user: Uuid| pb::RedactRequest {
        tenant_id: tenant.to_string(),
        user_id: user.to_string(),
        reason: "GDPR erasure request".into(),
        erasure_id: Uuid::new_v4().to_string(),
        ..Default::default()
    };
    let redacted = h
        .audit
        .clone()
        .redact(with_token(redact(ada), &h.admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(redacted.redacted_count, 6);
    // Idempotent: nothing left to redact.
    let again = h
        .audit
        .clone()
        .redact(with_token(redact(ada), &h.admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.redacted_count, 0);

    // Ada's payload is gone; the events and Bob's payload stay.
    let all = h
        .query(pb::QueryRequest {
            tenant_id: tenant.to_string(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .events;
    assert_eq!(all.len(), 13, "12 events and the redaction's own");
    let ada_ip = all
        .iter()
        .filter(|e| e.ip_address == "203.0.113.77")
        .count();
    assert_eq!(ada_ip, 0);
    let redacted_events: Vec<_> = all.iter().filter(|e| e.redact_time.is_some()).collect();
    assert_eq!(redacted_events.len(), 6);
    assert!(
        redacted_events
            .iter()
            .all(|e| e.user_id.is_empty() && e.attributes.is_empty() && e.payload_salt.is_empty())
    );
    assert_eq!(
        all.iter()
            .filter(|e| e.ip_address == "198.51.100.23")
            .count(),
        6
    );
    let redaction = all.last().unwrap();
    assert_eq!(redaction.action, "audit.redact");
    assert_eq!(redaction.attributes["count"], "6");

    // Not in the database either, anywhere.
    let db = h.owner_db().await;
    let t = tenant_sql(&db, tenant);
    for table in ["audit_events", "audit_payloads"] {
        let rows = db
            .query_all_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                format!("SELECT * FROM {table} WHERE tenant_id = {t}"),
            ))
            .await
            .unwrap();
        assert!(!format!("{rows:?}").contains("203.0.113.77"), "{table}");
    }

    // The chain verifies online...
    let verified = h.verify(tenant).await;
    assert!(verified.valid, "{verified:?}");
    assert_eq!(verified.verified_count, 13);

    // ... and offline, from the export.
    let mut stream = h
        .audit
        .clone()
        .export(with_token(
            pb::ExportRequest {
                tenant_id: tenant.to_string(),
                ..Default::default()
            },
            &h.admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut export = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        export.extend_from_slice(&message.data);
    }
    let text = String::from_utf8(export).unwrap();
    assert!(!text.contains("203.0.113.77"));
    let mut check = ChainCheck::starting_at(1, GENESIS);
    for line in text.lines() {
        check
            .next(&penny_audit::export::parse_line(line).unwrap())
            .unwrap();
    }
    assert_eq!(check.verified(), 13);
    check
        .finish_at_head(
            verified.head_sequence,
            &verified.head_hash.try_into().unwrap(),
        )
        .unwrap();
}

#[tokio::test]
async fn query_filters_pages_and_keeps_tenants_apart() {
    let h = Harness::start().await;
    let tenant = Uuid::new_v4();
    let (ada, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut events = Vec::new();
    for n in 1..=9 {
        events.push(event(
            tenant,
            n,
            if n.is_multiple_of(2) { bob } else { ada },
            "",
        ));
    }
    h.append(events).await;
    let other = chain_of(&h, 4).await;

    let by_user = h
        .query(pb::QueryRequest {
            tenant_id: tenant.to_string(),
            user_id: ada.to_string(),
            ..Default::default()
        })
        .await;
    assert_eq!(by_user.events.len(), 5);
    let logins = h
        .query(pb::QueryRequest {
            tenant_id: tenant.to_string(),
            action: "auth.login".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(logins.events.len(), 3);
    let window = h
        .query(pb::QueryRequest {
            tenant_id: tenant.to_string(),
            start_time: Some(prost_types::Timestamp {
                seconds: 1_764_900_003,
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: 1_764_900_006,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(window.events.len(), 3);

    // Newest first, two at a time, every event once.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = h
            .query(pb::QueryRequest {
                tenant_id: tenant.to_string(),
                newest_first: true,
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await;
        seen.extend(page.events.iter().map(|e| e.sequence));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, (1..=9).rev().collect::<Vec<u64>>());
    assert!(
        h.query(pb::QueryRequest {
            tenant_id: other.to_string(),
            ..Default::default()
        })
        .await
        .events
        .iter()
        .all(|e| e.tenant_id == other.to_string())
    );

    // A user of the tenant without `audit:read` is refused; one of another tenant sees
    // nothing at all.
    let viewer = h.fleet.user_token(tenant, &["viewer"]);
    let status = h
        .audit
        .clone()
        .query(with_token(
            pb::QueryRequest {
                tenant_id: tenant.to_string(),
                ..Default::default()
            },
            &viewer,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Bad filters are named.
    let status = h
        .audit
        .clone()
        .query(with_token(
            pb::QueryRequest {
                tenant_id: "nope".into(),
                user_id: "nope".into(),
                page_size: -1,
                page_token: "***".into(),
                ..Default::default()
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        penny_tests::bad_fields(&status),
        ["tenant_id", "user_id", "page_size"]
    );
    let _ = error_reason(&status);
}

fn bytes_sql(db: &DatabaseConnection, bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    match db.get_database_backend() {
        DbBackend::Postgres => format!("decode('{hex}', 'hex')"),
        _ => format!("X'{hex}'"),
    }
}

async fn export_of(h: &Harness, tenant: Uuid) -> String {
    let mut stream = h
        .audit
        .clone()
        .export(with_token(
            pb::ExportRequest {
                tenant_id: tenant.to_string(),
                ..Default::default()
            },
            &h.admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut export = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        export.extend_from_slice(&message.data);
    }
    String::from_utf8(export).unwrap()
}

async fn checkpoint_of(h: &Harness, tenant: Uuid, at_most: Option<u64>) -> Checkpoint {
    let c = h
        .audit
        .clone()
        .get_checkpoint(with_token(
            pb::GetCheckpointRequest {
                tenant_id: tenant.to_string(),
                sequence: at_most,
            },
            &h.admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    let at = c.create_time.unwrap();
    Checkpoint {
        tenant_id: Uuid::parse_str(&c.tenant_id).unwrap(),
        sequence: c.sequence,
        hash: c.hash.try_into().unwrap(),
        create_micros: at.seconds * 1_000_000 + i64::from(at.nanos / 1000),
        signed_payload: c.signed_payload,
        signature: c.signature,
        key_id: c.key_id,
        public_key: c.public_key,
    }
}

/// A chain of 25 events appended five at a time: checkpoints at 10 and 20.
async fn checkpointed_chain(h: &Harness) -> Uuid {
    let tenant = Uuid::new_v4();
    let user = Uuid::new_v4();
    for batch in 0..5 {
        h.append(
            (1..=5)
                .map(|i| event(tenant, batch * 5 + i, user, "203.0.113.1"))
                .collect(),
        )
        .await;
    }
    tenant
}

#[tokio::test]
async fn checkpoints_are_signed_and_catch_a_rewritten_or_shortened_chain() {
    let h = Harness::start_with(TestFleet::builder().with_audit().audit_checkpoint_every(10)).await;
    let key = h.fleet.audit().checkpoint_key.clone();
    let trusted = TrustedKeys::default().with(key.kid(), key.public_key());

    let tenant = checkpointed_chain(&h).await;
    let latest = checkpoint_of(&h, tenant, None).await;
    assert_eq!(latest.sequence, 20);
    trusted.check(&latest).unwrap();
    assert_eq!(checkpoint_of(&h, tenant, Some(15)).await.sequence, 10);
    let status = h
        .audit
        .clone()
        .get_checkpoint(with_token(
            pb::GetCheckpointRequest {
                tenant_id: Uuid::new_v4().to_string(),
                sequence: None,
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(h.verify(tenant).await.valid);

    let db = h.owner_db().await;
    drop_guards(&db).await;

    // Cut short together with its head: events 16.. gone, the head moved back to 15. The
    // chain itself is consistent; the checkpoint at 20 is not reached.
    let cut = checkpointed_chain(&h).await;
    let t = tenant_sql(&db, cut);
    let events = export_of(&h, cut).await;
    let event_15 = penny_audit::export::parse_line(events.lines().nth(14).unwrap()).unwrap();
    db.execute_unprepared(&format!(
        "DELETE FROM audit_events WHERE tenant_id = {t} AND sequence > 15"
    ))
    .await
    .unwrap();
    db.execute_unprepared(&format!(
        "UPDATE audit_heads SET sequence = 15, hash = {} WHERE tenant_id = {t}",
        bytes_sql(&db, &event_15.hash)
    ))
    .await
    .unwrap();
    assert_eq!(
        failure(&h.verify(cut).await),
        (false, Some(16), pb::ChainFailure::CheckpointMismatch)
    );

    // Rewritten from event 5 on, every hash recomputed, the head too: only the checkpoint
    // at 10 knows.
    let rewritten = checkpointed_chain(&h).await;
    let t = tenant_sql(&db, rewritten);
    let mut prev = GENESIS;
    for line in export_of(&h, rewritten).await.lines() {
        let mut event = penny_audit::export::parse_line(line).unwrap();
        if event.record.sequence == 5 {
            event.record.action = "auth.logout".into();
        }
        let hash = penny_audit::chain::event_hash(&prev, &event.record, &event.payload_digest);
        db.execute_unprepared(&format!(
            "UPDATE audit_events SET action = '{}', prev_hash = {}, hash = {} \
             WHERE tenant_id = {t} AND sequence = {}",
            event.record.action,
            bytes_sql(&db, &prev),
            bytes_sql(&db, &hash),
            event.record.sequence
        ))
        .await
        .unwrap();
        prev = hash;
    }
    db.execute_unprepared(&format!(
        "UPDATE audit_heads SET hash = {} WHERE tenant_id = {t}",
        bytes_sql(&db, &prev)
    ))
    .await
    .unwrap();
    assert_eq!(
        failure(&h.verify(rewritten).await),
        (false, Some(10), pb::ChainFailure::CheckpointMismatch)
    );

    // A checkpoint slipped in, signed by a key audit does not trust.
    let forged_tenant = checkpointed_chain(&h).await;
    let t = tenant_sql(&db, forged_tenant);
    let other = penny_audit::checkpoint::Signer::new(std::sync::Arc::new(
        penny_platform::signing::SigningKey::generate().unwrap(),
    ));
    let forged = other.sign(forged_tenant, 25, [9; 32], 1).unwrap();
    db.execute_unprepared(&format!(
        "INSERT INTO audit_checkpoints (tenant_id, sequence, hash, create_micros, signed_payload, signature, key_id, public_key) \
         VALUES ({t}, 25, {}, 1, {}, {}, '{}', {})",
        bytes_sql(&db, &forged.hash),
        bytes_sql(&db, &forged.signed_payload),
        bytes_sql(&db, &forged.signature),
        forged.key_id,
        bytes_sql(&db, &forged.public_key),
    ))
    .await
    .unwrap();
    assert_eq!(
        failure(&h.verify(forged_tenant).await),
        (
            false,
            Some(25),
            pb::ChainFailure::CheckpointSignatureInvalid
        )
    );
}

#[tokio::test]
async fn an_export_verifies_offline_and_every_tampering_is_found_at_its_event() {
    let h = Harness::start_with(TestFleet::builder().with_audit().audit_checkpoint_every(10)).await;
    let key = h.fleet.audit().checkpoint_key.clone();
    let trusted = TrustedKeys::default().with(key.kid(), key.public_key());
    let tenant = checkpointed_chain(&h).await;
    let export = export_of(&h, tenant).await;
    let checkpoint = checkpoint_of(&h, tenant, None).await;
    let verify = |text: String| verify_export(text.as_bytes(), &checkpoint, &trusted);

    let report = verify(export.clone()).unwrap();
    assert_eq!(
        (
            report.verified,
            report.checkpoint_sequence,
            report.unsigned_tail
        ),
        (25, 20, 5)
    );

    let lines: Vec<String> = export.lines().map(str::to_owned).collect();
    let joined = |lines: &[String]| lines.join("\n") + "\n";
    let broken_at = |result: Result<_, OfflineError>| match result {
        Err(OfflineError::Broken(broken)) => (broken.sequence, broken.failure),
        other => panic!("{other:?}"),
    };

    // Edited: event 7's action.
    let mut edited = lines.clone();
    edited[6] = edited[6].replace("\"action\":\"keys.encrypt\"", "\"action\":\"keys.decrypt\"");
    assert_ne!(edited[6], lines[6]);
    assert_eq!(
        broken_at(verify(joined(&edited))),
        (7, Failure::HashMismatch)
    );
    // Deleted: event 7.
    let mut deleted = lines.clone();
    deleted.remove(6);
    assert_eq!(
        broken_at(verify(joined(&deleted))),
        (7, Failure::SequenceGap)
    );
    // Inserted: event 6 again after itself.
    let mut inserted = lines.clone();
    inserted.insert(6, lines[5].clone());
    assert_eq!(
        broken_at(verify(joined(&inserted))),
        (6, Failure::SequenceGap)
    );
    // Reordered: 7 and 8 swapped.
    let mut reordered = lines.clone();
    reordered.swap(6, 7);
    assert_eq!(
        broken_at(verify(joined(&reordered))),
        (7, Failure::SequenceGap)
    );
    // Truncated before the checkpoint.
    assert_eq!(
        broken_at(verify(joined(&lines[..15]))),
        (16, Failure::CheckpointMismatch)
    );
    // A checkpoint from an untrusted key is refused before anything else.
    let stranger = TrustedKeys::default().with("someone-else", &[1; 32]);
    assert!(matches!(
        verify_export(export.as_bytes(), &checkpoint, &stranger),
        Err(OfflineError::Checkpoint(_))
    ));
}

#[tokio::test]
async fn verifying_while_events_are_appended_reports_no_false_failure() {
    // A checkpoint every five events, so checkpoints are signed during the checks too.
    let h = Harness::start_with(TestFleet::builder().with_audit().audit_checkpoint_every(5)).await;
    let tenant = Uuid::new_v4();
    let user = Uuid::new_v4();
    h.append((0..5).map(|n| event(tenant, n, user, "")).collect())
        .await;
    let writer = {
        let client = h.audit.clone();
        let token = h.service.clone();
        tokio::spawn(async move {
            for batch in 1..60u32 {
                let events = (0..5)
                    .map(|n| event(tenant, batch * 10 + n, user, ""))
                    .collect();
                client
                    .clone()
                    .append(with_token(pb::AppendRequest { events }, &token))
                    .await
                    .unwrap();
            }
        })
    };
    let mut checks = 0;
    while !writer.is_finished() {
        let verified = h.verify(tenant).await;
        assert!(verified.valid, "{verified:?}");
        checks += 1;
    }
    writer.await.unwrap();
    assert!(checks > 0);
    assert!(h.verify(tenant).await.valid);
}
