//! Token-signing keys: stored only sealed by the keys service, published before they sign,
//! rotated on schedule, and the old key stays trusted everywhere while its tokens live.

use std::time::Duration;

use penny_proto::auth::v1 as pb;
use penny_proto::tenants::v1 as tpb;
use penny_tests::{TestFleet, assert_eventually, with_token};
use sea_orm::{ConnectionTrait, Statement};

use crate::auth::service::Harness;

const PASSWORD: &str = "a long and unusual passphrase";

fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

#[tokio::test]
async fn signing_keys_are_sealed_rotated_and_old_tokens_stay_valid_everywhere() {
    // Rotation every 4 s: a successor is published 2 s before it signs.
    let mut h =
        Harness::start_with(TestFleet::builder().signing_key_rotation(Duration::from_secs(4)))
            .await;
    let acme = h.tenant("acme", false).await;
    h.set_password(&acme, PASSWORD).await;
    let first = h.login(acme.tenant, &acme.email, PASSWORD).await.unwrap();
    let first_kid = kid(&first.access_token);

    // The private half is stored only as keys-service ciphertext.
    let url = h.fleet.auth().database.owner_url();
    let db = penny_platform::db::connect(&url).await.unwrap();
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT kid, private_ciphertext FROM auth_signing_keys",
        ))
        .await
        .unwrap();
    assert!(!rows.is_empty());
    for row in &rows {
        let sealed: String = row.try_get_by_index(1).unwrap();
        assert!(sealed.starts_with("penny:v"), "{sealed}");
    }

    // Within a few rotations a new key signs, while the JWKS still publishes the old one.
    let mut auth = h.auth.clone();
    assert_eventually!(Duration::from_secs(20), {
        let next = h.login(acme.tenant, &acme.email, PASSWORD).await.unwrap();
        kid(&next.access_token) != first_kid
    });
    let second = h.login(acme.tenant, &acme.email, PASSWORD).await.unwrap();
    let jwks = auth
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    let kids: Vec<&str> = jwks.keys.iter().map(|k| k.kid.as_str()).collect();
    assert!(kids.contains(&first_kid.as_str()), "{kids:?}");
    assert!(
        kids.contains(&kid(&second.access_token).as_str()),
        "{kids:?}"
    );
    // Both tokens work in another service (which learns new keys from auth's JWKS).
    for token in [&first.access_token, &second.access_token] {
        h.tenants
            .clone()
            .get_tenant(with_token(
                tpb::GetTenantRequest {
                    tenant_id: acme.tenant.to_string(),
                },
                token,
            ))
            .await
            .unwrap();
    }
    // The replaced key is retired, and published until its tokens have expired.
    let retired = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT kid FROM auth_signing_keys WHERE retired_at IS NOT NULL AND expires_at IS NOT NULL",
        ))
        .await
        .unwrap();
    let retired: Vec<String> = retired
        .iter()
        .map(|r| r.try_get_by_index(0).unwrap())
        .collect();
    assert!(retired.contains(&first_kid), "{retired:?}");
}

async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
) -> (u16, std::collections::HashMap<String, String>, String) {
    let (status, headers, body) = penny_tests::http_request(addr, method, path).await;
    (status, headers, String::from_utf8(body).unwrap())
}

#[tokio::test]
async fn the_jwks_is_served_over_http_with_security_headers_and_verifies_auths_tokens() {
    let mut h = Harness::start().await;
    let acme = h.tenant("acme", false).await;
    h.set_password(&acme, PASSWORD).await;
    let tokens = h.login(acme.tenant, &acme.email, PASSWORD).await.unwrap();
    let addr = h.fleet.auth().http_addr;

    let (status, headers, body) = http_request(addr, "GET", "/.well-known/jwks.json").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["cache-control"], "public, max-age=300");
    for (name, value) in penny_platform::http::SECURITY_HEADERS {
        assert_eq!(headers.get(name).map(String::as_str), Some(value), "{name}");
    }
    // The same keys as GetJwks, and enough for a verifier that knows nothing else to
    // accept the token auth just signed.
    let jwks: penny_platform::principal::Jwks = serde_json::from_str(&body).unwrap();
    let grpc =
        pb::auth_service_client::AuthServiceClient::new(h.fleet.auth().server.channel().await)
            .get_jwks(pb::GetJwksRequest {})
            .await
            .unwrap()
            .into_inner();
    let mut over_http: Vec<&str> = jwks.keys.iter().map(|k| k.kid.as_str()).collect();
    let mut over_grpc: Vec<&str> = grpc.keys.iter().map(|k| k.kid.as_str()).collect();
    over_http.sort_unstable();
    over_grpc.sort_unstable();
    assert!(!over_http.is_empty());
    assert_eq!(over_http, over_grpc);
    let verifier = penny_platform::principal::TokenVerifier::new(&jwks).unwrap();
    let principal = verifier.verify(&tokens.access_token).unwrap();
    assert_eq!(principal.id, acme.user.to_string());

    // Anything else is refused, with the same headers and nothing cacheable.
    for (method, path, expected) in [
        ("POST", "/.well-known/jwks.json", 405),
        ("DELETE", "/.well-known/jwks.json", 405),
        ("GET", "/.well-known/jwks.json/../../etc/passwd", 404),
        ("GET", "/.well-known/openid-configuration", 404),
        ("GET", "/", 404),
    ] {
        let (status, headers, _) = http_request(addr, method, path).await;
        assert_eq!(status, expected, "{method} {path}");
        assert_eq!(
            headers["x-content-type-options"], "nosniff",
            "{method} {path}"
        );
        assert_eq!(headers["cache-control"], "no-store", "{method} {path}");
    }
}
