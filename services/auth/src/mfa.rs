//! TOTP MFA: enrolment (secret, `otpauth://` URI, QR code), confirmation (first code, 10
//! recovery codes), the second step of sign-in, and switching it off.
//!
//! Secrets are encrypted through KeyService under the tenant's key with the context
//! (purpose `mfa`, the user id), so the auth database holds no secret in the clear. Every
//! code is checked against the user's OTP counter, kept apart from password attempts, and
//! each TOTP step is accepted once per user.

use std::net::IpAddr;
use std::time::Duration;

use penny_platform::access::ENROLL_SCOPE;
use penny_platform::principal::PrincipalKind;
use penny_platform::{ApiError, Principal, Reason};
use penny_proto::tenants::v1 as tenants_pb;
use time::OffsetDateTime;
use tonic::Code;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::domain::lockout::{CounterKey, LockoutPolicy, Verdict};
use crate::domain::totp;
use crate::error::AuthError;
use crate::service::{Auth, SignedIn, token_hash};
use crate::store::MfaState;

/// A pending enrolment lapses unless confirmed within this.
pub const ENROLL_TTL: Duration = Duration::from_secs(15 * 60);
/// A sign-in challenge lapses after this.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(5 * 60);
/// The prefix of challenge tokens.
pub const CHALLENGE_PREFIX: &str = "mfc_";
/// The purpose bound to encrypted TOTP secrets.
const PURPOSE: &str = "mfa";

/// What enrolment hands the user.
#[derive(Debug)]
pub struct Enrolment {
    /// The secret in base32.
    pub secret: Zeroizing<String>,
    /// The `otpauth://` URI.
    pub uri: Zeroizing<String>,
    /// A PNG of the URI's QR code.
    pub qr_png: Vec<u8>,
    /// When the pending enrolment lapses.
    pub expires_at: OffsetDateTime,
}

/// The second factor offered.
#[derive(Debug, Clone)]
pub enum Proof {
    /// A 6-digit TOTP code.
    Totp(Zeroizing<String>),
    /// A recovery code.
    Recovery(Zeroizing<String>),
    /// The account password (DisableMfa only).
    Password(Zeroizing<String>),
}

/// OTP attempts are limited on their own counter with the default lockout policy: more
/// than 5 wrong codes in 5 minutes lock it for 15 minutes, doubling with each lock.
fn otp_policy() -> LockoutPolicy {
    LockoutPolicy::default()
}

fn otp_keys(user: Uuid) -> [CounterKey; 1] {
    [CounterKey::Otp(user.to_string())]
}

fn code_refused() -> AuthError {
    ApiError::new(
        Code::Unauthenticated,
        Reason::MfaCodeInvalid,
        "the code is not valid",
    )
    .into()
}

/// The user a caller's session token speaks for, with its session.
fn session_user(caller: &Principal) -> Result<(Uuid, Uuid), AuthError> {
    let user = Uuid::try_parse(&caller.id).ok();
    let session = caller
        .session_id
        .as_deref()
        .and_then(|s| Uuid::try_parse(s).ok());
    match (caller.kind, user, session) {
        (PrincipalKind::User, Some(user), Some(session)) => Ok((user, session)),
        _ => Err(ApiError::failed_precondition(
            Reason::FailedPrecondition,
            "MFA is managed with a signed-in user's own session token",
        )
        .into()),
    }
}

impl Auth {
    /// Checks one code of a user's OTP budget: the counter admits it, `check` decides, and
    /// the outcome is counted. A refused or locked attempt is MFA_CODE_INVALID.
    async fn spend_otp_attempt<F>(
        &self,
        tenant: Uuid,
        user: Uuid,
        check: F,
    ) -> Result<(), AuthError>
    where
        F: AsyncFnOnce() -> Result<bool, AuthError>,
    {
        let now = OffsetDateTime::now_utc();
        let keys = otp_keys(user);
        let policy = otp_policy();
        let verdict = self
            .store
            .begin_attempt(tenant, &keys, &policy, now)
            .await?;
        if verdict != Verdict::Proceed {
            return Err(ApiError::new(
                Code::Unauthenticated,
                Reason::MfaAttemptsExceeded,
                "too many wrong codes; try again later",
            )
            .into());
        }
        match check().await {
            Ok(true) => {
                self.store.attempt_succeeded(tenant, &keys, now).await?;
                Ok(())
            }
            Ok(false) => {
                self.store
                    .attempt_failed(tenant, &keys, &policy, now)
                    .await?;
                Err(code_refused())
            }
            Err(err) => {
                self.store.attempt_abandoned(tenant, &keys, now).await?;
                Err(err)
            }
        }
    }

    /// Whether `proof` is a valid second factor for an active enrolment, using it up (a
    /// TOTP step or a recovery code works once).
    async fn check_factor(
        &self,
        tenant: Uuid,
        user: Uuid,
        proof: &Proof,
    ) -> Result<bool, AuthError> {
        let Some(mfa) = self.store.mfa(tenant, user).await? else {
            return Ok(false);
        };
        if mfa.state != MfaState::Active {
            return Ok(false);
        }
        match proof {
            Proof::Totp(code) => {
                let secret = self
                    .open(tenant, PURPOSE, &user.to_string(), &mfa.secret_ciphertext)
                    .await?;
                let totp =
                    totp::totp(&secret, "user").map_err(|e| AuthError::Internal(e.to_string()))?;
                let now = penny_platform::principal::now_secs();
                match totp::matching_step(&totp, code, now) {
                    Some(step) => Ok(self.store.accept_step(tenant, user, step).await?),
                    None => Ok(false),
                }
            }
            Proof::Recovery(code) => Ok(self
                .store
                .use_recovery_code(
                    tenant,
                    user,
                    &totp::recovery_code_hash(user, code),
                    OffsetDateTime::now_utc(),
                )
                .await?),
            Proof::Password(_) => Ok(false),
        }
    }

    /// Starts TOTP enrolment for the caller (replacing a pending one).
    pub async fn enroll_mfa(&self, caller: &Principal) -> Result<Enrolment, AuthError> {
        let (user, _) = session_user(caller)?;
        let tenant = caller.tenant_id;
        let account = self.existing_user(tenant, user).await?;
        if self
            .store
            .mfa(tenant, user)
            .await?
            .is_some_and(|m| m.state == MfaState::Active)
        {
            return Err(already_enrolled());
        }
        let secret = Zeroizing::new(totp::new_secret());
        let totp =
            totp::totp(&secret, &account.email).map_err(|e| AuthError::Internal(e.to_string()))?;
        let uri = Zeroizing::new(
            totp.to_url()
                .map_err(|e| AuthError::Internal(e.to_string()))?,
        );
        let qr_png = totp::qr_png(&uri)
            .ok_or_else(|| AuthError::Internal("the QR code could not be made".into()))?;
        let ciphertext = self
            .seal(tenant, PURPOSE, &user.to_string(), &secret)
            .await?;
        let now = OffsetDateTime::now_utc();
        let expires_at = now + ENROLL_TTL;
        if !self
            .store
            .put_pending_mfa(tenant, user, &ciphertext, expires_at, now)
            .await?
        {
            return Err(already_enrolled());
        }
        Ok(Enrolment {
            secret: Zeroizing::new(totp::secret_base32(&secret)),
            uri,
            qr_png,
            expires_at,
        })
    }

    /// Confirms the caller's pending enrolment with a first code: MFA becomes active, 10
    /// recovery codes are returned (once), and a caller holding an enrolment-only token
    /// gets full tokens for its session.
    pub async fn confirm_mfa(
        &self,
        caller: &Principal,
        code: &str,
    ) -> Result<(Vec<Zeroizing<String>>, Option<SignedIn>), AuthError> {
        let (user, session) = session_user(caller)?;
        let tenant = caller.tenant_id;
        let now = OffsetDateTime::now_utc();
        let upgrading = caller.scopes.iter().any(|s| s == ENROLL_SCOPE);
        if upgrading {
            // The upgraded token must be mintable before MFA is switched on, or the
            // recovery codes would be lost with the failed reply.
            self.keyring.current()?;
        }
        let pending = self
            .store
            .mfa(tenant, user)
            .await?
            .filter(|m| {
                m.state == MfaState::Pending && m.pending_expires_at.is_some_and(|t| t > now)
            })
            .ok_or_else(|| {
                AuthError::from(ApiError::failed_precondition(
                    Reason::MfaNotEnrolled,
                    "no enrolment is waiting for confirmation: call EnrollMfa first",
                ))
            })?;
        let codes: Vec<Zeroizing<String>> = (0..totp::RECOVERY_CODES)
            .map(|_| Zeroizing::new(totp::new_recovery_code()))
            .collect();
        let hashes: Vec<String> = codes
            .iter()
            .map(|c| totp::recovery_code_hash(user, c))
            .collect();
        self.spend_otp_attempt(tenant, user, async || {
            let secret = self
                .open(
                    tenant,
                    PURPOSE,
                    &user.to_string(),
                    &pending.secret_ciphertext,
                )
                .await?;
            let totp =
                totp::totp(&secret, "user").map_err(|e| AuthError::Internal(e.to_string()))?;
            let Some(step) =
                totp::matching_step(&totp, code, penny_platform::principal::now_secs())
            else {
                return Ok(false);
            };
            Ok(self
                .store
                .confirm_mfa(tenant, user, &pending.secret_ciphertext, step, &hashes, now)
                .await?)
        })
        .await?;
        self.store.mark_session_mfa(tenant, session).await?;
        let upgraded = if upgrading {
            Some(self.reissue(caller, session).await?)
        } else {
            None
        };
        Ok((codes, upgraded))
    }

    /// The second step of sign-in: a challenge from `Login` and a code from the same IP.
    pub async fn verify_mfa(
        &self,
        challenge: &str,
        proof: Proof,
        ip: IpAddr,
        user_agent: String,
    ) -> Result<(SignedIn, u32), AuthError> {
        let tenant = crate::service::prefixed_token_tenant(challenge, CHALLENGE_PREFIX)
            .ok_or_else(challenge_refused)?;
        let hash = token_hash(challenge);
        let now = OffsetDateTime::now_utc();
        let (user, challenge_ip) = self
            .store
            .challenge(tenant, &hash, now)
            .await?
            .ok_or_else(challenge_refused)?;
        if challenge_ip != ip.to_string() {
            return Err(challenge_refused());
        }
        if matches!(proof, Proof::Password(_)) {
            return Err(code_refused());
        }
        self.spend_otp_attempt(tenant, user, async || {
            self.check_factor(tenant, user, &proof).await
        })
        .await?;
        // Single use: of two racing verifications only one gets a session.
        if !self.store.consume_challenge(tenant, &hash, now).await? {
            return Err(challenge_refused());
        }
        // What held at the password step must still hold: an active tenant and user, an
        // address not blocked since. The token is issued as of this check.
        let checked_at = OffsetDateTime::now_utc();
        let tenant_record = self
            .tenant(tenant)
            .await?
            .filter(|t| t.state == tenants_pb::TenantState::Active as i32)
            .ok_or(AuthError::InvalidCredentials)?;
        let active = self
            .existing_user(tenant, user)
            .await
            .is_ok_and(|u| u.status == tenants_pb::UserStatus::Active as i32);
        if !active {
            return Err(AuthError::InvalidCredentials);
        }
        if self.ip_blocked(tenant, ip).await? {
            return Err(AuthError::IpBlocked);
        }
        let signed_in = self
            .start_session(&tenant_record, user, ip, user_agent, true, &[], checked_at)
            .await?;
        let left = self.store.recovery_codes_left(tenant, user).await?;
        Ok((signed_in, left))
    }

    /// Turns MFA off for the caller, with a fresh proof. Refused when the tenant requires
    /// MFA.
    pub async fn disable_mfa(&self, caller: &Principal, proof: Proof) -> Result<(), AuthError> {
        let (user, _) = session_user(caller)?;
        let tenant = caller.tenant_id;
        let required = self
            .tenant(tenant)
            .await?
            .and_then(|t| t.security_policy)
            .is_some_and(|p| p.mfa_required);
        if required {
            return Err(ApiError::failed_precondition(
                Reason::MfaRequired,
                "this tenant requires MFA; it cannot be switched off",
            )
            .into());
        }
        match &proof {
            Proof::Password(password) => {
                if !self.password_matches(tenant, user, password).await? {
                    return Err(AuthError::InvalidCredentials);
                }
            }
            _ => {
                self.spend_otp_attempt(tenant, user, async || {
                    self.check_factor(tenant, user, &proof).await
                })
                .await?;
            }
        }
        self.store.delete_mfa(tenant, user).await?;
        Ok(())
    }

    /// Whether the user has MFA in force.
    pub async fn mfa_active(&self, tenant: Uuid, user: Uuid) -> Result<bool, AuthError> {
        Ok(self
            .store
            .mfa(tenant, user)
            .await?
            .is_some_and(|m| m.state == MfaState::Active))
    }

    /// Opens a sign-in challenge for a user who passed the password step.
    pub async fn open_challenge(
        &self,
        tenant: Uuid,
        user: Uuid,
        ip: IpAddr,
    ) -> Result<(String, OffsetDateTime), AuthError> {
        let token = crate::service::new_prefixed_token(CHALLENGE_PREFIX, tenant);
        let expires = OffsetDateTime::now_utc() + CHALLENGE_TTL;
        self.store
            .insert_challenge(tenant, user, &token_hash(&token), &ip.to_string(), expires)
            .await?;
        Ok((token, expires))
    }
}

fn already_enrolled() -> AuthError {
    ApiError::failed_precondition(
        Reason::MfaAlreadyEnrolled,
        "MFA is already active; disable it first to enrol again",
    )
    .into()
}

fn challenge_refused() -> AuthError {
    ApiError::new(
        Code::Unauthenticated,
        Reason::MfaCodeInvalid,
        "the challenge is not valid; sign in again",
    )
    .into()
}
