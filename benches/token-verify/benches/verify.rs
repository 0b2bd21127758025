//! Three costs on the same kind of token (EdDSA, the claims auth issues):
//!
//! - `bare`: jsonwebtoken's own decode with the public key, audience and issuer checks —
//!   the floor for a real verification;
//! - `platform/unseen`: `TokenVerifier::verify` on a token it has not seen (every header
//!   and claim rule, then the cache insert);
//! - `platform/seen`: the same call on a token already verified (a SHA-256 and a map
//!   lookup, with expiry re-checked).

use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use penny_platform::principal::{PrincipalKind, TokenVerifier};
use penny_platform::signing::{SigningKey, TokenGrant};

fn grant() -> TokenGrant {
    TokenGrant {
        subject: uuid::Uuid::new_v4().to_string(),
        tenant_id: uuid::Uuid::new_v4(),
        roles: vec!["owner".to_owned()],
        kind: PrincipalKind::User,
        session_id: Some(uuid::Uuid::new_v4().to_string()),
        lifetime: Duration::from_secs(3600),
    }
}

fn bench(c: &mut Criterion) {
    penny_platform::install_crypto_provider();
    let key = SigningKey::generate().expect("key");
    let jwks = key.jwks();
    let verifier = TokenVerifier::new(&jwks).expect("verifier");
    let jwk: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(serde_json::to_value(&jwks.keys[0]).expect("jwk")).expect("jwk");
    let decoding = DecodingKey::from_jwk(&jwk).expect("decoding key");
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_audience(&["penny-api"]);
    validation.set_issuer(&["penny.ai"]);

    let token = key.mint(&grant()).expect("mint");
    c.bench_function("bare", |b| {
        b.iter(|| {
            jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation)
                .expect("valid")
        });
    });
    c.bench_function("platform/unseen", |b| {
        b.iter_batched(
            || key.mint(&grant()).expect("mint"),
            |token| verifier.verify(&token).expect("valid"),
            BatchSize::SmallInput,
        );
    });
    verifier.verify(&token).expect("valid");
    c.bench_function("platform/seen", |b| {
        b.iter(|| verifier.verify(&token).expect("valid"));
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
