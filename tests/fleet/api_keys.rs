//! API keys: shown once, stored only as SHA-256, accepted by every service as a principal
//! of their tenant, no wider than their creator, and refused everywhere within 2 s of
//! being revoked.

use std::collections::HashSet;
use std::time::Duration;

use penny_proto::auth::v1 as pb;
use penny_proto::authz::v1 as authz_pb;
use penny_proto::common::v1::PrincipalKind;
use penny_proto::keys::v1 as keys_pb;
use penny_proto::tenants::v1 as tpb;
use penny_tests::{assert_eventually, bad_fields, error_reason as reason, with_token};
use sea_orm::{ConnectionTrait, Statement};
use sha2::Digest as _;
use tonic::Code;
use uuid::Uuid;

use crate::auth::service::{Account, Harness};

const PASSWORD: &str = "a long and unusual passphrase";

fn with_key<T>(message: T, secret: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-api-key", secret.parse().unwrap());
    request
}

/// One call to each of the four services with an API key, in `tenant`.
async fn probe_every_service(
    h: &Harness,
    secret: &str,
    tenant: Uuid,
) -> [Result<(), tonic::Status>; 4] {
    let tenant_id = tenant.to_string();
    let keys =
        keys_pb::key_service_client::KeyServiceClient::new(h.fleet.keys().server.channel().await)
            .get_key(with_key(
                keys_pb::GetKeyRequest {
                    tenant_id: tenant_id.clone(),
                },
                secret,
            ))
            .await
            .map(drop);
    let authz = authz_pb::authz_service_client::AuthzServiceClient::new(
        h.fleet.authz().server.channel().await,
    )
    .list_roles(with_key(
        authz_pb::ListRolesRequest {
            tenant_id: tenant_id.clone(),
            ..Default::default()
        },
        secret,
    ))
    .await
    .map(drop);
    let tenants = h
        .tenants
        .clone()
        .get_tenant(with_key(
            tpb::GetTenantRequest {
                tenant_id: tenant_id.clone(),
            },
            secret,
        ))
        .await
        .map(drop);
    let auth = h
        .auth
        .clone()
        .list_api_keys(with_key(
            pb::ListApiKeysRequest {
                tenant_id,
                ..Default::default()
            },
            secret,
        ))
        .await
        .map(drop);
    [keys, authz, tenants, auth]
}

async fn owner_token(h: &mut Harness, slug: &str) -> (Account, String) {
    let account = h.tenant(slug, false).await;
    h.set_password(&account, PASSWORD).await;
    let tokens = h
        .login(account.tenant, &account.email, PASSWORD)
        .await
        .unwrap();
    (account, tokens.access_token)
}

async fn create_key(
    h: &Harness,
    token: &str,
    tenant: Uuid,
    roles: &[&str],
) -> Result<pb::CreateApiKeyResponse, tonic::Status> {
    h.auth
        .clone()
        .create_api_key(with_token(
            pb::CreateApiKeyRequest {
                tenant_id: tenant.to_string(),
                name: "ci deploys".into(),
                roles: roles.iter().map(|r| (*r).to_owned()).collect(),
                expire_time: None,
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn list_keys(h: &Harness, token: &str, tenant: Uuid, show_inactive: bool) -> Vec<pb::ApiKey> {
    h.auth
        .clone()
        .list_api_keys(with_token(
            pb::ListApiKeysRequest {
                tenant_id: tenant.to_string(),
                show_inactive,
                ..Default::default()
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
        .api_keys
}

#[test]
fn ten_thousand_generated_keys_are_distinct() {
    let mut secrets = HashSet::new();
    let mut prefixes = HashSet::new();
    for _ in 0..10_000 {
        let secret = penny_auth::api_keys::generate_secret();
        assert!(penny_auth::api_keys::well_formed(&secret));
        prefixes.insert(secret[..16].to_owned());
        assert!(secrets.insert(secret.to_string()), "a secret repeated");
    }
    // The visible prefixes are distinct too, so a listing tells keys apart.
    assert_eq!(prefixes.len(), 10_000);
}

#[tokio::test]
async fn an_api_key_works_everywhere_until_revoked_and_the_database_holds_only_its_hash() {
    let mut h = Harness::start().await;
    let (acme, owner) = owner_token(&mut h, "acme").await;
    let created = create_key(&h, &owner, acme.tenant, &["owner"])
        .await
        .unwrap();
    let secret = created.secret.clone();
    let key = created.api_key.unwrap();
    assert!(
        secret.starts_with("pk_live_") && secret.len() == 51,
        "{secret}"
    );
    assert_eq!(key.prefix, secret[..16]);
    assert_eq!(key.roles, ["owner"]);
    assert_eq!(key.creator_id, acme.user.to_string());

    // Only the hash is stored: the secret (or its random part) appears nowhere.
    let db = penny_platform::db::connect(&h.fleet.auth().database.owner_url())
        .await
        .unwrap();
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT id, name, prefix, secret_hash, roles, creator_id FROM auth_api_keys",
        ))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let stored: String = rows[0].try_get_by_index(3).unwrap();
    let expected: String = sha2::Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(stored, expected);
    for column in [1, 2, 3, 4, 5] {
        let value: String = rows[0].try_get_by_index(column).unwrap();
        assert!(
            !value.contains(&secret["pk_live_".len()..]),
            "secret in column {column}"
        );
    }

    // Every service accepts it as a principal of acme (keys refuses on permission: the
    // owner role holds no key permissions).
    let results = probe_every_service(&h, &secret, acme.tenant).await;
    assert_eq!(
        results[0].as_ref().unwrap_err().code(),
        Code::PermissionDenied
    );
    assert!(results[1..].iter().all(Result::is_ok), "{results:?}");
    // Validation answers fleet services only.
    let validated = h
        .auth
        .clone()
        .validate_api_key(with_token(
            pb::ValidateApiKeyRequest {
                secret: secret.clone(),
            },
            &h.frontend,
        ))
        .await
        .unwrap()
        .into_inner()
        .principal
        .unwrap();
    assert_eq!(validated.kind, PrincipalKind::ApiKey as i32);
    assert_eq!(validated.id, key.id);
    assert_eq!(validated.tenant_id, acme.tenant.to_string());
    let status = h
        .auth
        .clone()
        .validate_api_key(with_token(
            pb::ValidateApiKeyRequest {
                secret: secret.clone(),
            },
            &owner,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // Revoked: refused by every service within 2 s, although they cached it.
    let revoked = h
        .auth
        .clone()
        .revoke_api_key(with_token(
            pb::RevokeApiKeyRequest {
                tenant_id: acme.tenant.to_string(),
                api_key_id: key.id.clone(),
            },
            &owner,
        ))
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert!(revoked.revoke_time.is_some());
    assert_eventually!(
        Duration::from_secs(2),
        probe_every_service(&h, &secret, acme.tenant)
            .await
            .iter()
            .all(|r| r.as_ref().is_err_and(|s| s.code() == Code::Unauthenticated))
    );
    let status = h
        .auth
        .clone()
        .validate_api_key(with_token(
            pb::ValidateApiKeyRequest { secret },
            &h.frontend,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // Listings hide it unless asked.
    assert!(list_keys(&h, &owner, acme.tenant, false).await.is_empty());
    let all = list_keys(&h, &owner, acme.tenant, true).await;
    assert_eq!(all.len(), 1);
    assert!(all[0].revoke_time.is_some());
}

#[tokio::test]
async fn an_api_key_is_no_wider_than_its_creator_and_stays_in_its_tenant() {
    let mut h = Harness::start().await;
    let (acme, owner) = owner_token(&mut h, "acme").await;
    // A custom role that may manage keys (binding their roles is a grant, so it needs
    // `user:grant` too) and read the tenant, and nothing else.
    let mut authz = authz_pb::authz_service_client::AuthzServiceClient::new(
        h.fleet.authz().server.channel().await,
    );
    authz
        .create_role(with_token(
            authz_pb::CreateRoleRequest {
                tenant_id: acme.tenant.to_string(),
                name: "keymaster".into(),
                description: "manages API keys".into(),
                permissions: vec![
                    "tenant:update".into(),
                    "tenant:read".into(),
                    "user:grant".into(),
                ],
            },
            &owner,
        ))
        .await
        .unwrap();
    let keymaster = create_key(&h, &owner, acme.tenant, &["keymaster"])
        .await
        .unwrap()
        .secret;
    // The keymaster key may make a key with its own role, but not one with `owner`.
    let status = h
        .auth
        .clone()
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                tenant_id: acme.tenant.to_string(),
                name: "wider".into(),
                roles: vec!["keymaster".into(), "owner".into()],
                expire_time: None,
            },
            &keymaster,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "PRIVILEGE_ESCALATION");
    // Nothing of the refused key remains: no row, no binding.
    let keys = list_keys(&h, &owner, acme.tenant, true).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let bindings = authz
        .list_role_bindings(with_token(
            authz_pb::ListRoleBindingsRequest {
                tenant_id: acme.tenant.to_string(),
                ..Default::default()
            },
            &owner,
        ))
        .await
        .unwrap()
        .into_inner()
        .role_bindings;
    let key_bindings = bindings
        .iter()
        .filter(|b| {
            b.subject
                .as_ref()
                .is_some_and(|s| s.kind == PrincipalKind::ApiKey as i32)
        })
        .count();
    assert_eq!(key_bindings, 1, "{bindings:?}");
    let narrower = h
        .auth
        .clone()
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                tenant_id: acme.tenant.to_string(),
                name: "same".into(),
                roles: vec!["keymaster".into()],
                expire_time: None,
            },
            &keymaster,
        ))
        .await;
    assert!(narrower.is_ok(), "{narrower:?}");

    // Another tenant's owner sees and touches none of acme's keys.
    let (globex, stranger) = owner_token(&mut h, "globex").await;
    let acme_key = keys[0].id.clone();
    for tenant in [acme.tenant, globex.tenant] {
        let status = h
            .auth
            .clone()
            .revoke_api_key(with_token(
                pb::RevokeApiKeyRequest {
                    tenant_id: tenant.to_string(),
                    api_key_id: acme_key.clone(),
                },
                &stranger,
            ))
            .await
            .unwrap_err();
        assert!(
            matches!(status.code(), Code::NotFound | Code::PermissionDenied),
            "{status:?}"
        );
    }
    let status = h
        .auth
        .clone()
        .list_api_keys(with_token(
            pb::ListApiKeysRequest {
                tenant_id: acme.tenant.to_string(),
                ..Default::default()
            },
            &stranger,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::NotFound | Code::PermissionDenied),
        "{status:?}"
    );
    assert!(
        list_keys(&h, &stranger, globex.tenant, true)
            .await
            .is_empty()
    );
    // A key used in another tenant is NOT_FOUND there.
    let status = h
        .tenants
        .clone()
        .get_tenant(with_key(
            tpb::GetTenantRequest {
                tenant_id: globex.tenant.to_string(),
            },
            &keymaster,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::NotFound | Code::PermissionDenied),
        "{status:?}"
    );
}

#[tokio::test]
async fn bad_keys_and_bad_requests_are_refused_plainly() {
    let mut h = Harness::start().await;
    let (acme, owner) = owner_token(&mut h, "acme").await;
    let mut tenants = h.tenants.clone();
    let get = || tpb::GetTenantRequest {
        tenant_id: acme.tenant.to_string(),
    };
    // Garbage, a well-formed unknown key, and a key beside a bearer token.
    for secret in [
        "nonsense",
        "pk_live_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let status = tenants
            .get_tenant(with_key(get(), secret))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(!status.message().contains(secret));
    }
    let secret = create_key(&h, &owner, acme.tenant, &["owner"])
        .await
        .unwrap()
        .secret;
    let mut both = with_key(get(), &secret);
    both.metadata_mut()
        .insert("authorization", format!("Bearer {owner}").parse().unwrap());
    let status = tenants.get_tenant(both).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(tenants.get_tenant(with_key(get(), &secret)).await.is_ok());

    // Every bad field is named.
    let status = h
        .auth
        .clone()
        .create_api_key(with_token(
            pb::CreateApiKeyRequest {
                tenant_id: "nope".into(),
                name: String::new(),
                roles: vec!["Owner!".into(), "viewer".into(), "viewer".into()],
                expire_time: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                }),
            },
            &owner,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        bad_fields(&status),
        ["tenant_id", "name", "roles[0]", "roles[2]", "expire_time"]
    );
    let status = create_key(&h, &owner, acme.tenant, &[]).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["roles"]);

    // An expired key is refused.
    let short = h
        .auth
        .clone()
        .create_api_key(with_token(
            pb::CreateApiKeyRequest {
                tenant_id: acme.tenant.to_string(),
                name: "short".into(),
                roles: vec!["owner".into()],
                expire_time: Some(prost_types::Timestamp {
                    seconds: i64::try_from(penny_platform::principal::now_secs()).unwrap() + 2,
                    nanos: 0,
                }),
            },
            &owner,
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    assert!(tenants.get_tenant(with_key(get(), &short)).await.is_ok());
    assert_eventually!(
        Duration::from_secs(5),
        tenants
            .get_tenant(with_key(get(), &short))
            .await
            .is_err_and(|s| s.code() == Code::Unauthenticated)
    );
}
