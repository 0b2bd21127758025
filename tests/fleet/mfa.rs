//! TOTP MFA: a code works once, a code two steps old never, a recovery code once; the
//! secret is stored only encrypted through KeyService; a tenant that requires MFA hands
//! out an enrolment-only token until the user enrols; wrong codes run out.

use penny_proto::auth::v1 as pb;
use penny_proto::tenants::v1 as tpb;
use penny_tests::{error_reason as reason, with_token};
use sea_orm::{ConnectionTrait, Statement};
use tonic::Code;
use totp_rs::{Secret, Totp};

use crate::auth::service::{Account, Harness};

const PASSWORD: &str = "a long and unusual passphrase";
const IP: &str = "192.0.2.44";

async fn login(h: &Harness, account: &Account) -> pb::login_response::Result {
    h.auth
        .clone()
        .login(with_token(
            pb::LoginRequest {
                tenant_id: account.tenant.to_string(),
                email: account.email.clone(),
                password: PASSWORD.into(),
                ip_address: IP.into(),
                user_agent: "penny-tests".into(),
            },
            &h.frontend,
        ))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap()
}

async fn challenge(h: &Harness, account: &Account) -> String {
    match login(h, account).await {
        pb::login_response::Result::MfaChallenge(c) => c.challenge_token,
        other => panic!("expected a challenge, got {other:?}"),
    }
}

async fn verify(
    h: &Harness,
    challenge: &str,
    code: pb::verify_mfa_request::Code,
    ip: &str,
) -> Result<pb::VerifyMfaResponse, tonic::Status> {
    h.auth
        .clone()
        .verify_mfa(with_token(
            pb::VerifyMfaRequest {
                challenge_token: challenge.into(),
                code: Some(code),
                ip_address: ip.into(),
                user_agent: "penny-tests".into(),
            },
            &h.frontend,
        ))
        .await
        .map(tonic::Response::into_inner)
}

fn totp_of(secret: &str) -> Totp {
    let bytes = Secret::try_from_base32(secret).unwrap();
    penny_auth::domain::totp::totp(bytes.as_bytes(), "test").unwrap()
}

/// The code `offset_steps` steps from `base` (seconds): tests fix one base, so a step
/// boundary passing mid-test cannot turn a replay into a fresh code.
fn code_at(totp: &Totp, base: u64, offset_steps: i64) -> String {
    let base = i64::try_from(base).unwrap();
    totp.generate(u64::try_from(base + offset_steps * 30).unwrap())
        .to_string()
}

fn now() -> u64 {
    penny_platform::principal::now_secs()
}

fn totp_code(code: String) -> pb::verify_mfa_request::Code {
    pb::verify_mfa_request::Code::TotpCode(code)
}

/// Enrols and confirms MFA for a signed-in account; returns the secret, the TOTP, the
/// recovery codes, and the time whose code confirmed it.
async fn enrol(h: &Harness, token: &str) -> (String, Totp, Vec<String>, u64) {
    let mut auth = h.auth.clone();
    let enrolment = auth
        .enroll_mfa(with_token(pb::EnrollMfaRequest {}, token))
        .await
        .unwrap()
        .into_inner();
    assert!(
        enrolment.otpauth_uri.starts_with("otpauth://totp/PENNY:"),
        "{}",
        enrolment.otpauth_uri
    );
    assert!(enrolment.otpauth_uri.contains("issuer=PENNY"));
    assert!(enrolment.qr_code_png.starts_with(b"\x89PNG\r\n\x1a\n"));
    let totp = totp_of(&enrolment.secret);
    // A wrong first code is refused and the enrolment stays pending.
    let status = auth
        .confirm_mfa(with_token(
            pb::ConfirmMfaRequest {
                totp_code: "000000".into(),
            },
            token,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "MFA_CODE_INVALID");
    let base = now();
    let confirmed = auth
        .confirm_mfa(with_token(
            pb::ConfirmMfaRequest {
                totp_code: code_at(&totp, base, 0),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(confirmed.recovery_codes.len(), 10);
    (enrolment.secret, totp, confirmed.recovery_codes, base)
}

#[tokio::test]
async fn totp_codes_work_once_recovery_codes_once_and_the_secret_is_never_stored_in_clear() {
    let mut h = Harness::start().await;
    let acme = h.tenant("acme", false).await;
    h.set_password(&acme, PASSWORD).await;
    let token = match login(&h, &acme).await {
        pb::login_response::Result::Tokens(t) => t.access_token,
        other => panic!("{other:?}"),
    };
    let (secret, totp, recovery, base) = enrol(&h, &token).await;

    // The secret is in the database only as KeyService ciphertext.
    let url = h.fleet.auth().database.owner_url();
    let db = penny_platform::db::connect(&url).await.unwrap();
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT secret_ciphertext, state FROM auth_mfa",
        ))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let stored: String = rows[0].try_get_by_index(0).unwrap();
    assert!(stored.starts_with("penny:v"), "{stored}");
    let raw = Secret::try_from_base32(&secret)
        .unwrap()
        .as_bytes()
        .to_vec();
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!stored.contains(&secret) && !stored.contains(&hex));
    if let Some(path) = url.strip_prefix("sqlite://") {
        // Every byte of the SQLite files, the write-ahead log included.
        let path = path.split('?').next().unwrap();
        for file in [path.to_owned(), format!("{path}-wal")] {
            if let Ok(bytes) = std::fs::read(&file) {
                assert!(
                    !bytes.windows(raw.len()).any(|w| w == raw.as_slice()),
                    "{file}"
                );
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{file}"
                );
            }
        }
    }
    // Recovery codes are stored hashed.
    let hashes = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT code_hash FROM auth_recovery_codes",
        ))
        .await
        .unwrap();
    assert_eq!(hashes.len(), 10);
    for row in &hashes {
        let hash: String = row.try_get_by_index(0).unwrap();
        assert!(recovery.iter().all(|c| !hash.contains(c.as_str())));
    }

    // Sign-in now asks for a second factor.
    let first = challenge(&h, &acme).await;
    // The confirming code's step was used: the same code is refused.
    let replayed = verify(&h, &first, totp_code(code_at(&totp, base, 0)), IP)
        .await
        .unwrap_err();
    assert_eq!(reason(&replayed), "MFA_CODE_INVALID");
    // Two steps old: refused.
    let stale = verify(&h, &first, totp_code(code_at(&totp, base, -2)), IP)
        .await
        .unwrap_err();
    assert_eq!(reason(&stale), "MFA_CODE_INVALID");
    // From another address: refused.
    let moved = verify(
        &h,
        &first,
        totp_code(code_at(&totp, base, 1)),
        "198.51.100.9",
    )
    .await
    .unwrap_err();
    assert_eq!(moved.code(), Code::Unauthenticated);
    // The next step's code works once.
    let done = verify(&h, &first, totp_code(code_at(&totp, base, 1)), IP)
        .await
        .unwrap();
    let tokens = done.tokens.unwrap();
    assert!(tokens.scopes.is_empty());
    assert_eq!(done.recovery_codes_remaining, 10);
    // The challenge is used up, and the same code again is refused on a new one.
    let status = verify(&h, &first, totp_code(code_at(&totp, base, 1)), IP)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let second = challenge(&h, &acme).await;
    let status = verify(&h, &second, totp_code(code_at(&totp, base, 1)), IP)
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "MFA_CODE_INVALID");

    // A recovery code works once, however it is typed.
    let code = pb::verify_mfa_request::Code::RecoveryCode(recovery[0].to_uppercase());
    let done = verify(&h, &second, code.clone(), IP).await.unwrap();
    assert_eq!(done.recovery_codes_remaining, 9);
    let third = challenge(&h, &acme).await;
    let status = verify(&h, &third, code, IP).await.unwrap_err();
    assert_eq!(reason(&status), "MFA_CODE_INVALID");

    // Wrong codes run out: after five, even a right one is refused for a while.
    for _ in 0..5 {
        let status = verify(&h, &third, totp_code("123456".into()), IP)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    let status = verify(
        &h,
        &third,
        pb::verify_mfa_request::Code::RecoveryCode(recovery[1].clone()),
        IP,
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&status), "MFA_ATTEMPTS_EXCEEDED");
}

#[tokio::test]
async fn a_tenant_that_requires_mfa_hands_out_an_enrolment_only_token_until_enrolled() {
    let mut h = Harness::start().await;
    let strict = h.tenant("strict", true).await;
    h.set_password(&strict, PASSWORD).await;
    // The wrong password is refused as ever.
    let status = h
        .login(strict.tenant, &strict.email, "not the password")
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "INVALID_CREDENTIALS");
    let enrolment_token = match login(&h, &strict).await {
        pb::login_response::Result::MfaEnrollmentToken(t) => t,
        other => panic!("expected an enrolment token, got {other:?}"),
    };
    assert_eq!(enrolment_token.scopes, ["mfa:enroll"]);
    // It opens nothing but enrolment.
    let status = h
        .tenants
        .clone()
        .get_tenant(with_token(
            tpb::GetTenantRequest {
                tenant_id: strict.tenant.to_string(),
            },
            &enrolment_token.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = h
        .auth
        .clone()
        .list_sessions(with_token(
            pb::ListSessionsRequest {
                tenant_id: strict.tenant.to_string(),
                user_id: strict.user.to_string(),
                ..Default::default()
            },
            &enrolment_token.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // Enrolling with it upgrades the session: full tokens come back with the codes.
    let mut auth = h.auth.clone();
    let enrolment = auth
        .enroll_mfa(with_token(
            pb::EnrollMfaRequest {},
            &enrolment_token.access_token,
        ))
        .await
        .unwrap()
        .into_inner();
    let totp = totp_of(&enrolment.secret);
    let base = now();
    let confirmed = auth
        .confirm_mfa(with_token(
            pb::ConfirmMfaRequest {
                totp_code: code_at(&totp, base, 0),
            },
            &enrolment_token.access_token,
        ))
        .await
        .unwrap()
        .into_inner();
    let full = confirmed.tokens.unwrap();
    assert_eq!(full.session_id, enrolment_token.session_id);
    assert!(full.scopes.is_empty());
    h.tenants
        .clone()
        .get_tenant(with_token(
            tpb::GetTenantRequest {
                tenant_id: strict.tenant.to_string(),
            },
            &full.access_token,
        ))
        .await
        .unwrap();
    let sessions = auth
        .list_sessions(with_token(
            pb::ListSessionsRequest {
                tenant_id: strict.tenant.to_string(),
                user_id: strict.user.to_string(),
                ..Default::default()
            },
            &full.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert!(sessions[0].mfa_verified);
    // Enrolling again is refused while MFA is active; switching it off is refused here.
    let status = auth
        .enroll_mfa(with_token(pb::EnrollMfaRequest {}, &full.access_token))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "MFA_ALREADY_ENROLLED");
    let status = auth
        .disable_mfa(with_token(
            pb::DisableMfaRequest {
                proof: Some(pb::disable_mfa_request::Proof::Password(PASSWORD.into())),
            },
            &full.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "MFA_REQUIRED");
    // The next sign-in asks for the second factor.
    challenge(&h, &strict).await;
}

#[tokio::test]
async fn mfa_can_be_switched_off_with_a_fresh_proof() {
    let mut h = Harness::start().await;
    let acme = h.tenant("acme", false).await;
    h.set_password(&acme, PASSWORD).await;
    let token = match login(&h, &acme).await {
        pb::login_response::Result::Tokens(t) => t.access_token,
        other => panic!("{other:?}"),
    };
    enrol(&h, &token).await;
    let mut auth = h.auth.clone();
    let disable = |proof| with_token(pb::DisableMfaRequest { proof: Some(proof) }, &token);
    let status = auth
        .disable_mfa(disable(pb::disable_mfa_request::Proof::Password(
            "not the password".into(),
        )))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "INVALID_CREDENTIALS");
    auth.disable_mfa(disable(pb::disable_mfa_request::Proof::Password(
        PASSWORD.into(),
    )))
    .await
    .unwrap();
    // Tokens straight from the password again.
    assert!(matches!(
        login(&h, &acme).await,
        pb::login_response::Result::Tokens(_)
    ));
}
