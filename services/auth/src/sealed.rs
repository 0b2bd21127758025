//! Secrets auth keeps only sealed: encrypted through KeyService under a tenant's key, with
//! the purpose and the object they belong to bound as context (TOTP secrets, token-signing
//! keys). The auth database never holds them in the clear.

use penny_proto::keys::v1 as keys_pb;
use tonic::Code;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::AuthError;
use crate::service::{Auth, dependency};

impl Auth {
    /// Encrypts `secret` under `tenant`'s key, creating the key on first use (the platform
    /// tenant's, which no tenant saga made).
    pub(crate) async fn seal(
        &self,
        tenant: Uuid,
        purpose: &str,
        object: &str,
        secret: &[u8],
    ) -> Result<String, AuthError> {
        let request = || {
            self.authorizer.service_request(keys_pb::EncryptRequest {
                tenant_id: tenant.to_string(),
                items: vec![keys_pb::EncryptItem {
                    plaintext: secret.to_vec(),
                    context: Some(keys_pb::EncryptionContext {
                        purpose: purpose.into(),
                        object_id: object.into(),
                    }),
                }],
            })
        };
        let mut keys = self.keys.clone();
        let reply = match keys.encrypt(request().await?).await {
            Err(status) if status.code() == Code::NotFound => {
                keys.create_key(
                    self.authorizer
                        .service_request(keys_pb::CreateKeyRequest {
                            tenant_id: tenant.to_string(),
                        })
                        .await?,
                )
                .await
                .map_err(|s| dependency("keys", &s))?;
                keys.encrypt(request().await?).await
            }
            other => other,
        }
        .map_err(|s| dependency("keys", &s))?
        .into_inner();
        match reply.results.into_iter().next().and_then(|r| r.result) {
            Some(keys_pb::encrypt_result::Result::Ciphertext(ciphertext)) => Ok(ciphertext),
            _ => Err(AuthError::Internal(format!(
                "keys did not seal a {purpose} secret"
            ))),
        }
    }

    /// Decrypts what [`Self::seal`] made, with the same purpose and object.
    pub(crate) async fn open(
        &self,
        tenant: Uuid,
        purpose: &str,
        object: &str,
        ciphertext: &str,
    ) -> Result<Zeroizing<Vec<u8>>, AuthError> {
        let reply = self
            .keys
            .clone()
            .decrypt(
                self.authorizer
                    .service_request(keys_pb::DecryptRequest {
                        tenant_id: tenant.to_string(),
                        items: vec![keys_pb::DecryptItem {
                            ciphertext: ciphertext.to_owned(),
                            context: Some(keys_pb::EncryptionContext {
                                purpose: purpose.into(),
                                object_id: object.into(),
                            }),
                        }],
                    })
                    .await?,
            )
            .await
            .map_err(|s| dependency("keys", &s))?
            .into_inner();
        match reply.results.into_iter().next().and_then(|r| r.result) {
            Some(keys_pb::decrypt_result::Result::Plaintext(plaintext)) => {
                Ok(Zeroizing::new(plaintext))
            }
            _ => Err(AuthError::Internal(format!(
                "keys did not open a {purpose} secret"
            ))),
        }
    }
}
