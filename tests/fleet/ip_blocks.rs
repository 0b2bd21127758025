//! The IP block list: a blocked address cannot sign in (whatever the password), per tenant
//! or globally, until the block lapses or is lifted; only staff and services manage the
//! global list.

use std::time::Duration;

use penny_proto::auth::v1 as pb;
use penny_tests::{assert_eventually, bad_fields, error_reason as reason, with_token};
use tonic::Code;
use uuid::Uuid;

use crate::auth::service::{Account, Harness};

const PASSWORD: &str = "a long and unusual passphrase";

async fn login_from(h: &Harness, account: &Account, ip: &str) -> Result<(), tonic::Status> {
    h.auth
        .clone()
        .login(with_token(
            pb::LoginRequest {
                tenant_id: account.tenant.to_string(),
                email: account.email.clone(),
                password: PASSWORD.into(),
                ip_address: ip.into(),
                user_agent: "penny-tests".into(),
            },
            &h.frontend,
        ))
        .await
        .map(drop)
}

async fn block(
    h: &Harness,
    token: &str,
    tenant: Option<Uuid>,
    cidr: &str,
    duration: Option<u64>,
) -> Result<pb::BlockedIp, tonic::Status> {
    h.auth
        .clone()
        .block_ip(with_token(
            pb::BlockIpRequest {
                cidr: cidr.into(),
                tenant_id: tenant.map(|t| t.to_string()).unwrap_or_default(),
                reason: "suspicious logins".into(),
                duration: duration.map(|s| prost_types::Duration {
                    seconds: i64::try_from(s).unwrap(),
                    nanos: 0,
                }),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner().blocked_ip.unwrap())
}

async fn unblock(
    h: &Harness,
    token: &str,
    tenant: Option<Uuid>,
    cidr: &str,
) -> Result<(), tonic::Status> {
    h.auth
        .clone()
        .unblock_ip(with_token(
            pb::UnblockIpRequest {
                cidr: cidr.into(),
                tenant_id: tenant.map(|t| t.to_string()).unwrap_or_default(),
            },
            token,
        ))
        .await
        .map(drop)
}

async fn list(
    h: &Harness,
    token: &str,
    tenant: Option<Uuid>,
) -> Result<Vec<pb::BlockedIp>, tonic::Status> {
    h.auth
        .clone()
        .list_blocked_ips(with_token(
            pb::ListBlockedIpsRequest {
                tenant_id: tenant.map(|t| t.to_string()).unwrap_or_default(),
                ..Default::default()
            },
            token,
        ))
        .await
        .map(|r| r.into_inner().blocked_ips)
}

fn blocked(result: Result<(), tonic::Status>) -> bool {
    result.is_err_and(|s| s.code() == Code::PermissionDenied && reason(&s) == "IP_BLOCKED")
}

#[tokio::test]
async fn a_blocked_address_cannot_sign_in_until_the_block_lapses_or_is_lifted() {
    let mut h = Harness::start().await;
    let acme = h.tenant("acme", false).await;
    h.set_password(&acme, PASSWORD).await;
    let owner = h.login(acme.tenant, &acme.email, PASSWORD).await.unwrap();
    let globex = h.tenant("globex", false).await;
    h.set_password(&globex, PASSWORD).await;
    login_from(&h, &acme, "192.0.2.10").await.unwrap();

    // The owner blocks a /24 in its tenant (the host bits are dropped).
    let made = block(
        &h,
        &owner.access_token,
        Some(acme.tenant),
        "192.0.2.77/24",
        None,
    )
    .await
    .unwrap();
    assert_eq!(made.cidr, "192.0.2.0/24");
    assert_eq!(made.tenant_id, acme.tenant.to_string());
    assert!(blocked(login_from(&h, &acme, "192.0.2.10").await));
    // Also as an IPv4-mapped IPv6 address.
    assert!(blocked(login_from(&h, &acme, "::ffff:192.0.2.10").await));
    // Other addresses, and other tenants, are not affected.
    login_from(&h, &acme, "198.51.100.1").await.unwrap();
    login_from(&h, &globex, "192.0.2.10").await.unwrap();
    let listed = list(&h, &owner.access_token, Some(acme.tenant))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].reason, "suspicious logins");

    // Lifted: allowed again; lifting twice is NOT_FOUND.
    unblock(&h, &owner.access_token, Some(acme.tenant), "192.0.2.0/24")
        .await
        .unwrap();
    login_from(&h, &acme, "192.0.2.10").await.unwrap();
    let status = unblock(&h, &owner.access_token, Some(acme.tenant), "192.0.2.0/24")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // A block with a duration lapses by itself.
    block(
        &h,
        &owner.access_token,
        Some(acme.tenant),
        "192.0.2.10",
        Some(1),
    )
    .await
    .unwrap();
    assert!(blocked(login_from(&h, &acme, "192.0.2.10").await));
    assert_eventually!(
        Duration::from_secs(4),
        login_from(&h, &acme, "192.0.2.10").await.is_ok()
    );
}

#[tokio::test]
async fn the_global_list_is_for_staff_and_services_and_binds_every_tenant() {
    let mut h = Harness::start().await;
    let acme = h.tenant("acme", false).await;
    h.set_password(&acme, PASSWORD).await;
    let owner = h.login(acme.tenant, &acme.email, PASSWORD).await.unwrap();
    let globex = h.tenant("globex", false).await;
    h.set_password(&globex, PASSWORD).await;

    // A tenant owner may not touch the global list, nor another tenant's.
    let status = block(&h, &owner.access_token, None, "2001:db8::/32", None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = block(
        &h,
        &owner.access_token,
        Some(globex.tenant),
        "203.0.113.9",
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = list(&h, &owner.access_token, Some(globex.tenant))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // The security monitor (a fleet service) blocks a range everywhere.
    let made = block(&h, &h.frontend.clone(), None, "2001:db8::1/32", None)
        .await
        .unwrap();
    assert_eq!(made.cidr, "2001:db8::/32");
    assert!(made.tenant_id.is_empty());
    assert!(blocked(login_from(&h, &acme, "2001:db8::1").await));
    assert!(blocked(login_from(&h, &globex, "2001:db8:ffff::2").await));
    login_from(&h, &acme, "2001:db9::1").await.unwrap();
    let global = list(&h, &h.admin.clone(), None).await.unwrap();
    assert_eq!(global.len(), 1);
    assert!(
        list(&h, &owner.access_token, Some(acme.tenant))
            .await
            .unwrap()
            .is_empty()
    );

    // Bad input is named.
    let status = h
        .auth
        .clone()
        .block_ip(with_token(
            pb::BlockIpRequest {
                cidr: "0.0.0.0/0".into(),
                tenant_id: "nope".into(),
                reason: String::new(),
                duration: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                }),
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        bad_fields(&status),
        ["cidr", "tenant_id", "reason", "duration"]
    );
}
