//! The test-only echo service: a small real service on the standard stack.

use std::time::Duration;

use penny_platform::server::{ServiceBundle, always_ready};
use penny_platform::stack::{caller, tenant_scope};
use penny_platform::validate::Violations;
use penny_platform::{AccessPolicy, ApiError, Requirement};
use tonic::{Request, Response, Status};

/// Generated code of `penny.testing.v1`.
pub mod pb {
    tonic::include_proto!("penny.testing.v1");
    /// Descriptor set for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("echo_descriptor");
}

use pb::echo_service_server::{EchoService, EchoServiceServer};

/// Messages of delayed calls now inside the handler, so tests can wait until a call has
/// really arrived instead of sleeping and hoping.
static IN_FLIGHT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn mark_in_flight(message: &str, inside: bool) {
    if let Ok(mut in_flight) = IN_FLIGHT.lock() {
        if inside {
            in_flight.push(message.to_owned());
        } else if let Some(i) = in_flight.iter().position(|m| m == message) {
            in_flight.remove(i);
        }
    }
}

/// Whether a delayed call carrying `message` is inside the handler now.
pub fn in_flight(message: &str) -> bool {
    IN_FLIGHT
        .lock()
        .is_ok_and(|in_flight| in_flight.iter().any(|m| m == message))
}

/// The gRPC name of the echo service.
pub const SERVICE: &str = "penny.testing.v1.EchoService";

#[derive(Debug, Default)]
struct Echo;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(
        &self,
        request: Request<pb::EchoRequest>,
    ) -> Result<Response<pb::EchoResponse>, Status> {
        let principal = caller(&request)?.clone();
        let message = request.into_inner();
        let mut violations = Violations::new();
        violations.length("message", &message.message, 1, 100);
        if message.delay_ms > 10_000 {
            violations.add("delay_ms", "must be at most 10000");
        }
        violations.finish()?;
        if message.delay_ms > 0 {
            mark_in_flight(&message.message, true);
            tokio::time::sleep(Duration::from_millis(u64::from(message.delay_ms))).await;
            mark_in_flight(&message.message, false);
        }
        Ok(Response::new(pb::EchoResponse {
            message: message.message,
            principal_id: principal.id,
            tenant_id: principal.tenant_id.to_string(),
        }))
    }

    async fn admin_echo(
        &self,
        request: Request<pb::AdminEchoRequest>,
    ) -> Result<Response<pb::AdminEchoResponse>, Status> {
        Ok(Response::new(pb::AdminEchoResponse {
            message: request.into_inner().message,
        }))
    }

    async fn read_messages(
        &self,
        request: Request<pb::ReadMessagesRequest>,
    ) -> Result<Response<pb::ReadMessagesResponse>, Status> {
        let principal = caller(&request)?.clone();
        let mut violations = Violations::new();
        let requested = violations.uuid("tenant_id", &request.get_ref().tenant_id);
        violations.finish()?;
        let tenant = tenant_scope(&principal, requested)?;
        Ok(Response::new(pb::ReadMessagesResponse {
            tenant_id: tenant.to_string(),
        }))
    }

    async fn unlisted(
        &self,
        _request: Request<pb::UnlistedRequest>,
    ) -> Result<Response<pb::UnlistedResponse>, Status> {
        // Reaching this would mean the access table failed open.
        Err(ApiError::internal(&"unlisted rpc reached its handler").into())
    }
}

/// The echo service, ready for `penny_platform::serve`.
pub fn bundle() -> ServiceBundle {
    ServiceBundle {
        name: "echo",
        routes: tonic::service::Routes::new(EchoServiceServer::new(Echo)),
        grpc_services: vec![SERVICE],
        policy: AccessPolicy::new()
            .rpc(SERVICE, "Echo", Requirement::Authenticated)
            .rpc(SERVICE, "AdminEcho", Requirement::PlatformAdmin)
            .rpc(
                SERVICE,
                "ReadMessages",
                Requirement::Permission("message:read"),
            ),
        descriptors: vec![pb::FILE_DESCRIPTOR_SET],
        readiness: always_ready(),
    }
}
