//! Sessions and revocation: a revoked session, a logged-out session and a suspended user
//! are refused by every service within 2 s, without a call to auth per request; the
//! revocation stream resumes where a follower left off; a verifier that cannot hear from
//! auth refuses user credentials rather than guess.

use std::time::Duration;

use penny_proto::auth::v1 as pb;
use penny_proto::auth::v1::auth_service_client::AuthServiceClient;
use penny_proto::authz::v1 as authz_pb;
use penny_proto::keys::v1 as keys_pb;
use penny_proto::tenants::v1 as tpb;
use penny_tests::{assert_eventually, error_reason as reason, with_token};
use tonic::Code;
use uuid::Uuid;

use crate::auth::service::{Account, Harness};

const PASSWORD: &str = "a long and unusual passphrase";

/// One call to each of the four services with `token`, acting in `tenant` as `user`. An
/// `Err` with UNAUTHENTICATED means the credential itself was refused.
async fn probe_every_service(
    h: &Harness,
    token: &str,
    tenant: Uuid,
    user: Uuid,
) -> [Result<(), tonic::Status>; 4] {
    let tenant_id = tenant.to_string();
    let keys =
        keys_pb::key_service_client::KeyServiceClient::new(h.fleet.keys().server.channel().await)
            .get_key(with_token(
                keys_pb::GetKeyRequest {
                    tenant_id: tenant_id.clone(),
                },
                token,
            ))
            .await
            .map(drop);
    let authz = authz_pb::authz_service_client::AuthzServiceClient::new(
        h.fleet.authz().server.channel().await,
    )
    .list_roles(with_token(
        authz_pb::ListRolesRequest {
            tenant_id: tenant_id.clone(),
            ..Default::default()
        },
        token,
    ))
    .await
    .map(drop);
    let tenants = h
        .tenants
        .clone()
        .get_tenant(with_token(
            tpb::GetTenantRequest {
                tenant_id: tenant_id.clone(),
            },
            token,
        ))
        .await
        .map(drop);
    let auth = h
        .auth
        .clone()
        .list_sessions(with_token(
            pb::ListSessionsRequest {
                tenant_id,
                user_id: user.to_string(),
                ..Default::default()
            },
            token,
        ))
        .await
        .map(drop);
    [keys, authz, tenants, auth]
}

/// Whether every service let the credential through its authentication (a permission
/// refusal further on is fine: the owner holds no key permissions).
async fn accepted_everywhere(h: &Harness, token: &str, tenant: Uuid, user: Uuid) -> bool {
    probe_every_service(h, token, tenant, user)
        .await
        .iter()
        .all(|r| {
            r.as_ref()
                .err()
                .is_none_or(|s| s.code() != Code::Unauthenticated)
        })
}

/// Whether every service refused the credential as revoked.
async fn revoked_everywhere(h: &Harness, token: &str, tenant: Uuid, user: Uuid) -> bool {
    probe_every_service(h, token, tenant, user)
        .await
        .iter()
        .all(|r| {
            r.as_ref()
                .err()
                .is_some_and(|s| s.code() == Code::Unauthenticated && reason(s) == "TOKEN_REVOKED")
        })
}

async fn signed_in_account(h: &mut Harness, slug: &str) -> Account {
    let account = h.tenant(slug, false).await;
    h.set_password(&account, PASSWORD).await;
    account
}

async fn sign_in(h: &mut Harness, account: &Account) -> pb::Tokens {
    h.login(account.tenant, &account.email, PASSWORD)
        .await
        .unwrap()
}

async fn sessions(
    h: &Harness,
    token: &str,
    tenant: Uuid,
    user: Uuid,
) -> Result<Vec<pb::Session>, tonic::Status> {
    h.auth
        .clone()
        .list_sessions(with_token(
            pb::ListSessionsRequest {
                tenant_id: tenant.to_string(),
                user_id: user.to_string(),
                ..Default::default()
            },
            token,
        ))
        .await
        .map(|r| r.into_inner().sessions)
}

async fn revoke(
    h: &Harness,
    token: &str,
    tenant: Uuid,
    target: pb::revoke_session_request::Target,
) -> Result<u32, tonic::Status> {
    h.auth
        .clone()
        .revoke_session(with_token(
            pb::RevokeSessionRequest {
                tenant_id: tenant.to_string(),
                target: Some(target),
                reason: "test".into(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner().revoked_count)
}

#[tokio::test]
async fn a_revoked_or_logged_out_session_is_refused_by_every_service_within_two_seconds() {
    let mut h = Harness::start().await;
    let acme = signed_in_account(&mut h, "acme").await;
    let first = sign_in(&mut h, &acme).await;
    let second = sign_in(&mut h, &acme).await;
    assert!(accepted_everywhere(&h, &first.access_token, acme.tenant, acme.user).await);
    assert!(accepted_everywhere(&h, &second.access_token, acme.tenant, acme.user).await);

    // The user sees both sessions, newest first, the one in use marked.
    let listed = sessions(&h, &second.access_token, acme.tenant, acme.user)
        .await
        .unwrap();
    let ids: Vec<&str> = listed.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, [second.session_id.as_str(), first.session_id.as_str()]);
    assert!(listed[0].current && !listed[1].current);
    assert_eq!(listed[0].ip_address, "192.0.2.10");

    // The user ends the first session from the second.
    let target = pb::revoke_session_request::Target::SessionId(first.session_id.clone());
    assert_eq!(
        revoke(&h, &second.access_token, acme.tenant, target.clone())
            .await
            .unwrap(),
        1
    );
    assert_eventually!(
        Duration::from_secs(2),
        revoked_everywhere(&h, &first.access_token, acme.tenant, acme.user).await
    );
    // The other session is untouched, and revoking again ends nothing more.
    assert!(accepted_everywhere(&h, &second.access_token, acme.tenant, acme.user).await);
    assert_eq!(
        revoke(&h, &second.access_token, acme.tenant, target)
            .await
            .unwrap(),
        0
    );

    // Logout ends the session it is called with.
    h.auth
        .clone()
        .logout(with_token(pb::LogoutRequest {}, &second.access_token))
        .await
        .unwrap();
    assert_eventually!(
        Duration::from_secs(2),
        revoked_everywhere(&h, &second.access_token, acme.tenant, acme.user).await
    );
    let left = sessions(&h, &h.admin, acme.tenant, acme.user)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    // A fresh sign-in works.
    let third = sign_in(&mut h, &acme).await;
    assert!(accepted_everywhere(&h, &third.access_token, acme.tenant, acme.user).await);
}

#[tokio::test]
async fn suspension_ends_every_session_of_the_user_everywhere() {
    let mut h = Harness::start().await;
    let acme = signed_in_account(&mut h, "acme").await;
    let tokens = sign_in(&mut h, &acme).await;
    assert!(accepted_everywhere(&h, &tokens.access_token, acme.tenant, acme.user).await);
    h.tenants
        .clone()
        .suspend_user(with_token(
            tpb::SuspendUserRequest {
                tenant_id: acme.tenant.to_string(),
                user_id: acme.user.to_string(),
                reason: "test".into(),
                ..Default::default()
            },
            &h.admin,
        ))
        .await
        .unwrap();
    assert_eventually!(
        Duration::from_secs(2),
        revoked_everywhere(&h, &tokens.access_token, acme.tenant, acme.user).await
    );
    assert!(
        sessions(&h, &h.admin, acme.tenant, acme.user)
            .await
            .unwrap()
            .is_empty()
    );
    // Suspended users cannot sign in again.
    let status = h
        .login(acme.tenant, &acme.email, PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "INVALID_CREDENTIALS");
}

#[tokio::test]
async fn other_users_sessions_need_permission_and_other_tenants_see_nothing() {
    let mut h = Harness::start().await;
    let acme = signed_in_account(&mut h, "acme").await;
    let owner = sign_in(&mut h, &acme).await;
    // A viewer in the same tenant.
    let created = h
        .tenants
        .clone()
        .create_user(with_token(
            tpb::CreateUserRequest {
                tenant_id: acme.tenant.to_string(),
                email: "viewer@acme.test".into(),
                display_name: "Viewer".into(),
                role: "viewer".into(),
            },
            &h.admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let viewer_account = Account {
        tenant: acme.tenant,
        user: Uuid::parse_str(&created.id).unwrap(),
        email: created.email,
    };
    h.set_password(&viewer_account, PASSWORD).await;
    let viewer = sign_in(&mut h, &viewer_account).await;

    // The viewer may neither list nor end the owner's sessions; a session it may not end
    // is not even confirmed to exist.
    let status = sessions(&h, &viewer.access_token, acme.tenant, acme.user)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = revoke(
        &h,
        &viewer.access_token,
        acme.tenant,
        pb::revoke_session_request::Target::SessionId(owner.session_id.clone()),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = revoke(
        &h,
        &viewer.access_token,
        acme.tenant,
        pb::revoke_session_request::Target::UserId(acme.user.to_string()),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // Another tenant's owner sees nothing of acme's.
    let globex = signed_in_account(&mut h, "globex").await;
    let stranger = sign_in(&mut h, &globex).await;
    let status = sessions(&h, &stranger.access_token, acme.tenant, acme.user)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = revoke(
        &h,
        &stranger.access_token,
        acme.tenant,
        pb::revoke_session_request::Target::SessionId(owner.session_id.clone()),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // Nor with its own tenant id and acme's session, nor with acme's owner as "its" user:
    // revoking a user of another tenant from one's own is NOT_FOUND, and announces nothing.
    let status = revoke(
        &h,
        &stranger.access_token,
        globex.tenant,
        pb::revoke_session_request::Target::SessionId(owner.session_id.clone()),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = revoke(
        &h,
        &stranger.access_token,
        globex.tenant,
        pb::revoke_session_request::Target::UserId(acme.user.to_string()),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(accepted_everywhere(&h, &owner.access_token, acme.tenant, acme.user).await);

    // The owner (user:read, user:suspend) may do both to the viewer.
    let listed = sessions(&h, &owner.access_token, acme.tenant, viewer_account.user)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].current);
    let ended = revoke(
        &h,
        &owner.access_token,
        acme.tenant,
        pb::revoke_session_request::Target::UserId(viewer_account.user.to_string()),
    )
    .await
    .unwrap();
    assert_eq!(ended, 1);
    assert_eventually!(
        Duration::from_secs(2),
        revoked_everywhere(&h, &viewer.access_token, acme.tenant, viewer_account.user).await
    );
    // Bad input is named, not guessed at.
    let status = h
        .auth
        .clone()
        .revoke_session(with_token(
            pb::RevokeSessionRequest {
                tenant_id: "nope".into(),
                target: None,
                reason: "x\u{0}".into(),
            },
            &owner.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        penny_tests::bad_fields(&status),
        ["tenant_id", "target", "reason"]
    );
}

async fn next(
    stream: &mut tonic::Streaming<pb::WatchRevocationsResponse>,
) -> pb::WatchRevocationsResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a message within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

/// Reads until the message that completes the catch-up; returns every revocation seen and
/// that message.
async fn until_caught_up(
    stream: &mut tonic::Streaming<pb::WatchRevocationsResponse>,
) -> (Vec<pb::Revocation>, pb::WatchRevocationsResponse) {
    let mut seen = Vec::new();
    loop {
        let message = next(stream).await;
        seen.extend(message.revocations.iter().cloned());
        if message.caught_up {
            return (seen, message);
        }
    }
}

#[tokio::test]
async fn the_revocation_stream_resumes_where_a_follower_left_off() {
    let mut h = Harness::start().await;
    let acme = signed_in_account(&mut h, "acme").await;
    let one = sign_in(&mut h, &acme).await;
    let two = sign_in(&mut h, &acme).await;
    let service = h.fleet.service_token();
    let mut client = AuthServiceClient::new(h.fleet.auth().server.channel().await);
    let watch = |token: &str| {
        with_token(
            pb::WatchRevocationsRequest {
                resume_token: token.into(),
            },
            &service,
        )
    };

    let mut stream = client
        .watch_revocations(watch(""))
        .await
        .unwrap()
        .into_inner();
    let (_, caught_up) = until_caught_up(&mut stream).await;
    // Live: a revocation arrives as it is made.
    revoke(
        &h,
        &h.admin,
        acme.tenant,
        pb::revoke_session_request::Target::SessionId(one.session_id.clone()),
    )
    .await
    .unwrap();
    let live = loop {
        let message = next(&mut stream).await;
        if !message.revocations.is_empty() {
            break message;
        }
    };
    assert_eq!(live.revocations.len(), 1);
    assert_eq!(live.revocations[0].id, one.session_id);
    assert_eq!(live.revocations[0].kind, pb::RevocationKind::Session as i32);
    assert_eq!(live.revocations[0].tenant_id, acme.tenant.to_string());
    drop(stream);

    // While nobody listens, another session ends; the follower resumes from its cursor
    // and gets exactly what it missed.
    revoke(
        &h,
        &h.admin,
        acme.tenant,
        pb::revoke_session_request::Target::SessionId(two.session_id.clone()),
    )
    .await
    .unwrap();
    let mut stream = client
        .watch_revocations(watch(&live.resume_token))
        .await
        .unwrap()
        .into_inner();
    let (missed, done) = until_caught_up(&mut stream).await;
    assert!(!done.reset);
    let ids: Vec<&str> = missed.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, [two.session_id.as_str()]);
    // From the cursor before both: both, in order.
    let mut stream = client
        .watch_revocations(watch(&caught_up.resume_token))
        .await
        .unwrap()
        .into_inner();
    let (missed, _) = until_caught_up(&mut stream).await;
    let ids: Vec<&str> = missed.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, [one.session_id.as_str(), two.session_id.as_str()]);

    // A cursor this database never issued: start over with a full snapshot.
    let mut stream = client
        .watch_revocations(watch("r1.999999999"))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    assert!(first.reset);
    let mut snapshot: Vec<String> = first.revocations.iter().map(|r| r.id.clone()).collect();
    if !first.caught_up {
        let (rest, _) = until_caught_up(&mut stream).await;
        snapshot.extend(rest.into_iter().map(|r| r.id));
    }
    assert!(snapshot.contains(&one.session_id) && snapshot.contains(&two.session_id));

    // Garbage is refused; users may not watch.
    let status = client
        .watch_revocations(watch("garbage"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = client
        .watch_revocations(with_token(
            pb::WatchRevocationsRequest::default(),
            &h.fleet.user_token(acme.tenant, &["owner"]),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_verifier_that_cannot_hear_from_auth_refuses_users_but_not_services() {
    let h = Harness::start().await;
    let tenant = Uuid::new_v4();
    let user = h.fleet.user_token(tenant, &["owner"]);
    let service = h.fleet.service_token();
    // Nothing listens on this port.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{dead}"))
        .unwrap()
        .connect_lazy();
    let deaf = h.fleet.config.verifier.following_revocations(
        channel,
        penny_platform::ServiceCredential::fixed(service.clone()),
    );
    assert!(!deaf.wait_for_revocations(Duration::from_millis(500)).await);
    assert_eq!(
        deaf.verify(&user).unwrap_err(),
        penny_platform::principal::TokenError::RevocationStateUnknown
    );
    // Fleet services still reach each other (and auth) with their own tokens.
    assert!(deaf.verify(&service).is_ok());
    // Callers see UNAVAILABLE (retry later), not UNAUTHENTICATED (sign in again).
    let status = penny_platform::ApiError::from(
        penny_platform::principal::TokenError::RevocationStateUnknown,
    );
    assert_eq!(status.code(), Code::Unavailable);

    // Following the real auth service, the same token is fine.
    let channel = h.fleet.auth().server.channel().await;
    let hearing = h
        .fleet
        .config
        .verifier
        .following_revocations(channel, penny_platform::ServiceCredential::fixed(service));
    assert!(hearing.wait_for_revocations(Duration::from_secs(5)).await);
    assert!(hearing.verify(&user).is_ok());
}

#[tokio::test]
async fn changing_the_password_checks_the_old_one_and_can_end_the_other_sessions() {
    let mut h = Harness::start().await;
    let acme = signed_in_account(&mut h, "acme").await;
    let here = sign_in(&mut h, &acme).await;
    let elsewhere = sign_in(&mut h, &acme).await;
    let change = |token: &str, current: &str, new: &str, revoke: bool| {
        with_token(
            pb::ChangePasswordRequest {
                current_password: current.into(),
                new_password: new.into(),
                revoke_other_sessions: revoke,
            },
            token,
        )
    };
    let mut auth = h.auth.clone();
    // The wrong current password is refused like a failed sign-in.
    let status = auth
        .change_password(change(
            &here.access_token,
            "not it at all",
            "a new passphrase",
            true,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "INVALID_CREDENTIALS");
    // A common new password is refused, naming the field only.
    let status = auth
        .change_password(change(&here.access_token, PASSWORD, "Password123", true))
        .await
        .unwrap_err();
    assert_eq!(penny_tests::bad_fields(&status), ["new_password"]);
    assert!(!status.message().contains("Password123"));
    // A token without a session (staff, services) has no password to change.
    let status = auth
        .change_password(change(&h.admin, PASSWORD, "a new passphrase", true))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    let ended = auth
        .change_password(change(
            &here.access_token,
            PASSWORD,
            "a brand new passphrase",
            true,
        ))
        .await
        .unwrap()
        .into_inner()
        .revoked_session_count;
    assert_eq!(ended, 1);
    assert_eventually!(
        Duration::from_secs(2),
        revoked_everywhere(&h, &elsewhere.access_token, acme.tenant, acme.user).await
    );
    assert!(accepted_everywhere(&h, &here.access_token, acme.tenant, acme.user).await);
    let status = h
        .login(acme.tenant, &acme.email, PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "INVALID_CREDENTIALS");
    h.login(acme.tenant, &acme.email, "a brand new passphrase")
        .await
        .unwrap();
}

#[tokio::test]
async fn introspection_answers_from_auths_own_records() {
    let mut h = Harness::start().await;
    let acme = signed_in_account(&mut h, "acme").await;
    let tokens = sign_in(&mut h, &acme).await;
    let mut auth = h.auth.clone();
    let introspect = |token: &str, caller: &str| {
        with_token(
            pb::IntrospectTokenRequest {
                token: token.into(),
            },
            caller,
        )
    };
    let service = h.frontend.clone();
    let found = auth
        .introspect_token(introspect(&tokens.access_token, &service))
        .await
        .unwrap()
        .into_inner();
    assert!(found.active);
    let principal = found.principal.unwrap();
    assert_eq!(principal.id, acme.user.to_string());
    assert_eq!(principal.session_id, tokens.session_id);
    assert_eq!(principal.roles, ["owner"]);
    assert!(!found.token_id.is_empty());
    // `exp` is whole seconds; the session's expiry was taken a moment before.
    let exp = found.expire_time.unwrap().seconds;
    let session_end = tokens.expire_time.unwrap().seconds;
    assert!((exp - session_end).abs() <= 1, "{exp} vs {session_end}");
    // Users may not introspect.
    let status = auth
        .introspect_token(introspect(&tokens.access_token, &tokens.access_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Garbage and a forged token are simply inactive, with nothing else said.
    for token in ["garbage", &h.fleet.user_token(acme.tenant, &["owner"])] {
        let found = auth
            .introspect_token(introspect(token, &service))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(found, pb::IntrospectTokenResponse::default());
    }
    // Logged out: inactive at once (no stream delay: auth's own records).
    auth.logout(with_token(pb::LogoutRequest {}, &tokens.access_token))
        .await
        .unwrap();
    let found = auth
        .introspect_token(introspect(&tokens.access_token, &service))
        .await
        .unwrap()
        .into_inner();
    assert!(!found.active);
}
