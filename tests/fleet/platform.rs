//! The standard stack, exercised through the test-only echo service.

use std::time::Duration;

use penny_platform::principal::PrincipalKind;
use penny_platform::signing::TokenGrant;
use penny_tests::echo::pb::echo_service_client::EchoServiceClient;
use penny_tests::echo::pb::{AdminEchoRequest, EchoRequest, UnlistedRequest};
use penny_tests::tokens::{self, admin_claims};
use penny_tests::{TestFleet, assert_eventually, with_token};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

fn echo(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        delay_ms: 0,
    }
}

#[tokio::test]
async fn health_goes_serving() {
    let fleet = TestFleet::builder().with_echo().start().await;
    let mut health = HealthClient::new(fleet.echo().channel().await);
    assert_eventually!(Duration::from_secs(5), {
        let reply = health
            .check(HealthCheckRequest {
                service: penny_tests::echo::SERVICE.into(),
            })
            .await;
        matches!(reply, Ok(r) if r.get_ref().status == ServingStatus::Serving as i32)
    });
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(overall.get_ref().status, ServingStatus::Serving as i32);
}

async fn reflection_services_v1(fleet: &TestFleet) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(fleet.echo().channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("unexpected reflection reply {other:?}"),
    }
}

async fn reflection_services_v1alpha(fleet: &TestFleet) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(fleet.echo().channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("unexpected reflection reply {other:?}"),
    }
}

#[tokio::test]
async fn reflection_lists_only_running_services_in_v1_and_v1alpha() {
    let fleet = TestFleet::builder().with_echo().start().await;
    let expected = vec![
        "grpc.health.v1.Health".to_owned(),
        "grpc.reflection.v1.ServerReflection".to_owned(),
        "grpc.reflection.v1alpha.ServerReflection".to_owned(),
        penny_tests::echo::SERVICE.to_owned(),
    ];
    assert_eq!(reflection_services_v1(&fleet).await, expected);
    assert_eq!(reflection_services_v1alpha(&fleet).await, expected);
}

#[tokio::test]
async fn a_valid_token_is_accepted_and_names_the_principal() {
    let fleet = TestFleet::builder().with_echo().start().await;
    let mut client = EchoServiceClient::new(fleet.echo().channel().await);
    let reply = client
        .echo(with_token(echo("hi"), &fleet.admin_token()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "hi");
    assert_eq!(reply.principal_id, "test-admin");
}

async fn assert_unauthenticated(
    client: &mut EchoServiceClient<tonic::transport::Channel>,
    token: &str,
    case: &str,
) {
    let status = client
        .echo(with_token(echo("hi"), token))
        .await
        .expect_err(case);
    assert_eq!(status.code(), Code::Unauthenticated, "{case}: {status:?}");
    assert_eq!(status.message(), "missing or invalid credentials", "{case}");
    let info = status
        .get_error_details()
        .error_info()
        .cloned()
        .expect("error info");
    assert_eq!(info.domain, "penny", "{case}");
}

#[tokio::test]
async fn bad_tokens_are_refused_with_unauthenticated() {
    let fleet = TestFleet::builder().with_echo().start().await;
    let key = &fleet.signing;
    let mut client = EchoServiceClient::new(fleet.echo().channel().await);
    for (case, token) in &bad_tokens(key) {
        assert_unauthenticated(&mut client, token, case).await;
    }
    let mut expired = admin_claims();
    expired["exp"] = (penny_platform::principal::now_secs() - 3600).into();
    expired["nbf"] = (penny_platform::principal::now_secs() - 7200).into();

    // The expired token says so in its reason; the reply text stays the same.
    let status = client
        .echo(with_token(echo("hi"), &tokens::signed(key, &expired)))
        .await
        .unwrap_err();
    assert_eq!(
        status.get_error_details().error_info().unwrap().reason,
        "TOKEN_EXPIRED"
    );

    // And the good token still works after all that.
    let good = tokens::signed(key, &admin_claims());
    client.echo(with_token(echo("hi"), &good)).await.unwrap();
}

/// Every forged, confused or stale token the JWT literature knows, each signed (where it
/// is signed at all) so that only the property under test is wrong.
fn bad_tokens(key: &penny_platform::signing::SigningKey) -> Vec<(&'static str, String)> {
    let mut expired = admin_claims();
    expired["exp"] = (penny_platform::principal::now_secs() - 3600).into();
    expired["nbf"] = (penny_platform::principal::now_secs() - 7200).into();
    let mut wrong_aud = admin_claims();
    wrong_aud["aud"] = "someone-else".into();
    let mut wrong_iss = admin_claims();
    wrong_iss["iss"] = "evil.example".into();
    let mut not_yet = admin_claims();
    not_yet["nbf"] = (penny_platform::principal::now_secs() + 3600).into();
    let mut exp_string = admin_claims();
    exp_string["exp"] = "9999999999".into();
    let other_key = penny_platform::signing::SigningKey::generate().unwrap();
    let attacker_jwk: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(serde_json::to_value(&other_key.jwks().keys[0]).unwrap()).unwrap();

    let cases = [
        ("no token at all", String::new()),
        ("garbage", "not.a.jwt".to_owned()),
        ("expired", tokens::signed(key, &expired)),
        ("wrong aud", tokens::signed(key, &wrong_aud)),
        ("wrong iss", tokens::signed(key, &wrong_iss)),
        ("nbf in the future", tokens::signed(key, &not_yet)),
        ("exp as a string", tokens::signed(key, &exp_string)),
        ("alg none", tokens::alg_none(key, &admin_claims())),
        (
            "HS256 keyed with the public key",
            tokens::hs256_with_public_key(key, &admin_claims()),
        ),
        (
            "unknown kid",
            tokens::signed_with_header(key, &admin_claims(), |h| h.kid = Some("nope".into())),
        ),
        (
            "missing kid",
            tokens::signed_with_header(key, &admin_claims(), |h| h.kid = None),
        ),
        (
            "jwk header",
            tokens::signed_with_header(key, &admin_claims(), |h| h.jwk = Some(attacker_jwk)),
        ),
        (
            "jku header",
            tokens::signed_with_header(key, &admin_claims(), |h| {
                h.jku = Some("https://evil.example/jwks".into())
            }),
        ),
        (
            "x5u header",
            tokens::signed_with_header(key, &admin_claims(), |h| {
                h.x5u = Some("https://evil.example/cert".into())
            }),
        ),
        (
            "wrong typ",
            tokens::signed_with_header(key, &admin_claims(), |h| {
                h.typ = Some("refresh+jwt".into())
            }),
        ),
        (
            "all-zero signature",
            tokens::zero_signature(key, &admin_claims()),
        ),
        ("signed by another key with our kid", {
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
            header.typ = Some("JWT".into());
            header.kid = Some(key.kid().to_owned());
            other_key.sign_with_header(header, &admin_claims()).unwrap()
        }),
    ];
    cases.into_iter().collect()
}

/// The same tokens against one RPC of every real service: each runs the same stack, and
/// this proves none is wired around it.
#[tokio::test]
async fn every_service_refuses_every_bad_token() {
    use penny_proto::auth::v1 as auth_pb;
    use penny_proto::authz::v1 as authz_pb;
    use penny_proto::keys::v1 as keys_pb;
    use penny_proto::tenants::v1 as tenants_pb;

    let fleet = TestFleet::builder().with_auth().start().await;
    let tenant = uuid::Uuid::new_v4().to_string();
    let mut keys =
        keys_pb::key_service_client::KeyServiceClient::new(fleet.keys().server.channel().await);
    let mut authz = authz_pb::authz_service_client::AuthzServiceClient::new(
        fleet.authz().server.channel().await,
    );
    let mut tenants = tenants_pb::tenant_service_client::TenantServiceClient::new(
        fleet.tenants().server.channel().await,
    );
    let mut auth =
        auth_pb::auth_service_client::AuthServiceClient::new(fleet.auth().server.channel().await);
    let mut refused = 0;
    for (case, token) in &bad_tokens(&fleet.signing) {
        let results = [
            keys.get_key(with_token(
                keys_pb::GetKeyRequest {
                    tenant_id: tenant.clone(),
                },
                token,
            ))
            .await
            .map(drop),
            authz
                .list_roles(with_token(
                    authz_pb::ListRolesRequest {
                        tenant_id: tenant.clone(),
                        ..Default::default()
                    },
                    token,
                ))
                .await
                .map(drop),
            tenants
                .get_tenant(with_token(
                    tenants_pb::GetTenantRequest {
                        tenant_id: tenant.clone(),
                    },
                    token,
                ))
                .await
                .map(drop),
            auth.login(with_token(
                auth_pb::LoginRequest {
                    tenant_id: tenant.clone(),
                    email: "a@b.test".into(),
                    password: "irrelevant password".into(),
                    ip_address: "192.0.2.1".into(),
                    user_agent: String::new(),
                },
                token,
            ))
            .await
            .map(drop),
        ];
        for (service, result) in ["keys", "authz", "tenants", "auth"].iter().zip(results) {
            let status = result.expect_err(&format!("{service} accepted {case}"));
            assert_eq!(
                status.code(),
                tonic::Code::Unauthenticated,
                "{service}, {case}: {status:?}"
            );
            refused += 1;
        }
    }
    assert_eq!(refused, 4 * 17);
}

#[tokio::test]
async fn access_table_decides_and_unlisted_rpcs_are_refused() {
    let fleet = TestFleet::builder().with_echo().start().await;
    let mut client = EchoServiceClient::new(fleet.echo().channel().await);
    let tenant = uuid::Uuid::new_v4();
    let viewer = fleet.user_token(tenant, &["viewer"]);
    let customer_admin = fleet.user_token(tenant, &["admin"]);

    client.echo(with_token(echo("hi"), &viewer)).await.unwrap();
    for token in [&viewer, &customer_admin] {
        let status = client
            .admin_echo(with_token(
                AdminEchoRequest {
                    message: "x".into(),
                },
                token,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    client
        .admin_echo(with_token(
            AdminEchoRequest {
                message: "x".into(),
            },
            &fleet.admin_token(),
        ))
        .await
        .unwrap();
    let status = client
        .unlisted(with_token(UnlistedRequest {}, &fleet.admin_token()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn invalid_arguments_list_every_bad_field() {
    let fleet = TestFleet::builder().with_echo().start().await;
    let mut client = EchoServiceClient::new(fleet.echo().channel().await);
    let status = client
        .echo(with_token(
            EchoRequest {
                message: String::new(),
                delay_ms: 20_000,
            },
            &fleet.admin_token(),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status.get_error_details();
    let fields: Vec<_> = details
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, ["message", "delay_ms"]);
}

#[tokio::test]
async fn request_ids_are_echoed_or_made() {
    let fleet = TestFleet::builder().with_echo().start().await;
    let mut client = EchoServiceClient::new(fleet.echo().channel().await);
    let mut request = with_token(echo("hi"), &fleet.admin_token());
    request
        .metadata_mut()
        .insert("x-request-id", "req-123".parse().unwrap());
    let reply = client.echo(request).await.unwrap();
    assert_eq!(reply.metadata().get("x-request-id").unwrap(), "req-123");
    let reply = client
        .echo(with_token(echo("hi"), &fleet.admin_token()))
        .await
        .unwrap();
    let made = reply
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(uuid::Uuid::parse_str(made).is_ok());
}

#[tokio::test]
async fn excess_calls_are_shed_with_unavailable() {
    let fleet = TestFleet::builder()
        .with_echo()
        .concurrency_limit(1)
        .start()
        .await;
    let channel = fleet.echo().channel().await;
    let token = fleet.admin_token();
    let mut slow = EchoServiceClient::new(channel.clone());
    let slow_token = token.clone();
    let marker = format!("slow-{}", uuid::Uuid::new_v4().simple());
    let message = marker.clone();
    let in_flight = tokio::spawn(async move {
        slow.echo(with_token(
            EchoRequest {
                message,
                delay_ms: 3000,
            },
            &slow_token,
        ))
        .await
    });
    let mut client = EchoServiceClient::new(channel);
    // Once the slow call holds the only permit, the next call is shed.
    assert_eventually!(
        Duration::from_secs(10),
        penny_tests::echo::in_flight(&marker)
    );
    assert_eventually!(Duration::from_secs(2), {
        match client.echo(with_token(echo("fast"), &token)).await {
            Err(status) => {
                status.code() == Code::Unavailable
                    && status.get_error_details().retry_info().is_some()
            }
            Ok(_) => false,
        }
    });
    // Health is never shed.
    let mut health = HealthClient::new(fleet.echo().channel().await);
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    in_flight.await.unwrap().unwrap();
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_calls() {
    let mut fleet = TestFleet::builder().with_echo().start().await;
    let channel = fleet.echo().channel().await;
    let token = fleet.admin_token();
    let mut client = EchoServiceClient::new(channel);
    let marker = format!("drain-{}", uuid::Uuid::new_v4().simple());
    let message = marker.clone();
    let in_flight = tokio::spawn(async move {
        client
            .echo(with_token(
                EchoRequest {
                    message,
                    delay_ms: 700,
                },
                &token,
            ))
            .await
    });
    // Once the call is inside the handler, ask the server to stop.
    assert_eventually!(
        Duration::from_secs(10),
        penny_tests::echo::in_flight(&marker)
    );
    let server = fleet.echo.as_mut().unwrap();
    server.shutdown().await.unwrap();
    let reply = in_flight
        .await
        .unwrap()
        .expect("in-flight call completes during drain");
    assert_eq!(reply.into_inner().message, marker);
}

#[tokio::test]
async fn service_principals_carry_their_kind() {
    let fleet = TestFleet::builder().with_echo().start().await;
    let mut client = EchoServiceClient::new(fleet.echo().channel().await);
    let token = fleet.token(&TokenGrant {
        subject: "svc-files".into(),
        tenant_id: penny_platform::principal::PLATFORM_TENANT_ID,
        roles: vec![],
        kind: PrincipalKind::Service,
        session_id: None,
        lifetime: Duration::from_secs(60),
    });
    let reply = client.echo(with_token(echo("hi"), &token)).await.unwrap();
    assert_eq!(reply.into_inner().principal_id, "svc-files");
}

#[tokio::test]
async fn mtls_admits_only_clients_with_a_certificate_from_the_ca() {
    use penny_tests::tls::TestPki;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let pki = TestPki::generate();
    let fleet = TestFleet::builder()
        .with_echo()
        .tls(pki.server_mtls())
        .start()
        .await;
    let addr = fleet.echo().addr;
    let token = fleet.admin_token();
    let ca = pki.ca_pem.clone();
    let connect = |identity: Option<Identity>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .domain_name("localhost");
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        let token = token.clone();
        async move {
            let channel = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))?
                .tls_config(tls)?
                .connect()
                .await?;
            let mut client = EchoServiceClient::new(channel);
            client.echo(with_token(echo("over tls"), &token)).await?;
            Ok::<_, Box<dyn std::error::Error>>(())
        }
    };
    connect(Some(Identity::from_pem(
        &pki.client_cert_pem,
        &pki.client_key_pem,
    )))
    .await
    .expect("a client with a certificate from the CA is served");
    assert!(
        connect(None).await.is_err(),
        "a client without a certificate is refused"
    );
    assert!(
        connect(Some(Identity::from_pem(
            &pki.rogue_client_cert_pem,
            &pki.rogue_client_key_pem
        )))
        .await
        .is_err(),
        "a client certificate from another CA is refused"
    );
    // Plaintext to a TLS port fails too.
    let plaintext = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let mut client = EchoServiceClient::new(channel);
        assert!(
            client
                .echo(with_token(echo("x"), &fleet.admin_token()))
                .await
                .is_err()
        );
    }
}
