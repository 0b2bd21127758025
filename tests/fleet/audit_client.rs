//! The platform's audit client: every mutating call of every server is recorded; while
//! audit is down the events wait in the spool, and once it is back they all arrive, once
//! each, in the order they were made.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use penny_platform::principal::{PLATFORM_TENANT_ID, PrincipalKind};
use penny_platform::signing::TokenGrant;
use penny_proto::audit::v1 as pb;
use penny_proto::audit::v1::audit_service_client::AuditServiceClient;
use penny_proto::keys::v1 as keys_pb;
use penny_proto::keys::v1::key_service_client::KeyServiceClient;
use penny_tests::{TestFleet, assert_eventually, error_reason, with_token};
use tonic::Code;
use uuid::Uuid;

const WORKERS: usize = 8;
const CALLS_PER_WORKER: usize = 1250;

fn datakey(tenant: Uuid) -> keys_pb::GenerateDataKeyRequest {
    keys_pb::GenerateDataKeyRequest {
        tenant_id: tenant.to_string(),
        context: Some(keys_pb::EncryptionContext {
            purpose: "file".into(),
            object_id: "doc-1".into(),
        }),
        key_bits: 256,
    }
}

pub(crate) async fn all_events(
    audit: &mut AuditServiceClient<tonic::transport::Channel>,
    admin: &str,
    tenant: Uuid,
    action: &str,
) -> Vec<pb::AuditEvent> {
    let mut events = Vec::new();
    let mut token = String::new();
    loop {
        let page = audit
            .query(with_token(
                pb::QueryRequest {
                    tenant_id: tenant.to_string(),
                    action: action.into(),
                    page_size: 1000,
                    page_token: token.clone(),
                    ..Default::default()
                },
                admin,
            ))
            .await
            .unwrap()
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return events;
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn ten_thousand_calls_made_while_audit_is_down_all_arrive_once_and_in_order() {
    let mut fleet = TestFleet::builder().with_keys().with_audit().start().await;
    let admin = fleet.admin_token();
    let tenant = Uuid::new_v4();
    let keys_channel = fleet.keys().server.channel().await;
    KeyServiceClient::new(keys_channel.clone())
        .create_key(with_token(
            keys_pb::CreateKeyRequest {
                tenant_id: tenant.to_string(),
            },
            &fleet.service_token(),
        ))
        .await
        .unwrap();

    fleet.stop_audit().await;
    let client = fleet.config.audit.clone().unwrap();

    // Eight services (their own tokens), each making its calls one after another.
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let token = fleet.token(&TokenGrant {
            subject: format!("svc-worker-{worker}"),
            tenant_id: PLATFORM_TENANT_ID,
            roles: vec![],
            kind: PrincipalKind::Service,
            session_id: None,
            lifetime: Duration::from_secs(3600),
        });
        let channel = keys_channel.clone();
        workers.push(tokio::spawn(async move {
            let mut keys = KeyServiceClient::new(channel);
            for _ in 0..CALLS_PER_WORKER {
                keys.generate_data_key(with_token(datakey(tenant), &token))
                    .await
                    .unwrap();
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    // Nothing reached audit; the calls were not held up, and the events wait on disk.
    assert_eventually!(Duration::from_secs(10), client.spooled() > 0);

    // While audit is down, a security-critical event cannot be made durable: refused.
    let critical = pb::AuditEvent {
        id: Uuid::new_v4().to_string(),
        tenant_id: tenant.to_string(),
        action: "keys.rotate_key".into(),
        service: "keys".into(),
        outcome: pb::Outcome::Success as i32,
        event_time: Some(prost_types::Timestamp {
            seconds: 1_764_900_000,
            nanos: 0,
        }),
        ..Default::default()
    };
    let status = tonic::Status::from(client.record_critical(critical.clone()).await.unwrap_err());
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(error_reason(&status), "AUDIT_UNAVAILABLE");

    fleet.restart_audit().await;
    assert_eventually!(Duration::from_secs(120), client.spooled() == 0);
    client.record_critical(critical).await.unwrap();

    let mut audit = AuditServiceClient::new(fleet.audit().server.channel().await);
    let events = all_events(
        &mut audit,
        &admin,
        PLATFORM_TENANT_ID,
        "keys.generate_data_key",
    )
    .await;
    assert_eq!(events.len(), WORKERS * CALLS_PER_WORKER, "every call, once");
    let ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), events.len(), "no event twice");
    // Per worker, in the order the calls were made: sequence and time rise together.
    let mut by_worker: HashMap<String, Vec<&pb::AuditEvent>> = HashMap::new();
    for event in &events {
        assert_eq!(event.outcome, pb::Outcome::Success as i32);
        assert_eq!(event.service, "keys");
        by_worker
            .entry(event.attributes["principal_id"].clone())
            .or_default()
            .push(event);
    }
    assert_eq!(by_worker.len(), WORKERS);
    for (worker, events) in &by_worker {
        assert_eq!(events.len(), CALLS_PER_WORKER, "{worker}");
        for pair in events.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(a.sequence < b.sequence);
            let at = |e: &pb::AuditEvent| {
                let t = e.event_time.unwrap();
                (t.seconds, t.nanos)
            };
            assert!(
                at(a) <= at(b),
                "{worker}: {} before {}",
                a.sequence,
                b.sequence
            );
        }
    }
    let verified = audit
        .verify_chain(with_token(
            pb::VerifyChainRequest {
                tenant_id: PLATFORM_TENANT_ID.to_string(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(verified.valid, "{verified:?}");
}

#[tokio::test]
async fn refused_calls_are_recorded_with_the_caller_and_reads_are_not() {
    let fleet = TestFleet::builder().with_keys().with_audit().start().await;
    let admin = fleet.admin_token();
    let tenant = Uuid::new_v4();
    let mut keys = KeyServiceClient::new(fleet.keys().server.channel().await);
    let service = fleet.service_token();
    keys.create_key(with_token(
        keys_pb::CreateKeyRequest {
            tenant_id: tenant.to_string(),
        },
        &service,
    ))
    .await
    .unwrap();
    keys.get_key(with_token(
        keys_pb::GetKeyRequest {
            tenant_id: tenant.to_string(),
        },
        &service,
    ))
    .await
    .unwrap();
    // A tenant user may not use keys directly: refused, and recorded in its tenant.
    let user_tenant = Uuid::new_v4();
    let user = fleet.user_token(user_tenant, &["owner"]);
    let status = keys
        .generate_data_key(with_token(datakey(tenant), &user))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // And an anonymous call.
    keys.generate_data_key(datakey(tenant)).await.unwrap_err();

    let mut audit = AuditServiceClient::new(fleet.audit().server.channel().await);
    assert_eventually!(
        Duration::from_secs(10),
        !all_events(&mut audit, &admin, user_tenant, "keys.generate_data_key")
            .await
            .is_empty()
    );
    let denied = all_events(&mut audit, &admin, user_tenant, "keys.generate_data_key").await;
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].outcome, pb::Outcome::Denied as i32);
    assert_eq!(
        denied[0].metadata.as_ref().unwrap().status,
        Code::PermissionDenied as i32
    );
    assert_eq!(
        denied[0].principal_kind,
        penny_proto::common::v1::PrincipalKind::User as i32
    );
    assert_eq!(
        denied[0].metadata.as_ref().unwrap().method,
        "/penny.keys.v1.KeyService/GenerateDataKey"
    );
    assert!(!denied[0].ip_address.is_empty(), "the peer's address");

    assert_eventually!(
        Duration::from_secs(10),
        !all_events(
            &mut audit,
            &admin,
            PLATFORM_TENANT_ID,
            "keys.generate_data_key"
        )
        .await
        .is_empty()
    );
    let anonymous = all_events(
        &mut audit,
        &admin,
        PLATFORM_TENANT_ID,
        "keys.generate_data_key",
    )
    .await;
    assert_eq!(anonymous.len(), 1);
    assert_eq!(anonymous[0].outcome, pb::Outcome::Denied as i32);
    assert!(anonymous[0].user_id.is_empty() && anonymous[0].attributes.is_empty());
    // The write was recorded, the read was not.
    assert_eq!(
        all_events(&mut audit, &admin, PLATFORM_TENANT_ID, "keys.create_key")
            .await
            .len(),
        1
    );
    assert!(
        all_events(&mut audit, &admin, PLATFORM_TENANT_ID, "keys.get_key")
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn every_sign_in_outcome_is_audited_and_sign_in_fails_closed_without_audit() {
    use crate::auth::service::Harness;
    const PASSWORD: &str = "a long and unusual passphrase";
    let mut h = Harness::start_with(TestFleet::builder().with_audit()).await;
    let acme = h.tenant("acme", false).await;
    h.set_password(&acme, PASSWORD).await;
    let tokens = h.login(acme.tenant, &acme.email, PASSWORD).await.unwrap();
    let status = h
        .login(acme.tenant, &acme.email, "not the passphrase at all")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let admin = h.admin.clone();
    let mut audit = AuditServiceClient::new(h.fleet.audit().server.channel().await);
    let recorded = all_events(&mut audit, &admin, acme.tenant, "auth.sign_in").await;
    assert_eq!(
        recorded.len(),
        4,
        "each attempt before it was checked, and how it ended, at once (not batched)"
    );
    let (attempts, sign_ins): (Vec<_>, Vec<_>) = recorded
        .iter()
        .partition(|e| e.outcome == pb::Outcome::Attempted as i32);
    assert_eq!(attempts.len(), 2);
    for (attempt, ended) in attempts.iter().zip(&sign_ins) {
        assert_eq!(ended.attributes["attempt_id"], attempt.id);
        assert!(attempt.sequence < ended.sequence);
        assert!(attempt.user_id.is_empty(), "not known before the check");
    }
    let (ok, failed) = (sign_ins[0], sign_ins[1]);
    assert_eq!(ok.outcome, pb::Outcome::Success as i32);
    assert_eq!(ok.user_id, acme.user.to_string());
    assert_eq!(ok.attributes["result"], "signed_in");
    let claims: serde_json::Value = {
        use base64::Engine as _;
        let payload = tokens.access_token.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(ok.resource_id, claims["sid"].as_str().unwrap());
    assert_eq!(ok.ip_address, "192.0.2.10");
    assert_eq!(failed.outcome, pb::Outcome::Failure as i32);
    assert_eq!(failed.attributes["result"], "invalid_credentials");
    assert!(
        failed.user_id.is_empty(),
        "an unknown user and a wrong password look alike"
    );
    assert_eq!(failed.ip_address, "192.0.2.10");

    // Audit down: no sign-in, right or wrong, is answered except as UNAVAILABLE.
    h.fleet.stop_audit().await;
    for password in [PASSWORD, "not the passphrase at all"] {
        let status = h
            .login(acme.tenant, &acme.email, password)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(error_reason(&status), "AUDIT_UNAVAILABLE");
    }
    h.fleet.restart_audit().await;
    h.login(acme.tenant, &acme.email, PASSWORD).await.unwrap();
}
