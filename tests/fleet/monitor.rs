//! The security monitor inside audit: the guide's rules fire on the events the fleet
//! records, act through auth and tenants, raise alerts seen on ListAlerts and
//! WatchAlerts, and count together across audit replicas. Security-critical actions are
//! audited before they are done.

use std::time::{Duration, Instant};

use penny_platform::principal::PLATFORM_TENANT_ID;
use penny_proto::audit::v1 as pb;
use penny_proto::audit::v1::audit_service_client::AuditServiceClient;
use penny_proto::auth::v1 as auth_pb;
use penny_proto::authz::v1 as authz_pb;
use penny_proto::authz::v1::authz_service_client::AuthzServiceClient;
use penny_proto::keys::v1 as keys_pb;
use penny_proto::keys::v1::key_service_client::KeyServiceClient;
use penny_proto::tenants::v1 as tpb;
use penny_tests::{TestFleet, error_reason, with_token};
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::audit_client::all_events;
use crate::auth::service::{Account, Harness};

const PASSWORD: &str = "a long and unusual passphrase";
/// Guards against a hang; no test relies on it for timing.
const HANG_GUARD: Duration = Duration::from_secs(60);

async fn login_from(
    h: &mut Harness,
    account: &Account,
    password: &str,
    ip: &str,
) -> Result<auth_pb::Tokens, tonic::Status> {
    let response = h
        .auth
        .login(with_token(
            auth_pb::LoginRequest {
                tenant_id: account.tenant.to_string(),
                email: account.email.clone(),
                password: password.into(),
                ip_address: ip.into(),
                user_agent: "penny-tests".into(),
            },
            &h.frontend,
        ))
        .await?
        .into_inner();
    match response.result {
        Some(auth_pb::login_response::Result::Tokens(tokens)) => Ok(tokens),
        other => panic!("unexpected login result {other:?}"),
    }
}

async fn alerts(
    audit: &mut AuditServiceClient<Channel>,
    token: &str,
    tenant: &str,
    rule: &str,
) -> Vec<pb::Alert> {
    audit
        .list_alerts(with_token(
            pb::ListAlertsRequest {
                tenant_id: tenant.into(),
                page_size: 1000,
                ..Default::default()
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
        .alerts
        .into_iter()
        .filter(|a| a.rule == rule)
        .collect()
}

async fn watch(
    audit: &mut AuditServiceClient<Channel>,
    token: &str,
    tenant: &str,
) -> tonic::Streaming<pb::WatchAlertsResponse> {
    audit
        .watch_alerts(with_token(
            pb::WatchAlertsRequest {
                tenant_id: tenant.into(),
                min_severity: 0,
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
}

/// The first alert (new or changed) on `stream` that satisfies `wanted`.
async fn next_alert(
    stream: &mut tonic::Streaming<pb::WatchAlertsResponse>,
    wanted: impl Fn(&pb::Alert) -> bool,
) -> pb::Alert {
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            let alert = stream
                .message()
                .await
                .expect("alert stream")
                .expect("alert stream ended")
                .alert
                .unwrap();
            if wanted(&alert) {
                return alert;
            }
        }
    })
    .await
    .expect("the alert never came")
}

#[tokio::test]
async fn five_failed_sign_ins_from_one_address_block_it_in_auth() {
    let mut h = Harness::start_with(TestFleet::builder().with_audit()).await;
    let acme = h.tenant("acme", false).await;
    h.set_password(&acme, PASSWORD).await;
    let admin = h.admin.clone();
    let mut audit = AuditServiceClient::new(h.fleet.audit().server.channel().await);
    let mut stream = watch(&mut audit, &admin, "").await;
    const ATTACKER: &str = "198.51.100.7";

    for _ in 0..4 {
        let status = login_from(&mut h, &acme, "not the passphrase", ATTACKER)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    assert!(
        alerts(&mut audit, &admin, "", "suspiciousLogin")
            .await
            .is_empty(),
        "four failures are below the threshold"
    );
    let fifth = Instant::now();
    login_from(&mut h, &acme, "not the passphrase", ATTACKER)
        .await
        .unwrap_err();
    // The fifth failure's audit event is stored before Login answers, and the monitor
    // evaluates it as it is stored: the alert exists once Login has answered.
    let raised = alerts(&mut audit, &admin, "", "suspiciousLogin").await;
    assert_eq!(raised.len(), 1, "{raised:?}");
    let alert = &raised[0];
    assert_eq!(alert.key, ATTACKER);
    assert_eq!(alert.key_kind, pb::KeyKind::Ip as i32);
    assert_eq!(alert.tenant_id, PLATFORM_TENANT_ID.to_string());
    assert_eq!(alert.action, pb::AlertAction::BlockIp as i32);
    assert_eq!(alert.severity, pb::AlertSeverity::High as i32);
    assert_eq!(
        alert.event_ids.len(),
        1,
        "the event that crossed the threshold"
    );

    let executed = next_alert(&mut stream, |a| {
        a.id == alert.id && a.action_status == pb::ActionStatus::Executed as i32
    })
    .await;
    eprintln!(
        "suspiciousLogin: address blocked in auth {:?} after the fifth failure",
        fifth.elapsed()
    );
    assert!(executed.action_error.is_empty());
    // Auth refuses the address before checking anything, even the right password…
    let status = login_from(&mut h, &acme, PASSWORD, ATTACKER)
        .await
        .unwrap_err();
    assert_eq!(error_reason(&status), "IP_BLOCKED", "{status:?}");
    // …and only that address.
    login_from(&mut h, &acme, PASSWORD, "198.51.100.8")
        .await
        .unwrap();
    let blocks = h
        .auth
        .list_blocked_ips(with_token(
            auth_pb::ListBlockedIpsRequest::default(),
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .blocked_ips;
    let block = blocks
        .iter()
        .find(|b| b.cidr == format!("{ATTACKER}/32"))
        .expect("a global block");
    assert!(block.reason.contains(&alert.id), "{:?}", block.reason);
    assert!(block.expire_time.is_some(), "blocks expire (block_secs)");
    // The alert is in the platform's trail.
    let recorded = all_events(&mut audit, &admin, PLATFORM_TENANT_ID, "audit.alert").await;
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].resource_id, alert.id);
    assert_eq!(recorded[0].attributes["rule"], "suspiciousLogin");
}

#[tokio::test]
async fn a_thousand_requests_in_an_hour_suspend_the_user() {
    let mut h = Harness::start_with(TestFleet::builder().with_audit()).await;
    let acme = h.tenant("acme", false).await;
    h.set_password(&acme, PASSWORD).await;
    let admin = h.admin.clone();
    let mut audit = AuditServiceClient::new(h.fleet.audit().server.channel().await);
    let mut stream = watch(&mut audit, &admin, &acme.tenant.to_string()).await;
    let tokens = login_from(&mut h, &acme, PASSWORD, "192.0.2.44")
        .await
        .unwrap();
    let get_user = || tpb::GetUserRequest {
        tenant_id: acme.tenant.to_string(),
        user_id: acme.user.to_string(),
    };
    // The sign-in was the first request; 999 reads make a thousand. Every one is
    // recorded (reads too: the caller is a person), whatever its answer.
    for _ in 0..999 {
        let _ = h
            .tenants
            .get_user(with_token(get_user(), &tokens.access_token))
            .await;
    }
    let alert = next_alert(&mut stream, |a| {
        a.rule == "dataExfiltration" && a.action_status == pb::ActionStatus::Executed as i32
    })
    .await;
    assert_eq!(alert.key, acme.user.to_string());
    assert_eq!(alert.key_kind, pb::KeyKind::User as i32);
    assert_eq!(alert.action, pb::AlertAction::SuspendUser as i32);
    let user = h
        .tenants
        .get_user(with_token(get_user(), &admin))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.status, tpb::UserStatus::Suspended as i32);
    // Suspended means signed out too.
    let status = login_from(&mut h, &acme, PASSWORD, "192.0.2.44")
        .await
        .unwrap_err();
    assert_ne!(status.code(), Code::Ok);
    assert_eq!(
        alerts(
            &mut audit,
            &admin,
            &acme.tenant.to_string(),
            "dataExfiltration"
        )
        .await
        .len(),
        1,
        "one alert per window"
    );
    // Erasing the user takes them out of the alert too; the alert stays.
    audit
        .redact(with_token(
            pb::RedactRequest {
                tenant_id: acme.tenant.to_string(),
                user_id: acme.user.to_string(),
                reason: "erasure request".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    let erased = alerts(
        &mut audit,
        &admin,
        &acme.tenant.to_string(),
        "dataExfiltration",
    )
    .await;
    assert_eq!(erased.len(), 1);
    assert_eq!(erased[0].key, "");
    assert!(!erased[0].message.contains(&acme.user.to_string()));
    assert_eq!(erased[0].action_status, pb::ActionStatus::Executed as i32);
}

#[tokio::test]
async fn granting_owner_raises_a_critical_alert_on_watch_alerts_and_it_can_be_acknowledged() {
    let h = Harness::start_with(TestFleet::builder().with_audit()).await;
    let mut h = h;
    let acme = h.tenant("acme", false).await;
    let admin = h.admin.clone();
    let tenant = acme.tenant.to_string();
    let mut audit = AuditServiceClient::new(h.fleet.audit().server.channel().await);
    let mut stream = watch(&mut audit, &admin, &tenant).await;
    let mut authz = AuthzServiceClient::new(h.fleet.authz().server.channel().await);
    let grantee = Uuid::new_v4().to_string();
    let grant = |role: &str| authz_pb::GrantRoleRequest {
        tenant_id: tenant.clone(),
        subject: Some(authz_pb::Subject {
            kind: penny_proto::common::v1::PrincipalKind::User as i32,
            id: grantee.clone(),
            tenant_id: tenant.clone(),
        }),
        role: role.into(),
        workspace_id: String::new(),
    };
    // Creating the tenant granted its owner `owner`: that raised one already.
    let mut owner_grants = 1;
    penny_tests::assert_eventually!(
        HANG_GUARD,
        alerts(&mut audit, &admin, &tenant, "privilegeEscalation")
            .await
            .len()
            == owner_grants
    );
    // A member grant is no escalation; an owner grant is.
    authz
        .grant_role(with_token(grant("member"), &admin))
        .await
        .unwrap();
    let granted = authz
        .grant_role(with_token(grant("owner"), &admin))
        .await
        .unwrap()
        .into_inner();
    assert!(granted.privilege_change);
    owner_grants += 1;
    // The grant was stored as an attempt before it was made, then as done.
    let mut done: Option<(pb::AuditEvent, Vec<pb::AuditEvent>)>;
    penny_tests::assert_eventually!(HANG_GUARD, {
        let grants = all_events(&mut audit, &admin, acme.tenant, "authz.grant_role").await;
        done = grants
            .iter()
            .find(|e| {
                e.attributes.get("subject_id") == Some(&grantee)
                    && e.attributes
                        .get("privilege_change")
                        .is_some_and(|v| v == "true")
            })
            .cloned()
            .map(|done| (done, grants));
        done.is_some()
    });
    let (done, grants) = done.unwrap();
    assert_eq!(done.outcome, pb::Outcome::Success as i32);
    let attempt = grants
        .iter()
        .find(|e| e.id == done.attributes["attempt_id"])
        .expect("the attempt is in the trail");
    assert_eq!(attempt.outcome, pb::Outcome::Attempted as i32);
    assert!(attempt.sequence < done.sequence);
    assert_eq!(attempt.attributes["role"], "owner");

    let alert = next_alert(&mut stream, |a| {
        a.rule == "privilegeEscalation" && a.event_ids.contains(&done.id)
    })
    .await;
    assert_eq!(alert.tenant_id, tenant);
    assert_eq!(alert.severity, pb::AlertSeverity::Critical as i32);
    assert_eq!(alert.action, pb::AlertAction::ImmediateAlert as i32);
    assert_eq!(alert.action_status, pb::ActionStatus::NotApplicable as i32);
    assert_eq!(alert.state, pb::AlertState::Open as i32);
    assert_eq!(
        alerts(&mut audit, &admin, &tenant, "privilegeEscalation")
            .await
            .len(),
        owner_grants,
        "the member grant raised nothing"
    );

    // Acknowledged, with a note: the watcher sees the change, the trail records it.
    let acked = audit
        .ack_alert(with_token(
            pb::AckAlertRequest {
                tenant_id: tenant.clone(),
                alert_id: alert.id.clone(),
                note: "expected: new co-founder".into(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .alert
        .unwrap();
    assert_eq!(acked.state, pb::AlertState::Acknowledged as i32);
    assert!(acked.ack_time.is_some());
    let seen = next_alert(&mut stream, |a| {
        a.id == alert.id && a.state == pb::AlertState::Acknowledged as i32
    })
    .await;
    assert_eq!(seen.ack_note, "expected: new co-founder");
    // Idempotent; recorded once.
    audit
        .ack_alert(with_token(
            pb::AckAlertRequest {
                tenant_id: tenant.clone(),
                alert_id: alert.id.clone(),
                note: String::new(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let acks = all_events(&mut audit, &admin, acme.tenant, "audit.alert_ack").await;
    assert_eq!(acks.len(), 1);
    // Another tenant's user sees neither the alert nor its existence.
    let outsider = h.fleet.user_token(Uuid::new_v4(), &["owner"]);
    let status = audit
        .ack_alert(with_token(
            pb::AckAlertRequest {
                tenant_id: tenant.clone(),
                alert_id: alert.id.clone(),
                note: String::new(),
            },
            &outsider,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::NotFound | Code::PermissionDenied),
        "{status:?}"
    );
}

fn failed_sign_in(tenant: Uuid, ip: &str) -> pb::AuditEvent {
    pb::AuditEvent {
        id: Uuid::now_v7().to_string(),
        tenant_id: tenant.to_string(),
        action: "auth.sign_in".into(),
        resource: "session".into(),
        ip_address: ip.into(),
        event_time: Some(penny_platform::wire::timestamp(
            time::OffsetDateTime::now_utc(),
        )),
        service: "auth".into(),
        outcome: pb::Outcome::Failure as i32,
        attributes: [("result".to_owned(), "invalid_credentials".to_owned())].into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn two_audit_replicas_on_one_database_count_together_and_fire_once() {
    let mut h = Harness::start_with(TestFleet::builder().with_audit()).await;
    let acme = h.tenant("acme", false).await;
    h.set_password(&acme, PASSWORD).await;
    let admin = h.admin.clone();
    let producer = h.fleet.service_token();
    let replica = h.fleet.start_audit_replica().await;
    let mut first = AuditServiceClient::new(h.fleet.audit().server.channel().await);
    let mut second = AuditServiceClient::new(replica.server.channel().await);
    let mut stream = watch(&mut second, &admin, "").await;
    const ATTACKER: &str = "203.0.113.99";
    let append = |client: &mut AuditServiceClient<Channel>, n: usize| {
        let mut client = client.clone();
        let producer = producer.clone();
        async move {
            let events = (0..n)
                .map(|_| failed_sign_in(acme.tenant, ATTACKER))
                .collect();
            client
                .append(with_token(pb::AppendRequest { events }, &producer))
                .await
                .unwrap();
        }
    };
    // Three failures through one replica, two through the other: neither saw five.
    append(&mut first, 1).await;
    append(&mut second, 1).await;
    append(&mut first, 1).await;
    append(&mut second, 1).await;
    assert!(
        alerts(&mut first, &admin, "", "suspiciousLogin")
            .await
            .is_empty()
    );
    append(&mut first, 1).await;
    let raised = alerts(&mut second, &admin, "", "suspiciousLogin").await;
    assert_eq!(raised.len(), 1);
    // Many more at once, through both: still the one alert for this window.
    let mut burst = Vec::new();
    for i in 0..10 {
        let client = if i % 2 == 0 { &mut first } else { &mut second };
        burst.push(tokio::spawn(append(client, 3)));
    }
    for task in burst {
        task.await.unwrap();
    }
    assert_eq!(
        alerts(&mut first, &admin, "", "suspiciousLogin")
            .await
            .len(),
        1
    );
    // Carried out once, by whichever replica claimed it; auth refuses the address.
    next_alert(&mut stream, |a| {
        a.id == raised[0].id && a.action_status == pb::ActionStatus::Executed as i32
    })
    .await;
    let status = login_from(&mut h, &acme, PASSWORD, ATTACKER)
        .await
        .unwrap_err();
    assert_eq!(error_reason(&status), "IP_BLOCKED");
}

#[tokio::test]
async fn a_dry_run_rule_raises_its_alert_but_blocks_nothing() {
    let rules = penny_audit::monitor::rules::RuleSet::parse(
        br#"{ "rules": [ { "name": "suspiciousLogin", "kind": "threshold",
              "match": { "actions": ["auth.sign_in"], "outcomes": ["failure"] },
              "key": "ip", "threshold": 2, "window_secs": 60,
              "action": "block_ip", "severity": "high", "dry_run": true } ] }"#,
    )
    .unwrap();
    let mut h = Harness::start_with(TestFleet::builder().with_audit().monitor_rules(rules)).await;
    let acme = h.tenant("acme", false).await;
    h.set_password(&acme, PASSWORD).await;
    let admin = h.admin.clone();
    let mut audit = AuditServiceClient::new(h.fleet.audit().server.channel().await);
    for _ in 0..2 {
        login_from(&mut h, &acme, "not the passphrase", "198.51.100.50")
            .await
            .unwrap_err();
    }
    let raised = alerts(&mut audit, &admin, "", "suspiciousLogin").await;
    assert_eq!(raised.len(), 1);
    assert_eq!(raised[0].action_status, pb::ActionStatus::DryRun as i32);
    login_from(&mut h, &acme, PASSWORD, "198.51.100.50")
        .await
        .unwrap();
}

#[tokio::test]
async fn role_grants_and_key_rotation_are_refused_while_audit_is_down_and_done_once_it_is_back() {
    let mut h = Harness::start_with(TestFleet::builder().with_audit()).await;
    let acme = h.tenant("acme", false).await;
    let admin = h.admin.clone();
    let tenant = acme.tenant.to_string();
    let mut authz = AuthzServiceClient::new(h.fleet.authz().server.channel().await);
    let mut keys = KeyServiceClient::new(h.fleet.keys().server.channel().await);
    let grantee = Uuid::new_v4().to_string();
    let grant = || authz_pb::GrantRoleRequest {
        tenant_id: tenant.clone(),
        subject: Some(authz_pb::Subject {
            kind: penny_proto::common::v1::PrincipalKind::User as i32,
            id: grantee.clone(),
            tenant_id: tenant.clone(),
        }),
        role: "member".into(),
        workspace_id: String::new(),
    };
    let rotate = || keys_pb::RotateKeyRequest {
        tenant_id: tenant.clone(),
    };
    let version = |keys: &mut KeyServiceClient<Channel>| {
        let mut keys = keys.clone();
        let admin = admin.clone();
        let tenant = tenant.clone();
        async move {
            keys.get_key(with_token(
                keys_pb::GetKeyRequest { tenant_id: tenant },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap()
            .latest_version
        }
    };
    let before = version(&mut keys).await;

    h.fleet.stop_audit().await;
    let status = authz
        .grant_role(with_token(grant(), &admin))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_reason(&status), "AUDIT_UNAVAILABLE");
    let status = keys
        .rotate_key(with_token(rotate(), &admin))
        .await
        .unwrap_err();
    assert_eq!(error_reason(&status), "AUDIT_UNAVAILABLE");
    // Nothing was done.
    let bindings = authz
        .list_role_bindings(with_token(
            authz_pb::ListRoleBindingsRequest {
                tenant_id: tenant.clone(),
                subject: grant().subject,
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .role_bindings;
    assert!(bindings.is_empty(), "{bindings:?}");
    assert_eq!(version(&mut keys).await, before);

    h.fleet.restart_audit().await;
    authz.grant_role(with_token(grant(), &admin)).await.unwrap();
    let rotated = keys
        .rotate_key(with_token(rotate(), &admin))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(rotated.latest_version, before + 1);
    let mut audit = AuditServiceClient::new(h.fleet.audit().server.channel().await);
    penny_tests::assert_eventually!(Duration::from_secs(30), {
        let events = all_events(&mut audit, &admin, acme.tenant, "keys.rotate_key").await;
        let attempted = events
            .iter()
            .filter(|e| e.outcome == pb::Outcome::Attempted as i32)
            .count();
        let succeeded: Vec<_> = events
            .iter()
            .filter(|e| {
                e.outcome == pb::Outcome::Success as i32 && e.attributes.contains_key("attempt_id")
            })
            .collect();
        attempted == 1
            && succeeded.len() == 1
            && succeeded[0].attributes["version"] == rotated.latest_version.to_string()
    });
}
