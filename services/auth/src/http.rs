//! Auth over plain HTTP: the JWKS at [`JWKS_PATH`], for verifiers outside the Penny
//! platform (API gateways, other languages' JWT libraries). The same keys as `GetJwks`;
//! 503 with `Retry-After` until they are loaded, never an empty set.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};

use crate::service::Auth;

/// Where the JWKS is served.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// The HTTP routes of the auth service.
pub fn router(auth: Auth) -> axum::Router {
    axum::Router::new()
        .route(JWKS_PATH, axum::routing::get(jwks))
        .with_state(auth)
}

async fn jwks(State(auth): State<Auth>) -> Response {
    if !auth.keys_loaded() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(RETRY_AFTER, "1"), (CONTENT_TYPE, "application/json")],
            r#"{"error":"the signing keys are not loaded yet; retry later"}"#,
        )
            .into_response();
    }
    match serde_json::to_vec(&auth.jwks()) {
        Ok(body) => (
            StatusCode::OK,
            [
                (CONTENT_TYPE, "application/json".to_owned()),
                (
                    CACHE_CONTROL,
                    format!("public, max-age={}", crate::grpc::JWKS_MAX_AGE.as_secs()),
                ),
            ],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
