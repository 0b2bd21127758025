//! The gRPC face of the audit service: decode, validate, call the service, map errors.

use std::pin::Pin;

use penny_platform::page::{decode_page_token, encode_page_token, page_token_error};
use penny_platform::stack::{caller, draining, tenant_scope};
use penny_platform::validate::{Violations, page_size};
use penny_platform::{AccessPolicy, ApiError, Reason, Requirement, ServeConfig, ServiceBundle};
use penny_proto::audit::v1 as pb;
use penny_proto::audit::v1::audit_service_server::{AuditService, AuditServiceServer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::SERVICE_NAME;
use crate::chain::Failure;
use crate::service::{Audit, MAX_APPEND, to_proto};
use crate::store::{Filter, RedactTarget};

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
/// Most event ids in one Redact.
const MAX_REDACT_IDS: usize = 1000;
/// Events read per page while exporting.
const EXPORT_PAGE: u64 = 1000;
/// Largest `data` of one export message (less when the server's message limit is lower).
const EXPORT_MESSAGE_BYTES: usize = 1024 * 1024;

/// Producers append; readers need `audit:read` and redaction `audit:redact` in their own
/// tenant (fleet services and platform staff pass, in any tenant).
pub(crate) fn policy() -> AccessPolicy {
    use Requirement::{Permission, Service};
    [
        ("Append", Service),
        ("Query", Permission("audit:read")),
        ("Export", Permission("audit:read")),
        ("VerifyChain", Permission("audit:read")),
        ("GetCheckpoint", Permission("audit:read")),
        ("Redact", Permission("audit:redact")),
        ("ListAlerts", Permission("alert:read")),
        ("WatchAlerts", Permission("alert:read")),
        ("AckAlert", Permission("alert:ack")),
    ]
    .into_iter()
    .fold(AccessPolicy::new(), |policy, (method, requirement)| {
        policy.rpc(SERVICE_NAME, method, requirement)
    })
}

pub(crate) fn bundle(audit: Audit, serve_config: &ServeConfig) -> ServiceBundle {
    let probe = audit.clone();
    // Replies stay well inside the server's message limit: half of it for a Query page or
    // an export message (whose lines are whole).
    let reply_budget = (serve_config.max_message_bytes / 2).max(1);
    let server = AuditServiceServer::new(AuditGrpc {
        audit,
        reply_budget,
    })
    .max_decoding_message_size(serve_config.max_message_bytes)
    .max_encoding_message_size(serve_config.max_message_bytes);
    ServiceBundle {
        name: "audit",
        routes: tonic::service::Routes::new(server),
        grpc_services: vec![SERVICE_NAME],
        policy: policy(),
        descriptors: vec![penny_proto::FILE_DESCRIPTOR_SET],
        readiness: std::sync::Arc::new(move || {
            let audit = probe.clone();
            Box::pin(async move { audit.store().ping().await })
        }),
    }
}

struct AuditGrpc {
    audit: Audit,
    /// The most bytes one reply (a Query page, an export message) may hold.
    reply_budget: usize,
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportResponse, Status>> + Send>>;
type AlertStream = Pin<Box<dyn Stream<Item = Result<pb::WatchAlertsResponse, Status>> + Send>>;

/// Most alerts one ListAlerts page holds.
const MAX_ALERT_PAGE: u32 = 1000;
/// Longest acknowledgement note.
const MAX_NOTE_LEN: usize = 1024;

/// The tenant an alert call names: empty means every tenant (`None`), which only fleet
/// services and platform staff may ask for.
fn alert_scope(
    principal: &penny_platform::Principal,
    v: &mut Violations,
    tenant: &str,
) -> Result<Option<Uuid>, Status> {
    if tenant.is_empty() {
        if principal.is_service() || principal.is_platform_admin() {
            return Ok(None);
        }
        v.add(
            "tenant_id",
            "required: only platform staff see every tenant's alerts",
        );
        return Ok(None);
    }
    let tenant = v.uuid("tenant_id", tenant);
    Ok(Some(tenant))
}

fn severity_filter(v: &mut Violations, value: i32) -> Option<i32> {
    match pb::AlertSeverity::try_from(value) {
        Ok(pb::AlertSeverity::Unspecified) => None,
        Ok(severity) => Some(severity as i32),
        Err(_) => {
            v.add("min_severity", "must be an AlertSeverity");
            None
        }
    }
}

fn alert_cursor(token: &str) -> Result<Option<(i64, Uuid)>, Status> {
    let Some(cursor) = decode_page_token(token)? else {
        return Ok(None);
    };
    cursor
        .split_once(':')
        .and_then(|(at, id)| Some((at.parse().ok()?, Uuid::try_parse(id).ok()?)))
        .map(Some)
        .ok_or_else(|| page_token_error().into())
}

fn failure_number(failure: Failure) -> pb::ChainFailure {
    match failure {
        Failure::HashMismatch => pb::ChainFailure::HashMismatch,
        Failure::PrevHashMismatch => pb::ChainFailure::PrevHashMismatch,
        Failure::SequenceGap => pb::ChainFailure::SequenceGap,
        Failure::CheckpointMismatch => pb::ChainFailure::CheckpointMismatch,
        Failure::CheckpointSignatureInvalid => pb::ChainFailure::CheckpointSignatureInvalid,
        Failure::RedactionInvalid => pb::ChainFailure::RedactionInvalid,
    }
}

fn micros(at: &prost_types::Timestamp) -> Option<i64> {
    if !(0..1_000_000_000).contains(&at.nanos) {
        return None;
    }
    at.seconds
        .checked_mul(1_000_000)?
        .checked_add(i64::from(at.nanos) / 1000)
}

/// The cursor of a Query page token: the direction and the last sequence returned.
fn query_cursor(token: &str, newest_first: bool) -> Result<Option<u64>, Status> {
    let Some(cursor) = decode_page_token(token)? else {
        return Ok(None);
    };
    let expected = if newest_first { 'd' } else { 'a' };
    cursor
        .strip_prefix(expected)
        .and_then(|rest| rest.strip_prefix(':'))
        .and_then(|n| n.parse().ok())
        .map(Some)
        .ok_or_else(|| page_token_error().into())
}

#[tonic::async_trait]
impl AuditService for AuditGrpc {
    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let producer = caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        v.count("events", request.events.len(), 1, MAX_APPEND);
        v.finish()?;
        let results = self.audit.append(&producer, &request.events).await?;
        Ok(Response::new(pb::AppendResponse { results }))
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        let optional = |value: &str| (!value.is_empty()).then(|| value.to_owned());
        // Compared in canonical form, as stored.
        let user_id =
            (!request.user_id.is_empty()).then(|| v.uuid("user_id", &request.user_id).to_string());
        if !request.action.is_empty() {
            v.token("action", &request.action, 128);
        }
        if !request.resource.is_empty() {
            v.token("resource", &request.resource, 64);
        }
        v.text("resource_id", &request.resource_id, 0, 256);
        let outcome = match pb::Outcome::try_from(request.outcome) {
            Ok(pb::Outcome::Unspecified) => None,
            Ok(outcome) => Some(outcome as i32),
            Err(_) => {
                v.add("outcome", "must be an Outcome");
                None
            }
        };
        let start = request.start_time.as_ref().map(micros);
        let end = request.end_time.as_ref().map(micros);
        if matches!(start, Some(None)) {
            v.add("start_time", "must be a valid time");
        }
        if matches!(end, Some(None)) {
            v.add("end_time", "must be a valid time");
        }
        if let (Some(Some(start)), Some(Some(end))) = (start, end)
            && start >= end
        {
            v.add("end_time", "must be after start_time");
        }
        let limit = page_size(&mut v, request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE);
        v.finish()?;
        let cursor = query_cursor(&request.page_token, request.newest_first)?;
        let tenant = tenant_scope(&principal, tenant)?;
        let filter = Filter {
            user_id,
            action: optional(&request.action),
            resource: optional(&request.resource),
            resource_id: optional(&request.resource_id),
            outcome,
            start_micros: start.flatten(),
            end_micros: end.flatten(),
        };
        let mut events = self
            .audit
            .query(
                tenant,
                &filter,
                cursor,
                request.newest_first,
                u64::from(limit) + 1,
            )
            .await?;
        // At most `limit` events, and no more than fit the reply budget (at least one).
        let mut bytes = 0;
        let mut fit = 0;
        for event in events.iter().take(limit as usize) {
            bytes += prost::Message::encoded_len(&to_proto(event));
            if fit > 0 && bytes > self.reply_budget {
                break;
            }
            fit += 1;
        }
        let next_page_token = if events.len() > fit {
            events.truncate(fit);
            let last = events.last().map_or(0, |e| e.record.sequence);
            let direction = if request.newest_first { 'd' } else { 'a' };
            encode_page_token(&format!("{direction}:{last}"))
        } else {
            String::new()
        };
        Ok(Response::new(pb::QueryResponse {
            events: events.iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    type ExportStream = ExportStream;

    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let principal = caller(&request)?.clone();
        let mut draining = draining(&request);
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        if request.end_sequence != 0 && request.end_sequence < request.start_sequence {
            v.add("end_sequence", "must not be before start_sequence");
        }
        v.finish()?;
        let tenant = tenant_scope(&principal, tenant)?;
        let (head, _) = self.audit.head(tenant).await?;
        let end = if request.end_sequence == 0 {
            head
        } else {
            request.end_sequence.min(head)
        };
        let audit = self.audit.clone();
        let message_bytes = EXPORT_MESSAGE_BYTES.min(self.reply_budget);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ExportResponse, Status>>(4);
        tokio::spawn(async move {
            let mut next = request.start_sequence.max(1);
            let mut data = Vec::new();
            let mut last = 0;
            while next <= end {
                let page = tokio::select! {
                    page = audit.scan(tenant, next, end, EXPORT_PAGE) => page,
                    () = draining.started() => {
                        let _ = tx.send(Err(Status::unavailable("the server is shutting down; resume from the last sequence received"))).await;
                        return;
                    }
                };
                let page = match page {
                    Ok(page) => page,
                    Err(err) => {
                        let _ = tx.send(Err(Status::from(err))).await;
                        return;
                    }
                };
                let Some(tail) = page.last() else { break };
                next = tail.record.sequence + 1;
                for event in &page {
                    let line = crate::export::json_line(event);
                    if !data.is_empty() && data.len() + line.len() > message_bytes {
                        let message = pb::ExportResponse {
                            data: std::mem::take(&mut data),
                            last_sequence: last,
                        };
                        if tx.send(Ok(message)).await.is_err() {
                            return;
                        }
                    }
                    data.extend_from_slice(line.as_bytes());
                    last = event.record.sequence;
                }
                if (page.len() as u64) < EXPORT_PAGE {
                    break;
                }
            }
            if !data.is_empty() {
                let _ = tx
                    .send(Ok(pb::ExportResponse {
                        data,
                        last_sequence: last,
                    }))
                    .await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn verify_chain(
        &self,
        request: Request<pb::VerifyChainRequest>,
    ) -> Result<Response<pb::VerifyChainResponse>, Status> {
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        if request.end_sequence != 0 && request.end_sequence < request.start_sequence {
            v.add("end_sequence", "must not be before start_sequence");
        }
        v.finish()?;
        let tenant = tenant_scope(&principal, tenant)?;
        let verification = self
            .audit
            .verify(tenant, request.start_sequence, request.end_sequence)
            .await?;
        let (head_sequence, head_hash) = verification.head;
        let response = match verification.broken {
            None => pb::VerifyChainResponse {
                valid: true,
                verified_count: verification.verified,
                first_bad_sequence: None,
                failure: pb::ChainFailure::Unspecified as i32,
                message: String::new(),
                head_sequence,
                head_hash: head_hash.to_vec(),
            },
            Some(broken) => {
                tracing::warn!(
                    tenant = %tenant,
                    sequence = broken.sequence,
                    failure = ?broken.failure,
                    "audit chain failed verification"
                );
                pb::VerifyChainResponse {
                    valid: false,
                    verified_count: verification.verified,
                    first_bad_sequence: Some(broken.sequence),
                    failure: failure_number(broken.failure) as i32,
                    message: broken.message,
                    head_sequence,
                    head_hash: head_hash.to_vec(),
                }
            }
        };
        Ok(Response::new(response))
    }

    async fn get_checkpoint(
        &self,
        request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        v.finish()?;
        let tenant = tenant_scope(&principal, tenant)?;
        let checkpoint = self
            .audit
            .checkpoint(tenant, request.sequence)
            .await?
            .ok_or_else(|| {
                Status::from(ApiError::not_found(
                    Reason::NotFound,
                    "no checkpoint of this chain yet",
                ))
            })?;
        Ok(Response::new(pb::GetCheckpointResponse {
            checkpoint: Some(pb::Checkpoint {
                tenant_id: checkpoint.tenant_id.to_string(),
                sequence: checkpoint.sequence,
                hash: checkpoint.hash.to_vec(),
                create_time: Some(crate::service::timestamp(checkpoint.create_micros)),
                signed_payload: checkpoint.signed_payload,
                signature: checkpoint.signature,
                key_id: checkpoint.key_id,
                public_key: checkpoint.public_key,
            }),
        }))
    }

    async fn redact(
        &self,
        request: Request<pb::RedactRequest>,
    ) -> Result<Response<pb::RedactResponse>, Status> {
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &request.tenant_id);
        let target = match (request.user_id.is_empty(), request.event_ids.is_empty()) {
            (false, true) => RedactTarget::User(v.uuid("user_id", &request.user_id).to_string()),
            (true, false) => {
                v.count("event_ids", request.event_ids.len(), 1, MAX_REDACT_IDS);
                let ids: Vec<Uuid> = request
                    .event_ids
                    .iter()
                    .enumerate()
                    .take(MAX_REDACT_IDS)
                    .map(|(i, id)| v.uuid(&format!("event_ids[{i}]"), id))
                    .collect();
                RedactTarget::Events(ids)
            }
            _ => {
                v.add("user_id", "exactly one of user_id or event_ids is required");
                RedactTarget::Events(Vec::new())
            }
        };
        v.text("reason", &request.reason, 1, 512);
        let erasure_id = if request.erasure_id.is_empty() {
            None
        } else {
            Some(v.uuid("erasure_id", &request.erasure_id))
        };
        v.finish()?;
        let tenant = tenant_scope(&principal, tenant)?;
        let redacted = self
            .audit
            .redact(&principal, tenant, &target, &request.reason, erasure_id)
            .await?;
        tracing::info!(tenant = %tenant, redacted, "audit payloads redacted");
        Ok(Response::new(pb::RedactResponse {
            redacted_count: redacted,
        }))
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = alert_scope(&principal, &mut v, &request.tenant_id)?;
        let state = match pb::AlertState::try_from(request.state) {
            Ok(pb::AlertState::Unspecified) => None,
            Ok(state) => Some(state as i32),
            Err(_) => {
                v.add("state", "must be an AlertState");
                None
            }
        };
        let min_severity = severity_filter(&mut v, request.min_severity);
        let start = request.start_time.as_ref().map(micros);
        let end = request.end_time.as_ref().map(micros);
        if matches!(start, Some(None)) {
            v.add("start_time", "must be a valid time");
        }
        if matches!(end, Some(None)) {
            v.add("end_time", "must be a valid time");
        }
        let limit = page_size(&mut v, request.page_size, DEFAULT_PAGE_SIZE, MAX_ALERT_PAGE);
        v.finish()?;
        let cursor = alert_cursor(&request.page_token)?;
        let tenant = tenant
            .map(|tenant| tenant_scope(&principal, tenant))
            .transpose()?;
        let filter = crate::monitor::AlertFilter {
            tenant,
            state,
            min_severity,
            start_micros: start.flatten(),
            end_micros: end.flatten(),
        };
        let mut alerts = self
            .audit
            .monitor()
            .list(&filter, cursor, u64::from(limit) + 1)
            .await
            .map_err(crate::error::AuditError::from)?;
        let next_page_token = if alerts.len() > limit as usize {
            alerts.truncate(limit as usize);
            alerts
                .last()
                .map(|last| {
                    let at = last.create_time.as_ref().and_then(micros).unwrap_or(0);
                    encode_page_token(&format!("{at}:{}", last.id))
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListAlertsResponse {
            alerts,
            next_page_token,
        }))
    }

    type WatchAlertsStream = AlertStream;

    async fn watch_alerts(
        &self,
        request: Request<pb::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let principal = caller(&request)?.clone();
        let mut draining = draining(&request);
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = alert_scope(&principal, &mut v, &request.tenant_id)?;
        let min_severity = severity_filter(&mut v, request.min_severity).unwrap_or(0);
        v.finish()?;
        let tenant = tenant
            .map(|tenant| tenant_scope(&principal, tenant))
            .transpose()?
            .map(|t| t.to_string());
        let mut feed = self.audit.monitor().subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let alert = tokio::select! {
                    alert = feed.recv() => alert,
                    () = tx.closed() => return,
                    // The server is shutting down: end the stream; watchers reconnect.
                    () = draining.started() => return,
                };
                let message = match alert {
                    Ok(alert) => {
                        if tenant.as_ref().is_some_and(|t| *t != alert.tenant_id)
                            || alert.severity < min_severity
                        {
                            continue;
                        }
                        Ok(pb::WatchAlertsResponse {
                            alert: Some((*alert).clone()),
                        })
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Err(ApiError::new(
                        tonic::Code::ResourceExhausted,
                        Reason::Overloaded,
                        "this watcher fell behind the alert feed; list what it missed with ListAlerts and watch again",
                    )
                    .into()),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let last = message.is_err();
                if tx.send(message).await.is_err() || last {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack_alert(
        &self,
        request: Request<pb::AckAlertRequest>,
    ) -> Result<Response<pb::AckAlertResponse>, Status> {
        let principal = caller(&request)?.clone();
        let request = request.into_inner();
        let mut v = Violations::new();
        let tenant = if request.tenant_id.is_empty() {
            penny_platform::principal::PLATFORM_TENANT_ID
        } else {
            v.uuid("tenant_id", &request.tenant_id)
        };
        let alert = v.uuid("alert_id", &request.alert_id);
        v.text("note", &request.note, 0, MAX_NOTE_LEN);
        v.finish()?;
        let tenant = tenant_scope(&principal, tenant)?;
        let alert = self
            .audit
            .monitor()
            .ack(&principal, tenant, alert, &request.note)
            .await
            .map_err(crate::error::AuditError::from)?
            .ok_or_else(|| ApiError::not_found(Reason::NotFound, "no such alert"))?;
        Ok(Response::new(pb::AckAlertResponse { alert: Some(alert) }))
    }
}
