//! KeyService conformance: the same suite on the local engine (SQLite or PostgreSQL) and,
//! with `PENNY_TEST_KEYS_BACKEND=vault`, on a real Vault.

use std::collections::HashSet;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use penny_proto::common::v1::{BatchItemError, ErrorReason};
use penny_proto::keys::v1 as pb;
use penny_proto::keys::v1::key_service_client::KeyServiceClient;
use penny_tests::{
    TestFleet, assert_eventually, error_reason as status_reason, keys_on_vault, with_token,
};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;
use uuid::Uuid;

struct Harness {
    fleet: TestFleet,
    client: KeyServiceClient<Channel>,
    service: String,
    admin: String,
}

impl Harness {
    async fn start() -> Self {
        let fleet = TestFleet::builder().with_keys().start().await;
        let client = KeyServiceClient::new(fleet.keys().server.channel().await)
            .max_decoding_message_size(64 * 1024 * 1024);
        let service = fleet.service_token();
        let admin = fleet.admin_token();
        Self {
            fleet,
            client,
            service,
            admin,
        }
    }

    async fn new_tenant(&mut self) -> String {
        let tenant = Uuid::new_v4().to_string();
        let reply = self
            .client
            .create_key(with_token(
                pb::CreateKeyRequest {
                    tenant_id: tenant.clone(),
                },
                &self.service,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(reply.created);
        tenant
    }

    async fn encrypt(
        &mut self,
        tenant: &str,
        items: Vec<(Vec<u8>, pb::EncryptionContext)>,
    ) -> Vec<pb::EncryptResult> {
        self.client
            .encrypt(with_token(
                pb::EncryptRequest {
                    tenant_id: tenant.to_owned(),
                    items: items
                        .into_iter()
                        .map(|(plaintext, context)| pb::EncryptItem {
                            plaintext,
                            context: Some(context),
                        })
                        .collect(),
                },
                &self.service,
            ))
            .await
            .unwrap()
            .into_inner()
            .results
    }

    async fn encrypt_one(
        &mut self,
        tenant: &str,
        plaintext: &[u8],
        context: pb::EncryptionContext,
    ) -> String {
        let results = self
            .encrypt(tenant, vec![(plaintext.to_vec(), context)])
            .await;
        ciphertext_of(&results[0])
    }

    async fn decrypt(
        &mut self,
        tenant: &str,
        items: Vec<(String, pb::EncryptionContext)>,
    ) -> Vec<Result<Vec<u8>, BatchItemError>> {
        self.client
            .decrypt(with_token(
                pb::DecryptRequest {
                    tenant_id: tenant.to_owned(),
                    items: items
                        .into_iter()
                        .map(|(ciphertext, context)| pb::DecryptItem {
                            ciphertext,
                            context: Some(context),
                        })
                        .collect(),
                },
                &self.service,
            ))
            .await
            .unwrap()
            .into_inner()
            .results
            .into_iter()
            .map(|r| match r.result {
                Some(pb::decrypt_result::Result::Plaintext(p)) => Ok(p),
                Some(pb::decrypt_result::Result::Error(e)) => Err(e),
                None => panic!("empty decrypt result"),
            })
            .collect()
    }

    async fn decrypt_one(
        &mut self,
        tenant: &str,
        ciphertext: &str,
        context: pb::EncryptionContext,
    ) -> Result<Vec<u8>, BatchItemError> {
        self.decrypt(tenant, vec![(ciphertext.to_owned(), context)])
            .await
            .remove(0)
    }

    async fn update(
        &mut self,
        tenant: &str,
        min: Option<u32>,
        deletion: Option<bool>,
    ) -> Result<pb::Key, tonic::Status> {
        self.client
            .update_key_config(with_token(
                pb::UpdateKeyConfigRequest {
                    tenant_id: tenant.to_owned(),
                    min_decryption_version: min,
                    deletion_allowed: deletion,
                },
                &self.admin,
            ))
            .await
            .map(|r| r.into_inner().key.unwrap())
    }
}

fn ctx(purpose: &str, object: &str) -> pb::EncryptionContext {
    pb::EncryptionContext {
        purpose: purpose.into(),
        object_id: object.into(),
    }
}

fn ciphertext_of(result: &pb::EncryptResult) -> String {
    match &result.result {
        Some(pb::encrypt_result::Result::Ciphertext(c)) => c.clone(),
        other => panic!("encryption failed: {other:?}"),
    }
}

fn prefix() -> &'static str {
    if keys_on_vault() { "vault:" } else { "penny:" }
}

fn reason(error: &BatchItemError) -> ErrorReason {
    ErrorReason::try_from(error.reason).unwrap()
}

fn fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn create_key_is_idempotent_and_get_key_describes_it() {
    let mut h = Harness::start().await;
    let tenant = h.new_tenant().await;
    let again = h
        .client
        .create_key(with_token(
            pb::CreateKeyRequest {
                tenant_id: tenant.clone(),
            },
            &h.service,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    let key = h
        .client
        .get_key(with_token(
            pb::GetKeyRequest {
                tenant_id: tenant.clone(),
            },
            &h.service,
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(key.tenant_id, tenant);
    assert_eq!(key.name, format!("penny-tenant-{tenant}"));
    assert_eq!(key.latest_version, 1);
    assert_eq!(key.min_decryption_version, 1);
    assert_eq!(key.versions.len(), 1);
    assert!(key.versions[0].create_time.is_some());
    assert!(!key.deletion_allowed);
    let expected = if keys_on_vault() {
        pb::KeyBackend::Vault
    } else {
        pb::KeyBackend::Local
    };
    assert_eq!(key.backend, expected as i32);
}

#[tokio::test]
async fn round_trips_and_data_keys_unwrap() {
    let mut h = Harness::start().await;
    let tenant = h.new_tenant().await;
    let items: Vec<_> = (0..20)
        .map(|i| {
            (
                format!("secret number {i}").into_bytes(),
                ctx("mfa", &format!("user-{i}")),
            )
        })
        .collect();
    let sealed = h.encrypt(&tenant, items.clone()).await;
    assert_eq!(sealed.len(), 20);
    let to_open: Vec<_> = sealed
        .iter()
        .zip(&items)
        .map(|(s, (_, c))| {
            let ciphertext = ciphertext_of(s);
            assert!(
                ciphertext.starts_with(&format!("{}v1:", prefix())),
                "{ciphertext}"
            );
            assert_eq!(s.key_version, 1);
            (ciphertext, c.clone())
        })
        .collect();
    let opened = h.decrypt(&tenant, to_open).await;
    for (opened, (plaintext, _)) in opened.into_iter().zip(items) {
        assert_eq!(opened.unwrap(), plaintext);
    }
    // Empty plaintext round-trips too.
    let empty = h.encrypt_one(&tenant, b"", ctx("mfa", "empty")).await;
    assert_eq!(
        h.decrypt_one(&tenant, &empty, ctx("mfa", "empty"))
            .await
            .unwrap(),
        b""
    );

    for (bits, len) in [(0, 32), (128, 16), (256, 32), (512, 64)] {
        let key = h
            .client
            .generate_data_key(with_token(
                pb::GenerateDataKeyRequest {
                    tenant_id: tenant.clone(),
                    context: Some(ctx("file", "file-1")),
                    key_bits: bits,
                },
                &h.service,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(key.plaintext_key.len(), len);
        assert_eq!(key.key_version, 1);
        let unwrapped = h
            .decrypt_one(&tenant, &key.wrapped_key, ctx("file", "file-1"))
            .await
            .unwrap();
        assert_eq!(unwrapped, key.plaintext_key);
    }
}

#[tokio::test]
async fn one_flipped_byte_anywhere_fails() {
    let mut h = Harness::start().await;
    let tenant = h.new_tenant().await;
    let context = ctx("file", "object-7");
    let ciphertext = h
        .encrypt_one(
            &tenant,
            b"thirty-two bytes of plaintext!!!",
            context.clone(),
        )
        .await;
    let (head, body) = ciphertext.rsplit_once(':').unwrap();
    let raw = STANDARD.decode(body).unwrap();
    let mut tampered = Vec::new();
    // Every byte of the decoded body: nonce, ciphertext and tag.
    for i in 0..raw.len() {
        let mut bytes = raw.clone();
        bytes[i] ^= 0x01;
        tampered.push(format!("{head}:{}", STANDARD.encode(&bytes)));
    }
    // Every character of the whole string, prefix and version included.
    for i in 0..ciphertext.len() {
        let mut chars: Vec<u8> = ciphertext.clone().into_bytes();
        chars[i] ^= 0x01;
        if let Ok(text) = String::from_utf8(chars)
            && text != ciphertext
        {
            tampered.push(text);
        }
    }
    // Truncations.
    for cut in [1, 4, 8, 16, 24] {
        let mut bytes = raw.clone();
        bytes.truncate(raw.len().saturating_sub(cut));
        tampered.push(format!("{head}:{}", STANDARD.encode(&bytes)));
    }
    let count = tampered.len();
    assert!(count > 100);
    let results = h
        .decrypt(
            &tenant,
            tampered.into_iter().map(|t| (t, context.clone())).collect(),
        )
        .await;
    assert_eq!(results.len(), count);
    for (i, result) in results.iter().enumerate() {
        assert!(result.is_err(), "tampered ciphertext {i} decrypted");
    }
    // The original still decrypts.
    assert!(h.decrypt_one(&tenant, &ciphertext, context).await.is_ok());
}

#[tokio::test]
async fn ten_thousand_encryptions_of_one_plaintext_are_distinct() {
    let mut h = Harness::start().await;
    let tenant = h.new_tenant().await;
    let mut seen = HashSet::new();
    for _batch in 0..10 {
        let items = (0..1000)
            .map(|_| (b"same plaintext".to_vec(), ctx("mfa", "user-1")))
            .collect();
        for result in h.encrypt(&tenant, items).await {
            seen.insert(ciphertext_of(&result));
        }
    }
    assert_eq!(seen.len(), 10_000);
}

#[tokio::test]
async fn rotation_rewrap_and_minimum_decryption_version() {
    let mut h = Harness::start().await;
    let tenant = h.new_tenant().await;
    let context = ctx("file", "f-1");
    let old = h
        .encrypt_one(&tenant, b"before rotation", context.clone())
        .await;

    // Rotation is for platform staff, not services.
    let denied = h
        .client
        .rotate_key(with_token(
            pb::RotateKeyRequest {
                tenant_id: tenant.clone(),
            },
            &h.service,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let key = h
        .client
        .rotate_key(with_token(
            pb::RotateKeyRequest {
                tenant_id: tenant.clone(),
            },
            &h.admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(key.latest_version, 2);
    assert_eq!(key.versions.len(), 2);

    assert_eq!(
        h.decrypt_one(&tenant, &old, context.clone()).await.unwrap(),
        b"before rotation"
    );
    let new = h
        .encrypt_one(&tenant, b"after rotation", context.clone())
        .await;
    assert!(new.starts_with(&format!("{}v2:", prefix())), "{new}");

    let rewrapped = h
        .client
        .rewrap(with_token(
            pb::RewrapRequest {
                tenant_id: tenant.clone(),
                items: vec![pb::RewrapItem {
                    ciphertext: old.clone(),
                    context: Some(context.clone()),
                }],
            },
            &h.service,
        ))
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    assert_eq!(rewrapped.key_version, 2);
    let Some(pb::rewrap_result::Result::Ciphertext(rewrapped)) = rewrapped.result else {
        panic!("rewrap failed");
    };
    assert!(rewrapped.starts_with(&format!("{}v2:", prefix())));

    // Minimum: 0 and above latest are refused; raising to 2 retires v1.
    let status = h.update(&tenant, Some(3), None).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(fields(&status), ["min_decryption_version"]);
    let key = h.update(&tenant, Some(2), None).await.unwrap();
    assert_eq!(key.min_decryption_version, 2);

    let refused = h
        .decrypt_one(&tenant, &old, context.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code, Code::FailedPrecondition as i32);
    assert_eq!(reason(&refused), ErrorReason::KeyVersionBelowMinimum);
    assert_eq!(
        h.decrypt_one(&tenant, &rewrapped, context.clone())
            .await
            .unwrap(),
        b"before rotation"
    );
    assert_eq!(
        h.decrypt_one(&tenant, &new, context.clone()).await.unwrap(),
        b"after rotation"
    );
    // Lowering the minimum again is refused: retired versions stay retired.
    assert_eq!(
        h.update(&tenant, Some(1), None).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn delete_key_crypto_shreds() {
    let mut h = Harness::start().await;
    let tenant = h.new_tenant().await;
    let context = ctx("file", "f-1");
    let ciphertext = h
        .encrypt_one(&tenant, b"to be shredded", context.clone())
        .await;

    let (admin, service) = (h.admin.clone(), h.service.clone());
    let delete = |token: String| {
        let tenant = tenant.clone();
        let mut client = h.client.clone();
        async move {
            client
                .delete_key(with_token(
                    pb::DeleteKeyRequest { tenant_id: tenant },
                    &token,
                ))
                .await
        }
    };
    let status = delete(admin.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status_reason(&status), "KEY_DELETION_NOT_ALLOWED");
    let mut client = h.client.clone();
    let allow = client.update_key_config(with_token(
        pb::UpdateKeyConfigRequest {
            tenant_id: tenant.clone(),
            min_decryption_version: None,
            deletion_allowed: Some(true),
        },
        &admin,
    ));
    assert!(
        allow
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap()
            .deletion_allowed
    );
    assert_eq!(
        delete(service).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    delete(admin).await.unwrap();

    let status = h
        .client
        .decrypt(with_token(
            pb::DecryptRequest {
                tenant_id: tenant.clone(),
                items: vec![pb::DecryptItem {
                    ciphertext,
                    context: Some(context),
                }],
            },
            &h.service,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status_reason(&status), "KEY_NOT_FOUND");
    let status = h
        .client
        .get_key(with_token(
            pb::GetKeyRequest { tenant_id: tenant },
            &h.service,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn cross_tenant_and_cross_context_fail_like_tampering() {
    let mut h = Harness::start().await;
    let tenant_a = h.new_tenant().await;
    let tenant_b = h.new_tenant().await;
    let context = ctx("file", "f-1");
    let ciphertext = h
        .encrypt_one(&tenant_a, b"tenant a's secret", context.clone())
        .await;
    let (head, body) = ciphertext.rsplit_once(':').unwrap();
    let mut raw = STANDARD.decode(body).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 0x80;
    let tampered = format!("{head}:{}", STANDARD.encode(&raw));

    let failures = [
        h.decrypt_one(&tenant_b, &ciphertext, context.clone())
            .await
            .unwrap_err(),
        h.decrypt_one(&tenant_a, &ciphertext, ctx("file", "f-2"))
            .await
            .unwrap_err(),
        h.decrypt_one(&tenant_a, &ciphertext, ctx("mfa", "f-1"))
            .await
            .unwrap_err(),
        h.decrypt_one(&tenant_a, &tampered, context.clone())
            .await
            .unwrap_err(),
    ];
    for failure in &failures {
        assert_eq!(
            failure, &failures[3],
            "a context failure is distinguishable from tampering"
        );
        assert_eq!(reason(failure), ErrorReason::DecryptionFailed);
    }
}

#[tokio::test]
async fn bad_input_gets_precise_statuses() {
    let mut h = Harness::start().await;
    let tenant = h.new_tenant().await;
    let context = ctx("file", "f-1");
    let good = h.encrypt_one(&tenant, b"x", context.clone()).await;
    let (_, body) = good.rsplit_once(':').unwrap();
    let other_engine = if keys_on_vault() { "penny" } else { "vault" };

    // Per-item ciphertext problems.
    let cases = [
        ("garbage".to_owned(), ErrorReason::CiphertextMalformed),
        (
            format!("{other_engine}:v1:{body}"),
            ErrorReason::CiphertextMalformed,
        ),
        (
            format!("{}v1:!!notbase64", prefix()),
            ErrorReason::CiphertextMalformed,
        ),
        (
            format!("{}v0:{body}", prefix()),
            ErrorReason::CiphertextMalformed,
        ),
        (
            format!("{}v9:{body}", prefix()),
            ErrorReason::KeyVersionNotFound,
        ),
        (
            format!("{}v1:AAAA", prefix()),
            ErrorReason::DecryptionFailed,
        ),
    ];
    let results = h
        .decrypt(
            &tenant,
            cases
                .iter()
                .map(|(c, _)| (c.clone(), context.clone()))
                .collect(),
        )
        .await;
    for ((ciphertext, expected), result) in cases.iter().zip(results) {
        let error = result.expect_err(ciphertext);
        assert_eq!(reason(&error), *expected, "{ciphertext}");
        assert!(
            !error.message.contains(body),
            "message echoes the ciphertext"
        );
    }

    // Whole-request problems list every bad field.
    let status = h
        .client
        .decrypt(with_token(
            pb::DecryptRequest {
                tenant_id: "not-a-uuid".into(),
                items: vec![
                    pb::DecryptItem {
                        ciphertext: good.clone(),
                        context: None,
                    },
                    pb::DecryptItem {
                        ciphertext: String::new(),
                        context: Some(ctx("", &"o".repeat(300))),
                    },
                    pb::DecryptItem {
                        ciphertext: good.clone(),
                        context: Some(ctx("UPPER case", "ok")),
                    },
                ],
            },
            &h.service,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        fields(&status),
        [
            "tenant_id",
            "items[0].context",
            "items[1].ciphertext",
            "items[1].context.purpose",
            "items[1].context.object_id",
            "items[2].context.purpose",
        ]
    );

    // Batches over 1000 and empty batches.
    for count in [0usize, 1001] {
        let items = (0..count)
            .map(|_| (b"x".to_vec(), context.clone()))
            .collect::<Vec<_>>();
        let status = h
            .client
            .encrypt(with_token(
                pb::EncryptRequest {
                    tenant_id: tenant.clone(),
                    items: items
                        .into_iter()
                        .map(|(plaintext, c)| pb::EncryptItem {
                            plaintext,
                            context: Some(c),
                        })
                        .collect(),
                },
                &h.service,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{count} items");
        assert_eq!(fields(&status), ["items"]);
        let expected = if count > 1000 {
            "BATCH_TOO_LARGE"
        } else {
            "INVALID_ARGUMENT"
        };
        assert_eq!(status_reason(&status), expected);
    }

    // Unknown tenant key.
    let status = h
        .client
        .generate_data_key(with_token(
            pb::GenerateDataKeyRequest {
                tenant_id: Uuid::new_v4().to_string(),
                context: Some(context.clone()),
                key_bits: 0,
            },
            &h.service,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status_reason(&status), "KEY_NOT_FOUND");

    // Bad key size.
    let status = h
        .client
        .generate_data_key(with_token(
            pb::GenerateDataKeyRequest {
                tenant_id: tenant.clone(),
                context: Some(context),
                key_bits: 100,
            },
            &h.service,
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&status), ["key_bits"]);
}

#[tokio::test]
async fn only_services_and_platform_staff_may_call() {
    let h = Harness::start().await;
    let tenant = Uuid::new_v4();
    let mut client = h.client.clone();
    let request = || pb::CreateKeyRequest {
        tenant_id: tenant.to_string(),
    };
    for token in [
        h.fleet.user_token(tenant, &["owner"]),
        h.fleet.user_token(tenant, &["admin"]),
        h.fleet.user_token(tenant, &["viewer"]),
    ] {
        let status = client
            .create_key(with_token(request(), &token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    let status = client
        .create_key(tonic::Request::new(request()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    client
        .create_key(with_token(request(), &h.admin))
        .await
        .unwrap();
}

#[tokio::test]
async fn list_keys_pages_through_every_key() {
    let mut h = Harness::start().await;
    let mut created = HashSet::new();
    for _ in 0..7 {
        created.insert(h.new_tenant().await);
    }
    let mut listed = HashSet::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let reply = h
            .client
            .list_keys(with_token(
                pb::ListKeysRequest {
                    page_size: 3,
                    page_token: token.clone(),
                },
                &h.admin,
            ))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(reply.keys.len() <= 3);
        listed.extend(reply.keys.into_iter().map(|k| k.tenant_id));
        if reply.next_page_token.is_empty() {
            break;
        }
        token = reply.next_page_token;
    }
    assert!(pages >= 3);
    assert!(created.is_subset(&listed));
    let status = h
        .client
        .list_keys(with_token(
            pb::ListKeysRequest {
                page_size: 3,
                page_token: "bogus!".into(),
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status_reason(&status), "PAGE_TOKEN_INVALID");
    // Listing every tenant's key is for platform staff only.
    let status = h
        .client
        .list_keys(with_token(pb::ListKeysRequest::default(), &h.service))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

/// The keys database never holds a plaintext key: not the data keys handed out, not the
/// version keys, not the master key. Local engine only (Vault keeps its own material).
#[tokio::test]
async fn the_keys_database_never_contains_a_plaintext_key() {
    use sea_orm::{ConnectionTrait, Statement};
    let mut h = Harness::start().await;
    let tenant = h.new_tenant().await;
    if keys_on_vault() {
        // Vault holds the key material: the database mirrors metadata only, so every
        // wrapped_key is empty.
        let db = penny_platform::db::connect(&h.fleet.keys().database_url)
            .await
            .unwrap();
        let rows = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT wrapped_key FROM key_versions",
            ))
            .await
            .unwrap();
        assert!(!rows.is_empty());
        for row in rows {
            assert!(row.try_get_by_index::<Vec<u8>>(0).unwrap().is_empty());
        }
        return;
    }
    h.client
        .rotate_key(with_token(
            pb::RotateKeyRequest {
                tenant_id: tenant.clone(),
            },
            &h.admin,
        ))
        .await
        .unwrap();
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    for i in 0..20 {
        let key = h
            .client
            .generate_data_key(with_token(
                pb::GenerateDataKeyRequest {
                    tenant_id: tenant.clone(),
                    context: Some(ctx("file", &format!("f-{i}"))),
                    key_bits: 256,
                },
                &h.service,
            ))
            .await
            .unwrap()
            .into_inner();
        secrets.push(key.plaintext_key);
    }
    let master_hex = h.fleet.keys().master_key_hex.clone().unwrap();
    let master = penny_keys::local::MasterKey::parse(&master_hex).unwrap();
    secrets.push(master_hex.clone().into_bytes());

    // The stored version keys unwrap (so they are wrapped), and their plaintext is a secret
    // to search for.
    let db = penny_platform::db::connect(&h.fleet.keys().database_url)
        .await
        .unwrap();
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT tenant_id, version, wrapped_key FROM key_versions",
        ))
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let mut all_bytes: Vec<u8> = Vec::new();
    for row in &rows {
        let tenant_id: Uuid = row.try_get_by_index(0).unwrap();
        let version: i32 = row.try_get_by_index(1).unwrap();
        let wrapped: Vec<u8> = row.try_get_by_index(2).unwrap();
        let plaintext = penny_keys::local::unwrap_version_key(
            &master,
            penny_keys::domain::TenantId(tenant_id),
            u32::try_from(version).unwrap(),
            &wrapped,
        )
        .unwrap();
        assert_eq!(plaintext.len(), 32);
        secrets.push(plaintext.to_vec());
        all_bytes.extend_from_slice(&wrapped);
    }

    // Everything the database holds, as it holds it.
    if h.fleet.keys().database_url.starts_with("sqlite:") {
        let path = h
            .fleet
            .keys()
            .database_url
            .trim_start_matches("sqlite://")
            .split('?')
            .next()
            .unwrap()
            .to_owned();
        for suffix in ["", "-wal"] {
            if let Ok(bytes) = std::fs::read(format!("{path}{suffix}")) {
                all_bytes.extend_from_slice(&bytes);
            }
        }
    } else {
        for table in ["keyrings", "key_versions"] {
            let rows = db
                .query_all_raw(Statement::from_string(
                    backend,
                    format!("SELECT t::text FROM {table} t"),
                ))
                .await
                .unwrap();
            for row in rows {
                let text: String = row.try_get_by_index(0).unwrap();
                all_bytes.extend_from_slice(text.as_bytes());
            }
        }
    }
    assert!(all_bytes.len() > 100);
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    for secret in &secrets {
        assert!(
            !all_bytes
                .windows(secret.len())
                .any(|w| w == secret.as_slice()),
            "a plaintext key is in the database"
        );
        let as_hex = hex(secret);
        assert!(
            !all_bytes
                .windows(as_hex.len())
                .any(|w| w == as_hex.as_bytes()),
            "a plaintext key is in the database, hex-encoded"
        );
    }
}

/// Two replicas on one database: a rotation or a deletion through one is in force on the
/// other within the cache bound (1.5 s), without restarting it.
#[tokio::test]
async fn changes_made_through_one_replica_reach_the_other() {
    let mut h = Harness::start().await;
    let replica = h.fleet.start_keys_replica().await;
    let mut other = KeyServiceClient::new(replica.server.channel().await);
    let tenant = h.new_tenant().await;
    let context = ctx("file", "f-1");
    let encrypt_on_other = |other: &mut KeyServiceClient<Channel>, token: String| {
        let mut other = other.clone();
        let tenant = tenant.clone();
        let context = context.clone();
        async move {
            other
                .encrypt(with_token(
                    pb::EncryptRequest {
                        tenant_id: tenant,
                        items: vec![pb::EncryptItem {
                            plaintext: b"x".to_vec(),
                            context: Some(context),
                        }],
                    },
                    &token,
                ))
                .await
        }
    };
    // The replica has cached version 1.
    let first = encrypt_on_other(&mut other, h.service.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.results[0].key_version, 1);

    h.client
        .rotate_key(with_token(
            pb::RotateKeyRequest {
                tenant_id: tenant.clone(),
            },
            &h.admin,
        ))
        .await
        .unwrap();
    assert_eventually!(std::time::Duration::from_secs(3), {
        let reply = encrypt_on_other(&mut other, h.service.clone())
            .await
            .unwrap()
            .into_inner();
        reply.results[0].key_version == 2
    });

    h.update(&tenant, None, Some(true)).await.unwrap();
    h.client
        .delete_key(with_token(
            pb::DeleteKeyRequest {
                tenant_id: tenant.clone(),
            },
            &h.admin,
        ))
        .await
        .unwrap();
    assert_eventually!(std::time::Duration::from_secs(3), {
        matches!(
            encrypt_on_other(&mut other, h.service.clone()).await,
            Err(status) if status.code() == Code::NotFound
        )
    });
}
