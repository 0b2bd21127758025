//! Service credentials: the fleet's services and internal callers trade a client id and
//! secret for a short-lived service token (`IssueServiceToken`, client-credentials style).
//!
//! Clients are provisioned from configuration (only the SHA-256 of each secret is given and
//! stored); a client dropped from it is revoked at the next start, and every service refuses
//! its tokens through the revocation stream. Secrets are 256 random bits, so wrong ones are
//! not counted: a lockout on this public RPC would only let anyone lock a client out.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use penny_platform::principal::PLATFORM_TENANT_ID;
use penny_platform::signing::TokenGrant;
use penny_platform::{ApiError, PrincipalKind, Reason};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tonic::Code;
use uuid::Uuid;

use crate::error::AuthError;
use crate::service::{Auth, token_hash};
use crate::store::ServiceClient;

/// How long a service token lives; clients fetch a new one before it ends.
pub const SERVICE_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// The longest a service token may be configured to live
/// (`PENNY_AUTH_SERVICE_TOKEN_LIFETIME_SECS`); revocations of service clients are kept
/// longer than this.
pub const MAX_SERVICE_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// One configured client.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSpec {
    /// The client id (UUID).
    pub client_id: Uuid,
    /// For people and logs.
    pub name: String,
    /// SHA-256 of the secret, 64 lowercase hex digits.
    pub secret_sha256: String,
    /// Scopes it may ask for. Must be empty: no service enforces scopes yet, so a client
    /// with scopes would look narrower than it is.
    #[serde(default)]
    pub scopes: Vec<String>,
}

impl ClientSpec {
    fn check(&self) -> Result<(), String> {
        if self.secret_sha256.len() != 64
            || !self
                .secret_sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "client {}: secret_sha256 must be 64 lowercase hex digits",
                self.client_id
            ));
        }
        if self.name.is_empty() || self.name.chars().count() > 128 {
            return Err(format!(
                "client {}: name must be 1..128 characters",
                self.client_id
            ));
        }
        // No service in the fleet restricts a service token by its scopes yet: a client
        // given scopes would look narrower than it is. Refused until they are enforced.
        if !self.scopes.is_empty() {
            return Err(format!(
                "client {}: scopes are not enforced yet, so none may be given",
                self.client_id
            ));
        }
        Ok(())
    }
}

/// A fresh client secret (`psc_` and base64url of 32 random bytes) and its SHA-256, hex:
/// the secret goes to the client, the hash to the clients file.
pub fn new_client_secret() -> (zeroize::Zeroizing<String>, String) {
    use base64::Engine as _;
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    rand::fill(&mut bytes[..]);
    let secret = zeroize::Zeroizing::new(format!(
        "psc_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes[..])
    ));
    let hash = token_hash(&secret);
    (secret, hash)
}

/// Reads and checks a clients file (see `--auth-service-clients-file`).
pub fn read_clients_file(path: &Path) -> anyhow::Result<Vec<ClientSpec>> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "PENNY_AUTH_SERVICE_CLIENTS_FILE: cannot read {}",
            path.display()
        )
    })?;
    let clients: Vec<ClientSpec> = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "PENNY_AUTH_SERVICE_CLIENTS_FILE {}: not a list of clients",
            path.display()
        )
    })?;
    let mut seen = std::collections::HashSet::new();
    for client in &clients {
        client
            .check()
            .map_err(|why| anyhow::anyhow!("PENNY_AUTH_SERVICE_CLIENTS_FILE: {why}"))?;
        if !seen.insert(client.client_id) {
            anyhow::bail!(
                "PENNY_AUTH_SERVICE_CLIENTS_FILE: client {} is listed twice",
                client.client_id
            );
        }
    }
    Ok(clients)
}

fn refused() -> AuthError {
    ApiError::new(
        Code::Unauthenticated,
        Reason::ClientCredentialsInvalid,
        "invalid client credentials",
    )
    .into()
}

/// A service token issued to a client.
#[derive(Debug, Clone)]
pub struct ServiceToken {
    /// The signed JWT.
    pub access_token: String,
    /// When it expires.
    pub expires_at: OffsetDateTime,
    /// The scopes it carries.
    pub scopes: Vec<String>,
}

impl Auth {
    /// Makes the stored clients exactly `specs`. Returns how many were revoked.
    pub async fn provision_service_clients(&self, specs: &[ClientSpec]) -> Result<u32, AuthError> {
        let clients: Vec<ServiceClient> = specs
            .iter()
            .map(|spec| ServiceClient {
                client_id: spec.client_id,
                name: spec.name.clone(),
                secret_hash: spec.secret_sha256.clone(),
                scopes: spec.scopes.clone(),
                revoked_at: None,
            })
            .collect();
        Ok(self
            .store
            .reconcile_service_clients(&clients, OffsetDateTime::now_utc())
            .await?)
    }

    /// Trades client credentials for a service token. An unknown client, a revoked one and
    /// a wrong secret get the same answer; a scope the client may not have is refused.
    pub async fn issue_service_token(
        &self,
        client_id: Uuid,
        secret: &str,
        requested: &[String],
    ) -> Result<ServiceToken, AuthError> {
        let now = OffsetDateTime::now_utc();
        // No lockout: secrets are 256 random bits (guessing is hopeless), and a counter on
        // a public RPC would let anyone who knows a client id lock that client out.
        let client = self.store.service_client(client_id).await?;
        let presented = token_hash(secret);
        // The comparison runs whether or not the client exists, in constant time.
        let expected = client
            .as_ref()
            .map_or_else(|| "0".repeat(64), |c| c.secret_hash.clone());
        let matched: bool = presented.as_bytes().ct_eq(expected.as_bytes()).into();
        let Some(client) = client.filter(|c| c.revoked_at.is_none() && matched) else {
            return Err(refused());
        };
        // Scopes are not enforced anywhere yet, so none is granted (whatever a client was
        // stored with).
        if let Some(scope) = requested.first() {
            return Err(ApiError::permission_denied(format!(
                "scopes are not offered yet; the client may not ask for {scope:?}"
            ))
            .into());
        }
        let scopes: Vec<String> = Vec::new();
        let scope_refs: Vec<&str> = scopes.iter().map(String::as_str).collect();
        let access_token = self
            .keyring
            .current()?
            .mint_scoped(
                &TokenGrant {
                    subject: client.client_id.to_string(),
                    tenant_id: PLATFORM_TENANT_ID,
                    roles: Vec::new(),
                    kind: PrincipalKind::Service,
                    session_id: None,
                    lifetime: self.service_token_lifetime,
                },
                &scope_refs,
            )
            .map_err(|e| AuthError::Internal(e.to_string()))?;
        tracing::info!(client = %client.client_id, name = %client.name, "service token issued");
        Ok(ServiceToken {
            access_token,
            expires_at: now + self.service_token_lifetime,
            scopes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_specs_are_checked() {
        let good = ClientSpec {
            client_id: Uuid::new_v4(),
            name: "audit".into(),
            secret_sha256: "a".repeat(64),
            scopes: vec![],
        };
        assert!(good.check().is_ok());
        let mut bad = good.clone();
        bad.secret_sha256 = "A".repeat(64);
        assert!(bad.check().is_err());
        let mut bad = good.clone();
        bad.scopes = vec!["auth:block-ip".into()];
        assert!(bad.check().is_err(), "scopes are refused until enforced");
        let mut bad = good;
        bad.name = String::new();
        assert!(bad.check().is_err());
    }
}
