//! Service credentials: a provisioned client trades its id and secret for a service token
//! every service accepts; unknown clients and wrong secrets get one answer and lock nobody
//! out; no scopes are granted (none is enforced yet); only the secret's hash is stored.

use penny_auth::service_tokens::{ClientSpec, new_client_secret};
use penny_platform::ServiceCredential;
use penny_proto::auth::v1 as pb;
use penny_proto::keys::v1 as keys_pb;
use penny_proto::tenants::v1::tenant_service_client::TenantServiceClient;
use penny_tests::{TestFleet, error_reason as reason, with_token};
use sea_orm::{ConnectionTrait, Statement};
use tonic::Code;
use uuid::Uuid;

use crate::auth::service::Harness;

fn issue(client: Uuid, secret: &str, scopes: &[&str]) -> pb::IssueServiceTokenRequest {
    pb::IssueServiceTokenRequest {
        client_id: client.to_string(),
        client_secret: secret.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
    }
}

#[tokio::test]
async fn a_provisioned_client_gets_a_service_token_every_service_accepts() {
    let (secret, hash) = new_client_secret();
    let client = Uuid::new_v4();
    let h = Harness::start_with(TestFleet::builder().service_clients(vec![ClientSpec {
        client_id: client,
        name: "security-monitor".into(),
        secret_sha256: hash.clone(),
        scopes: vec![],
    }]))
    .await;
    let mut auth = h.auth.clone();

    // No token needed: the credentials are the credential.
    let issued = auth
        .issue_service_token(issue(client, &secret, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.token_type, "Bearer");
    assert!(issued.scopes.is_empty());
    // Scopes are not enforced by any service yet, so none can be had.
    let status = auth
        .issue_service_token(issue(client, &secret, &["keys:delete"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // It is a service principal in every service: keys (services only) and auth.
    let tenant = Uuid::new_v4().to_string();
    keys_pb::key_service_client::KeyServiceClient::new(h.fleet.keys().server.channel().await)
        .create_key(with_token(
            keys_pb::CreateKeyRequest {
                tenant_id: tenant.clone(),
            },
            &issued.access_token,
        ))
        .await
        .unwrap();
    auth.list_blocked_ips(with_token(
        pb::ListBlockedIpsRequest::default(),
        &issued.access_token,
    ))
    .await
    .unwrap();
    let found = auth
        .introspect_token(with_token(
            pb::IntrospectTokenRequest {
                token: issued.access_token.clone(),
            },
            &h.frontend,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(found.active);
    assert_eq!(found.principal.unwrap().id, client.to_string());

    // Unknown client and wrong secret: one answer, nothing about which.
    let unknown = auth
        .issue_service_token(issue(Uuid::new_v4(), &secret, &[]))
        .await
        .unwrap_err();
    let wrong = auth
        .issue_service_token(issue(client, "psc_not-the-secret", &[]))
        .await
        .unwrap_err();
    for status in [&unknown, &wrong] {
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason(status), "CLIENT_CREDENTIALS_INVALID");
    }
    assert_eq!(unknown.message(), wrong.message());
    // Wrong secrets lock nobody out (a public RPC must not let anyone lock a client):
    // after many, the right one still works.
    for _ in 0..8 {
        auth.issue_service_token(issue(client, "psc_guess", &[]))
            .await
            .unwrap_err();
    }
    auth.issue_service_token(issue(client, &secret, &[]))
        .await
        .unwrap();

    // Only the hash is stored.
    let url = h.fleet.auth().database.owner_url();
    let db = penny_platform::db::connect(&url).await.unwrap();
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT secret_hash, name, scopes FROM auth_service_clients",
        ))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    for column in 0..3 {
        let value: String = rows[0].try_get_by_index(column).unwrap();
        assert!(!value.contains(secret.as_str()));
    }
    let stored: String = rows[0].try_get_by_index(0).unwrap();
    assert_eq!(stored, hash);

    // Bad input is named.
    let status = auth
        .issue_service_token(pb::IssueServiceTokenRequest {
            client_id: "nope".into(),
            client_secret: String::new(),
            scopes: vec![String::new()],
        })
        .await
        .unwrap_err();
    assert_eq!(
        penny_tests::bad_fields(&status),
        ["client_id", "client_secret", "scopes[0]"]
    );
}

#[tokio::test]
async fn a_server_holding_a_service_client_renews_its_token_before_it_expires() {
    let (secret, hash) = new_client_secret();
    let client = Uuid::new_v4();
    // Tokens live 4 s here, so renewal (after three quarters of a token's life) shows.
    let mut h = Harness::start_with(
        TestFleet::builder()
            .service_token_lifetime(std::time::Duration::from_secs(4))
            .service_clients(vec![ClientSpec {
                client_id: client,
                name: "tenants".into(),
                secret_sha256: hash,
                scopes: vec![],
            }]),
    )
    .await;
    let credential = ServiceCredential::issued(
        h.fleet.auth().server.channel().await,
        client,
        secret.clone(),
    );
    let first = credential.bearer().await.unwrap();
    // Held, not fetched per call.
    assert_eq!(credential.bearer().await.unwrap(), first);

    // A tenants server calling keys and authz with it: a tenant's saga (a key in keys, the
    // owner's binding in authz) goes through on the issued token.
    let server = h
        .fleet
        .start_tenants_with_credential(credential.clone())
        .await;
    h.tenants = TenantServiceClient::new(server.server.channel().await);
    h.tenant("issued-first", false).await;

    tokio::time::sleep(std::time::Duration::from_millis(3200)).await;
    let renewed = credential.bearer().await.unwrap();
    assert_ne!(
        renewed, first,
        "a token past three quarters of its life is renewed"
    );
    h.tenant("issued-renewed", false).await;

    // Both were real service tokens for this client.
    let mut auth = h.auth.clone();
    for token in [&first, &renewed] {
        let found = auth
            .introspect_token(with_token(
                pb::IntrospectTokenRequest {
                    token: token.to_string(),
                },
                &h.frontend,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(found.principal.unwrap().id, client.to_string());
    }
}

#[tokio::test]
async fn a_server_whose_client_secret_is_wrong_fails_closed_without_naming_it() {
    let (_, hash) = new_client_secret();
    let client = Uuid::new_v4();
    let h = Harness::start_with(TestFleet::builder().service_clients(vec![ClientSpec {
        client_id: client,
        name: "tenants".into(),
        secret_sha256: hash,
        scopes: vec![],
    }]))
    .await;
    let wrong = zeroize::Zeroizing::new("psc_wrong-secret-value".to_owned());
    let credential =
        ServiceCredential::issued(h.fleet.auth().server.channel().await, client, wrong.clone());
    let status = tonic::Status::from(credential.bearer().await.unwrap_err());
    assert_eq!(status.code(), Code::Unavailable);
    assert!(!status.message().contains(wrong.as_str()));

    // A server holding it refuses work that needs it with UNAVAILABLE (retry later).
    let server = h.fleet.start_tenants_with_credential(credential).await;
    let mut tenants = TenantServiceClient::new(server.server.channel().await);
    let status = tenants
        .create_tenant(with_token(
            penny_proto::tenants::v1::CreateTenantRequest {
                request_id: Uuid::new_v4().to_string(),
                name: "Refused".into(),
                slug: "refused".into(),
                owner: Some(penny_proto::tenants::v1::OwnerSpec {
                    email: "owner@refused.test".into(),
                    display_name: "Owner".into(),
                }),
                ..Default::default()
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!status.message().contains(wrong.as_str()));
}
