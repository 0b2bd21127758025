//! Contract tests of the Vault transit backend against Vault's documented HTTP API
//! (request and response shapes from the transit and sys/health API docs), served by
//! wiremock. Vault itself cannot be installed on this machine; against a real Vault the
//! conformance suite in `keys.rs` runs instead (`PENNY_TEST_KEYS_BACKEND=vault`).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use penny_keys::domain::{EncryptionContext, KeyConfigChange, Keys, TenantId};
use penny_keys::error::KeysError;
use penny_keys::store::Store;
use penny_keys::vault::{VaultAuth, VaultBackend, VaultSettings};
use penny_tests::TempDir;
use serde_json::{Value, json};
use tonic::Code;
use uuid::Uuid;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};
use zeroize::Zeroizing;

const TOKEN: &str = "hvs.test-token";

struct Contract {
    server: MockServer,
    keys: Keys,
    tenant: TenantId,
    _dir: TempDir,
}

impl Contract {
    async fn start() -> Self {
        let server = MockServer::start().await;
        let (keys, dir) = keys_for(&server.uri()).await;
        Self {
            server,
            keys,
            tenant: TenantId(Uuid::new_v4()),
            _dir: dir,
        }
    }

    fn name(&self) -> String {
        format!("penny-tenant-{}", self.tenant.0)
    }

    fn key_path(&self) -> String {
        format!("/v1/transit/keys/{}", self.name())
    }

    fn context(&self, object: &str) -> EncryptionContext {
        EncryptionContext {
            tenant_id: self.tenant,
            purpose: "file".into(),
            object_id: object.into(),
        }
    }

    /// `GET transit/keys/:name` answers with the key at these versions.
    async fn key_exists(&self, versions: &[u32], min_decryption: u32, deletion_allowed: bool) {
        Mock::given(method("GET"))
            .and(path(self.key_path()))
            .and(header("X-Vault-Token", TOKEN))
            .respond_with(ResponseTemplate::new(200).set_body_json(read_key(
                &self.name(),
                versions,
                min_decryption,
                deletion_allowed,
            )))
            .mount(&self.server)
            .await;
    }
}

async fn keys_for(address: &str) -> (Keys, TempDir) {
    penny_tests::init();
    let dir = TempDir::new("penny-vault");
    let url = penny_platform::db::sqlite_url(dir.path(), "keys");
    let db = penny_platform::db::connect_and_migrate::<penny_keys::migration::Migrator>(&url)
        .await
        .unwrap();
    let store = Store::new(db).await.unwrap();
    let settings = VaultSettings {
        address: address.to_owned(),
        mount: "transit".into(),
        auth: VaultAuth::Token(Zeroizing::new(TOKEN.into())),
        timeout: Duration::from_secs(2),
    };
    let backend = VaultBackend::connect(settings, store).await.unwrap();
    (Keys::new(Arc::new(backend)), dir)
}

/// Vault's response envelope.
fn envelope(data: Value) -> Value {
    json!({
        "request_id": Uuid::new_v4().to_string(),
        "lease_id": "",
        "renewable": false,
        "lease_duration": 0,
        "data": data,
        "wrap_info": null,
        "warnings": null,
        "auth": null
    })
}

/// `GET transit/keys/:name` as documented for a derived aes256-gcm96 key.
fn read_key(name: &str, versions: &[u32], min_decryption: u32, deletion_allowed: bool) -> Value {
    let keys: serde_json::Map<String, Value> = versions
        .iter()
        .map(|v| (v.to_string(), json!(1_700_000_000 + u64::from(*v) * 60)))
        .collect();
    envelope(json!({
        "type": "aes256-gcm96",
        "deletion_allowed": deletion_allowed,
        "derived": true,
        "kdf": "hkdf_sha256",
        "exportable": false,
        "allow_plaintext_backup": false,
        "keys": keys,
        "latest_version": versions.iter().max().copied().unwrap_or(0),
        "min_available_version": 0,
        "min_decryption_version": min_decryption,
        "min_encryption_version": 0,
        "name": name,
        "supports_encryption": true,
        "supports_decryption": true,
        "supports_derivation": true,
        "supports_signing": false,
        "imported": false,
        "auto_rotate_period": 0
    }))
}

fn vault_error(code: u16, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(code).set_body_json(json!({ "errors": [message] }))
}

/// `GET sys/health` as documented: 200 when active and unsealed, 503 when sealed.
fn health(sealed: bool) -> ResponseTemplate {
    ResponseTemplate::new(if sealed { 503 } else { 200 }).set_body_json(json!({
        "initialized": true,
        "sealed": sealed,
        "standby": sealed,
        "performance_standby": false,
        "replication_performance_mode": "disabled",
        "replication_dr_mode": "disabled",
        "server_time_utc": 1_700_000_000,
        "version": "1.18.0",
        "cluster_name": "vault-cluster-3bd69ca2",
        "cluster_id": "00af5aa8-c87d-b5fc-e82e-97cd8dfaf731"
    }))
}

fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

#[tokio::test]
async fn create_key_makes_a_derived_aes256_gcm96_key_only_when_absent() {
    let c = Contract::start().await;
    Mock::given(method("GET"))
        .and(path(c.key_path()))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({ "errors": [] })))
        .up_to_n_times(1)
        .mount(&c.server)
        .await;
    Mock::given(method("POST"))
        .and(path(c.key_path()))
        .and(header("X-Vault-Token", TOKEN))
        .and(body_partial_json(
            json!({ "type": "aes256-gcm96", "derived": true }),
        ))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&c.server)
        .await;
    c.key_exists(&[1], 1, false).await;

    let (info, created) = c.keys.create_key(c.tenant).await.unwrap();
    assert!(created);
    assert_eq!(info.latest_version, 1);
    assert_eq!(info.min_decryption_version, 1);
    // Idempotent: the key now exists, so no second POST (expect(1) is checked on drop).
    let (_, created) = c.keys.create_key(c.tenant).await.unwrap();
    assert!(!created);
}

#[tokio::test]
async fn generate_data_key_sends_the_context_and_size() {
    let c = Contract::start().await;
    c.key_exists(&[1, 2, 3], 1, false).await;
    let context = c.context("file-9");
    let plaintext = [7u8; 64];
    Mock::given(method("POST"))
        .and(path(format!("/v1/transit/datakey/plaintext/{}", c.name())))
        .and(body_partial_json(
            json!({ "context": b64(&context.encode()), "bits": 512 }),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(envelope(json!({
            "plaintext": b64(&plaintext),
            "ciphertext": "vault:v3:c29tZSB3cmFwcGVkIGtleQ==",
            "key_version": 3
        }))))
        .expect(1)
        .mount(&c.server)
        .await;
    let key = c.keys.generate_data_key(&context, 512).await.unwrap();
    assert_eq!(key.plaintext.as_slice(), plaintext);
    assert_eq!(key.wrapped, "vault:v3:c29tZSB3cmFwcGVkIGtleQ==");
    assert_eq!(key.version, 3);
}

#[tokio::test]
async fn encrypt_uses_batch_input_with_a_context_per_item() {
    let c = Contract::start().await;
    c.key_exists(&[1], 1, false).await;
    let (a, b) = (c.context("a"), c.context("b"));
    Mock::given(method("POST"))
        .and(path(format!("/v1/transit/encrypt/{}", c.name())))
        .and(body_partial_json(json!({
            "batch_input": [
                { "plaintext": b64(b"one"), "context": b64(&a.encode()) },
                { "plaintext": b64(b"two"), "context": b64(&b.encode()) }
            ],
            "partial_failure_response_code": 200
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(envelope(json!({
            "batch_results": [
                { "ciphertext": "vault:v1:b25l", "key_version": 1 },
                { "ciphertext": "vault:v1:dHdv", "key_version": 1 }
            ]
        }))))
        .expect(1)
        .mount(&c.server)
        .await;
    let sealed = c
        .keys
        .encrypt(
            c.tenant,
            vec![
                (Zeroizing::new(b"one".to_vec()), a),
                (Zeroizing::new(b"two".to_vec()), b),
            ],
        )
        .await
        .unwrap();
    let sealed: Vec<_> = sealed.into_iter().map(Result::unwrap).collect();
    assert_eq!(sealed[0].ciphertext, "vault:v1:b25l");
    assert_eq!(sealed[1].version, 1);
}

#[tokio::test]
async fn decrypt_maps_per_item_errors_and_never_sends_foreign_ciphertexts() {
    let c = Contract::start().await;
    c.key_exists(&[1, 2], 2, false).await;
    let ctx = c.context("a");
    // Only the two vault: items reach Vault.
    Mock::given(method("POST"))
        .and(path(format!("/v1/transit/decrypt/{}", c.name())))
        .and(body_partial_json(json!({
            "batch_input": [
                { "ciphertext": "vault:v2:Z29vZA==", "context": b64(&ctx.encode()) },
                { "ciphertext": "vault:v2:YmFk", "context": b64(&ctx.encode()) },
                { "ciphertext": "vault:v1:b2xk", "context": b64(&ctx.encode()) }
            ]
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(envelope(json!({
            "batch_results": [
                { "plaintext": b64(b"good") },
                { "error": "cipher: message authentication failed" },
                { "error": "ciphertext or signature version is disallowed by policy (too old)" }
            ]
        }))))
        .expect(1)
        .mount(&c.server)
        .await;
    let results = c
        .keys
        .decrypt(
            c.tenant,
            vec![
                ("vault:v2:Z29vZA==".into(), ctx.clone()),
                ("penny:v1:AAAA".into(), ctx.clone()),
                ("vault:v2:YmFk".into(), ctx.clone()),
                ("vault:v1:b2xk".into(), ctx.clone()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(results[0].as_ref().unwrap().as_slice(), b"good");
    assert!(matches!(results[1], Err(KeysError::WrongEngine)));
    assert!(matches!(results[2], Err(KeysError::DecryptionFailed)));
    assert!(matches!(results[3], Err(KeysError::VersionBelowMinimum(1))));
}

#[tokio::test]
async fn a_batch_where_every_item_failed_is_reported_per_item() {
    let c = Contract::start().await;
    c.key_exists(&[1], 1, false).await;
    Mock::given(method("POST"))
        .and(path(format!("/v1/transit/decrypt/{}", c.name())))
        .respond_with(vault_error(400, "cipher: message authentication failed"))
        .mount(&c.server)
        .await;
    let ctx = c.context("a");
    let results = c
        .keys
        .decrypt(
            c.tenant,
            vec![
                ("vault:v1:YQ==".into(), ctx.clone()),
                ("vault:v1:Yg==".into(), ctx),
            ],
        )
        .await
        .unwrap();
    assert_eq!(results.len(), 2);
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(KeysError::DecryptionFailed)))
    );
}

#[tokio::test]
async fn rewrap_uses_batch_input() {
    let c = Contract::start().await;
    c.key_exists(&[1, 2], 1, false).await;
    let ctx = c.context("a");
    Mock::given(method("POST"))
        .and(path(format!("/v1/transit/rewrap/{}", c.name())))
        .and(body_partial_json(json!({
            "batch_input": [{ "ciphertext": "vault:v1:b2xk", "context": b64(&ctx.encode()) }]
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(envelope(json!({
            "batch_results": [{ "ciphertext": "vault:v2:bmV3", "key_version": 2 }]
        }))))
        .expect(1)
        .mount(&c.server)
        .await;
    let results = c
        .keys
        .rewrap(c.tenant, vec![("vault:v1:b2xk".into(), ctx)])
        .await
        .unwrap();
    let sealed = results[0].as_ref().unwrap();
    assert_eq!(sealed.ciphertext, "vault:v2:bmV3");
    assert_eq!(sealed.version, 2);
}

#[tokio::test]
async fn rotate_and_config_call_the_documented_endpoints() {
    let c = Contract::start().await;
    c.key_exists(&[1, 2], 1, false).await;
    Mock::given(method("POST"))
        .and(path(format!("{}/rotate", c.key_path())))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&c.server)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("{}/config", c.key_path())))
        .and(body_partial_json(
            json!({ "min_decryption_version": 2, "deletion_allowed": true }),
        ))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&c.server)
        .await;
    let info = c.keys.rotate_key(c.tenant).await.unwrap();
    assert_eq!(info.latest_version, 2);
    c.keys
        .update_key_config(
            c.tenant,
            KeyConfigChange {
                min_decryption_version: Some(2),
                deletion_allowed: Some(true),
            },
        )
        .await
        .unwrap();
    // A minimum above the latest version never reaches Vault.
    let err = c
        .keys
        .update_key_config(
            c.tenant,
            KeyConfigChange {
                min_decryption_version: Some(9),
                deletion_allowed: None,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        KeysError::InvalidConfig("min_decryption_version", _)
    ));
}

#[tokio::test]
async fn delete_is_refused_unless_allowed_and_then_deletes() {
    let refused = Contract::start().await;
    refused.key_exists(&[1], 1, false).await;
    Mock::given(method("DELETE"))
        .and(path(refused.key_path()))
        .respond_with(ResponseTemplate::new(204))
        .expect(0)
        .mount(&refused.server)
        .await;
    assert!(matches!(
        refused.keys.delete_key(refused.tenant).await,
        Err(KeysError::DeletionNotAllowed)
    ));

    let allowed = Contract::start().await;
    allowed.key_exists(&[1], 1, true).await;
    Mock::given(method("DELETE"))
        .and(path(allowed.key_path()))
        .and(header("X-Vault-Token", TOKEN))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&allowed.server)
        .await;
    allowed.keys.delete_key(allowed.tenant).await.unwrap();
}

#[tokio::test]
async fn a_sealed_vault_is_unavailable_and_not_ready() {
    let c = Contract::start().await;
    Mock::given(method("GET"))
        .and(path(c.key_path()))
        .respond_with(vault_error(503, "Vault is sealed"))
        .mount(&c.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/sys/health"))
        .respond_with(health(true))
        .mount(&c.server)
        .await;
    let err = c.keys.get_key(c.tenant).await.unwrap_err();
    assert!(matches!(err, KeysError::BackendUnavailable(_)), "{err:?}");
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), Code::Unavailable);
    assert!(!c.keys.ready().await);
}

#[tokio::test]
async fn an_unsealed_vault_is_ready() {
    let c = Contract::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/sys/health"))
        .respond_with(health(false))
        .mount(&c.server)
        .await;
    assert!(c.keys.ready().await);
}

#[tokio::test]
async fn permission_denied_is_refused_without_leaking_vault_text() {
    let c = Contract::start().await;
    Mock::given(method("GET"))
        .and(path(c.key_path()))
        .respond_with(vault_error(
            403,
            "1 error occurred:\n\t* permission denied\n\n",
        ))
        .mount(&c.server)
        .await;
    let err = c.keys.get_key(c.tenant).await.unwrap_err();
    assert!(matches!(err, KeysError::BackendRefused(_)), "{err:?}");
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(!status.message().contains("permission denied"));
    // An unsealed Vault that refuses our token is not a ready dependency.
    Mock::given(method("GET"))
        .and(path("/v1/sys/health"))
        .respond_with(health(false))
        .mount(&c.server)
        .await;
    assert!(!c.keys.ready().await);
}

#[tokio::test]
async fn an_unknown_key_is_not_found_and_never_upserted_by_encrypt() {
    let c = Contract::start().await;
    Mock::given(method("GET"))
        .and(path(c.key_path()))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({ "errors": [] })))
        .mount(&c.server)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("/v1/transit/encrypt/{}", c.name())))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&c.server)
        .await;
    let err = c
        .keys
        .encrypt(
            c.tenant,
            vec![(Zeroizing::new(b"x".to_vec()), c.context("a"))],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, KeysError::KeyNotFound), "{err:?}");
    assert_eq!(tonic::Status::from(err).code(), Code::NotFound);
}

#[tokio::test]
async fn an_unreachable_vault_is_unavailable() {
    // Nothing listens on port 1 of the loopback address.
    let (keys, _dir) = keys_for("http://127.0.0.1:1").await;
    let err = keys.get_key(TenantId(Uuid::new_v4())).await.unwrap_err();
    assert!(matches!(err, KeysError::BackendUnavailable(_)), "{err:?}");
    assert!(!keys.ready().await);
}

#[tokio::test]
async fn kubernetes_auth_logs_in_and_uses_the_issued_token() {
    penny_tests::init();
    let server = MockServer::start().await;
    let dir = TempDir::new("penny-vault-k8s");
    let jwt_path = dir.path().join("token");
    std::fs::write(&jwt_path, "eyJhbGciOiJSUzI1NiJ9.service-account.sig\n").unwrap();
    Mock::given(method("POST"))
        .and(path("/v1/auth/kubernetes/login"))
        .and(body_partial_json(json!({
            "role": "penny-keys",
            "jwt": "eyJhbGciOiJSUzI1NiJ9.service-account.sig"
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "request_id": Uuid::new_v4().to_string(),
            "lease_id": "",
            "renewable": false,
            "lease_duration": 0,
            "data": null,
            "wrap_info": null,
            "warnings": null,
            "auth": {
                "client_token": "hvs.issued-by-kubernetes-login",
                "accessor": "accessor-1",
                "policies": ["default", "penny-keys"],
                "token_policies": ["default", "penny-keys"],
                "metadata": { "role": "penny-keys", "service_account_name": "penny" },
                "lease_duration": 3600,
                "renewable": true,
                "entity_id": "entity-1",
                "token_type": "service",
                "orphan": true
            }
        })))
        .expect(1)
        .mount(&server)
        .await;
    let tenant = TenantId(Uuid::new_v4());
    let name = format!("penny-tenant-{}", tenant.0);
    Mock::given(method("GET"))
        .and(path(format!("/v1/transit/keys/{name}")))
        .and(header("X-Vault-Token", "hvs.issued-by-kubernetes-login"))
        .respond_with(ResponseTemplate::new(200).set_body_json(read_key(&name, &[1], 1, false)))
        .expect(1)
        .mount(&server)
        .await;

    let url = penny_platform::db::sqlite_url(dir.path(), "keys");
    let db = penny_platform::db::connect_and_migrate::<penny_keys::migration::Migrator>(&url)
        .await
        .unwrap();
    let settings = VaultSettings {
        address: server.uri(),
        mount: "transit".into(),
        auth: VaultAuth::Kubernetes {
            mount: "kubernetes".into(),
            role: "penny-keys".into(),
            jwt_path,
        },
        timeout: Duration::from_secs(2),
    };
    let backend = VaultBackend::connect(settings, Store::new(db).await.unwrap())
        .await
        .unwrap();
    let info = Keys::new(Arc::new(backend)).get_key(tenant).await.unwrap();
    assert_eq!(info.latest_version, 1);
}
