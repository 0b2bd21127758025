//! The gRPC face of the files service: decode, validate, scope to the caller's tenant,
//! call the service, map errors. Thin.

use penny_platform::page::{decode_page_token, encode_page_token, page_token_error};
use penny_platform::stack::{caller, tenant_scope};
use penny_platform::validate::{Violations, page_size};
use penny_platform::wire::timestamp;
use penny_platform::{
    AccessPolicy, ApiError, Principal, Reason, Requirement, ServeConfig, ServiceBundle,
};
use penny_proto::common::v1 as common_pb;
use penny_proto::files::v1 as pb;
use penny_proto::files::v1::file_service_server::{FileService, FileServiceServer};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::SERVICE_NAME;
use crate::content::ContentType;
use crate::domain::{
    MAX_CHUNK_BYTES, MAX_FILE_BYTES, MAX_FILENAME_BYTES, MAX_FILES, RewrapState, ScanStatus,
    StoredFile,
};
use crate::service::{Files, Header, UploadPart, UploadParts};
use crate::signed::{DEFAULT_TTL, MAX_TTL};
use crate::store::ListFilter;

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
/// Longest declared content type read.
const MAX_DECLARED_TYPE: usize = 255;
/// How long `RewrapTenant` with `wait` waits for the job at most.
const REWRAP_WAIT: std::time::Duration = std::time::Duration::from_secs(20);
/// How long before the caller's own deadline `RewrapTenant` stops waiting, to answer in
/// time.
const REWRAP_ANSWER_MARGIN: std::time::Duration = std::time::Duration::from_millis(500);

/// Who may call what: uploads need `file:upload` (the guide's `member` role), reads and
/// signed URLs `file:read` (its `viewer` role), deletion `file:delete` (no built-in tenant
/// role holds it: platform staff, fleet services, or a custom role made by someone who may
/// grant it); rewrapping a tenant's keys is for fleet services and platform staff.
/// Every handler then refuses other tenants' ids with NOT_FOUND.
pub(crate) fn policy() -> AccessPolicy {
    use Requirement::Permission;
    [
        ("Upload", Permission("file:upload")),
        ("GetFile", Permission("file:read")),
        ("ListFiles", Permission("file:read")),
        ("Download", Permission("file:read")),
        ("DeleteFile", Permission("file:delete")),
        ("CreateSignedUrl", Permission("file:read")),
        ("RewrapTenant", Requirement::ServiceOrAdmin),
        ("PurgeTenantFiles", Requirement::ServiceOrAdmin),
    ]
    .into_iter()
    .fold(AccessPolicy::new(), |policy, (method, requirement)| {
        policy.rpc(SERVICE_NAME, method, requirement)
    })
}

pub(crate) fn bundle(files: Files, serve_config: &ServeConfig) -> ServiceBundle {
    let probe = files.clone();
    let server = FileServiceServer::new(FileGrpc {
        files,
        request_timeout: serve_config.request_timeout,
    })
    .max_decoding_message_size(serve_config.max_message_bytes)
    .max_encoding_message_size(serve_config.max_message_bytes);
    ServiceBundle {
        name: "files",
        routes: tonic::service::Routes::new(server),
        grpc_services: vec![SERVICE_NAME],
        policy: policy(),
        descriptors: vec![penny_proto::FILE_DESCRIPTOR_SET],
        readiness: std::sync::Arc::new(move || {
            let files = probe.clone();
            Box::pin(async move { files.ready().await })
        }),
    }
}

struct FileGrpc {
    files: Files,
    /// The server's request deadline, which cuts off every call.
    request_timeout: std::time::Duration,
}

/// How long `RewrapTenant` may wait for its job: [`REWRAP_WAIT`] at most, ending
/// [`REWRAP_ANSWER_MARGIN`] before the first of the server's request deadline and the
/// caller's own.
fn rewrap_wait(
    request_timeout: std::time::Duration,
    caller_timeout: Option<std::time::Duration>,
) -> std::time::Duration {
    let deadline = caller_timeout.map_or(request_timeout, |t| t.min(request_timeout));
    deadline
        .saturating_sub(REWRAP_ANSWER_MARGIN)
        .min(REWRAP_WAIT)
}

fn scan_status_out(status: ScanStatus) -> pb::ScanStatus {
    match status {
        ScanStatus::Pending => pb::ScanStatus::Pending,
        ScanStatus::Clean => pb::ScanStatus::Clean,
        ScanStatus::Infected => pb::ScanStatus::Infected,
        ScanStatus::Unscannable => pb::ScanStatus::Unscannable,
    }
}

fn file_out(f: &StoredFile) -> pb::File {
    pb::File {
        id: f.id.to_string(),
        tenant_id: f.tenant_id.to_string(),
        workspace_id: f.workspace_id.map(|w| w.to_string()).unwrap_or_default(),
        owner_id: f.owner_id.clone(),
        display_name: f.display_name.clone(),
        content_type: f.content_type.clone(),
        size_bytes: f.size_bytes,
        sha256: f.sha256.to_vec(),
        scan_status: scan_status_out(f.scan_status) as i32,
        scan_signature: f.scan_signature.clone(),
        scanner_version: f.scanner_version.clone(),
        scan_time: f.scan_time.map(timestamp),
        key_version: f.key_version,
        create_time: Some(timestamp(f.created_at)),
    }
}

/// Validates `tenant_id` and `file_id` and scopes the tenant to the caller.
fn file_ref(
    principal: &Principal,
    tenant_id: &str,
    file_id: &str,
) -> Result<(Uuid, Uuid), ApiError> {
    let mut v = Violations::new();
    let tenant = v.uuid("tenant_id", tenant_id);
    let file = v.uuid("file_id", file_id);
    v.finish()?;
    Ok((tenant_scope(principal, tenant)?, file))
}

/// An Upload stream, decoded and checked message by message.
struct UploadStream<'a> {
    stream: Streaming<pb::UploadRequest>,
    principal: &'a Principal,
    tenant: Option<Uuid>,
    files: usize,
}

impl UploadStream<'_> {
    fn header(&mut self, h: pb::FileHeader) -> Result<Header, ApiError> {
        self.files += 1;
        if self.files > MAX_FILES {
            return Err(ApiError::new(
                tonic::Code::InvalidArgument,
                Reason::TooManyFiles,
                format!("an upload holds at most {MAX_FILES} files; nothing from it was stored"),
            ));
        }
        let mut v = Violations::new();
        let tenant = v.uuid("header.tenant_id", &h.tenant_id);
        let workspace = if h.workspace_id.is_empty() {
            None
        } else {
            Some(v.uuid("header.workspace_id", &h.workspace_id))
        };
        if h.filename.is_empty() || h.filename.len() > MAX_FILENAME_BYTES {
            v.add(
                "header.filename",
                format!("must be 1 to {MAX_FILENAME_BYTES} bytes"),
            );
        }
        if h.declared_content_type.is_empty() || h.declared_content_type.len() > MAX_DECLARED_TYPE {
            v.add(
                "header.declared_content_type",
                format!("required, at most {MAX_DECLARED_TYPE} bytes"),
            );
        }
        let expected_sha256 = match h.expected_sha256.len() {
            0 => None,
            32 => h.expected_sha256.as_slice().try_into().ok(),
            _ => {
                v.add("header.expected_sha256", "must be empty or 32 bytes");
                None
            }
        };
        v.finish()?;
        if self.tenant.is_some_and(|first| first != tenant) {
            return Err(ApiError::invalid_field(
                "header.tenant_id",
                "every file of an upload must name the same tenant",
            ));
        }
        let tenant = tenant_scope(self.principal, tenant)?;
        self.tenant = Some(tenant);
        if h.declared_size_bytes
            .is_some_and(|size| size > MAX_FILE_BYTES)
        {
            return Err(ApiError::new(
                tonic::Code::ResourceExhausted,
                Reason::FileTooLarge,
                format!(
                    "files are at most {MAX_FILE_BYTES} bytes; nothing from this upload was stored"
                ),
            ));
        }
        Ok(Header {
            tenant,
            workspace,
            declared: ContentType::parse(&h.declared_content_type),
            declared_text: h.declared_content_type.chars().take(64).collect(),
            filename: h.filename,
            expected_sha256,
        })
    }
}

#[async_trait::async_trait]
impl UploadParts for UploadStream<'_> {
    async fn next_part(&mut self) -> Result<Option<UploadPart>, ApiError> {
        let message = match self.stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(None),
            Err(status) => {
                return Err(ApiError::new(
                    status.code(),
                    Reason::InvalidArgument,
                    "the upload stream failed; nothing from it was stored",
                ));
            }
        };
        match message.part {
            Some(pb::upload_request::Part::Header(header)) => {
                self.header(header).map(|h| Some(UploadPart::Header(h)))
            }
            Some(pb::upload_request::Part::Chunk(chunk)) => {
                if chunk.is_empty() || chunk.len() > MAX_CHUNK_BYTES {
                    return Err(ApiError::invalid_field(
                        "chunk",
                        format!("a chunk holds 1 to {MAX_CHUNK_BYTES} bytes"),
                    ));
                }
                Ok(Some(UploadPart::Chunk(chunk)))
            }
            None => Err(ApiError::invalid_field(
                "part",
                "each message holds a header or a chunk",
            )),
        }
    }
}

fn error_out(reason: Reason, message: String) -> common_pb::BatchItemError {
    // The codes `common.proto` gives each reason.
    let code = match reason {
        Reason::FileInfected | Reason::FileUnscannable => tonic::Code::FailedPrecondition,
        _ => tonic::Code::InvalidArgument,
    };
    common_pb::BatchItemError {
        code: code as i32,
        reason: reason as i32,
        message,
        field: String::new(),
    }
}

#[tonic::async_trait]
impl FileService for FileGrpc {
    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadRequest>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let principal = caller(&request)?.clone();
        let mut parts = UploadStream {
            stream: request.into_inner(),
            principal: &principal,
            tenant: None,
            files: 0,
        };
        let results = self.files.upload(&principal, &mut parts).await?;
        Ok(Response::new(pb::UploadResponse {
            results: results
                .into_iter()
                .map(|r| pb::UploadResult {
                    filename: r.filename,
                    result: Some(match r.outcome {
                        Ok(file) => pb::upload_result::Result::File(file_out(&file)),
                        Err((reason, message)) => {
                            pb::upload_result::Result::Error(error_out(reason, message))
                        }
                    }),
                })
                .collect(),
        }))
    }

    async fn get_file(
        &self,
        request: Request<pb::GetFileRequest>,
    ) -> Result<Response<pb::GetFileResponse>, Status> {
        let principal = caller(&request)?;
        let r = request.get_ref();
        let (tenant, id) = file_ref(principal, &r.tenant_id, &r.file_id)?;
        let file = self.files.get(tenant, id).await?;
        Ok(Response::new(pb::GetFileResponse {
            file: Some(file_out(&file)),
        }))
    }

    async fn list_files(
        &self,
        request: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        let principal = caller(&request)?;
        let r = request.get_ref();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &r.tenant_id);
        let workspace =
            (!r.workspace_id.is_empty()).then(|| v.uuid("workspace_id", &r.workspace_id));
        if r.owner_id.len() > 256 {
            v.add("owner_id", "at most 256 bytes");
        }
        let scan_status = match pb::ScanStatus::try_from(r.scan_status) {
            Ok(pb::ScanStatus::Unspecified) => None,
            Ok(pb::ScanStatus::Pending) => Some(ScanStatus::Pending),
            Ok(pb::ScanStatus::Clean) => Some(ScanStatus::Clean),
            Ok(pb::ScanStatus::Infected) => Some(ScanStatus::Infected),
            Ok(pb::ScanStatus::Unscannable) => Some(ScanStatus::Unscannable),
            Err(_) => {
                v.add("scan_status", "not a scan status");
                None
            }
        };
        let limit = page_size(&mut v, r.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE);
        v.finish()?;
        let tenant = tenant_scope(principal, tenant)?;
        let before = match decode_page_token(&r.page_token)? {
            Some(cursor) => Some(Uuid::try_parse(&cursor).map_err(|_| page_token_error())?),
            None => None,
        };
        let filter = ListFilter {
            workspace,
            owner: (!r.owner_id.is_empty()).then(|| r.owner_id.clone()),
            scan_status,
        };
        let mut files = self
            .files
            .list(tenant, &filter, before, u64::from(limit) + 1)
            .await?;
        let more = files.len() > limit as usize;
        files.truncate(limit as usize);
        let next_page_token = match (more, files.last()) {
            (true, Some(last)) => encode_page_token(&last.id.to_string()),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListFilesResponse {
            files: files.iter().map(file_out).collect(),
            next_page_token,
        }))
    }

    type DownloadStream = ReceiverStream<Result<pb::DownloadResponse, Status>>;

    async fn download(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let principal = caller(&request)?;
        let r = request.get_ref();
        let (tenant, id) = file_ref(principal, &r.tenant_id, &r.file_id)?;
        let (file, mut reader) = self.files.open(principal, tenant, id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let first = pb::DownloadResponse {
                part: Some(pb::download_response::Part::File(file_out(&file))),
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            while let Some(next) = reader.next().await {
                let message = match next {
                    Ok(bytes) if bytes.is_empty() => continue,
                    Ok(bytes) => Ok(pb::DownloadResponse {
                        part: Some(pb::download_response::Part::Chunk(bytes.into())),
                    }),
                    Err(err) => Err(Status::from(err)),
                };
                let failed = message.is_err();
                if tx.send(message).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn create_signed_url(
        &self,
        request: Request<pb::CreateSignedUrlRequest>,
    ) -> Result<Response<pb::CreateSignedUrlResponse>, Status> {
        let principal = caller(&request)?;
        let r = request.get_ref();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &r.tenant_id);
        let file = v.uuid("file_id", &r.file_id);
        let ttl = match &r.ttl {
            None => DEFAULT_TTL,
            Some(ttl) => match u64::try_from(ttl.seconds) {
                Ok(secs) if ttl.nanos == 0 && secs >= 1 && secs <= MAX_TTL.as_secs() => {
                    std::time::Duration::from_secs(secs)
                }
                _ => {
                    v.add(
                        "ttl",
                        format!("whole seconds from 1 to {} (7 days)", MAX_TTL.as_secs()),
                    );
                    DEFAULT_TTL
                }
            },
        };
        v.finish()?;
        let tenant = tenant_scope(principal, tenant)?;
        let (url, expire_time) = self
            .files
            .create_signed_url(principal, tenant, file, ttl)
            .await?;
        Ok(Response::new(pb::CreateSignedUrlResponse {
            url,
            expire_time: Some(timestamp(expire_time)),
        }))
    }

    async fn rewrap_tenant(
        &self,
        request: Request<pb::RewrapTenantRequest>,
    ) -> Result<Response<pb::RewrapTenantResponse>, Status> {
        let principal = caller(&request)?;
        let r = request.get_ref();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &r.tenant_id);
        v.finish()?;
        let tenant = tenant_scope(principal, tenant)?;
        // Counted from now: what the call does before it waits comes out of the wait.
        let wait_until = r.wait.then(|| {
            let caller = penny_platform::wire::caller_timeout(request.metadata());
            tokio::time::Instant::now() + rewrap_wait(self.request_timeout, caller)
        });
        let status = self.files.rewrap_tenant(tenant, wait_until).await?;
        let job = &status.job;
        Ok(Response::new(pb::RewrapTenantResponse {
            tenant_id: job.tenant_id.to_string(),
            state: match job.state {
                RewrapState::Running => pb::RewrapState::Running,
                RewrapState::Succeeded => pb::RewrapState::Succeeded,
                RewrapState::Failed => pb::RewrapState::Failed,
            } as i32,
            target_key_version: job.target_key_version,
            total_files: job.total_files,
            rewrapped_files: job.rewrapped_files,
            failed_files: job.failed_files,
            min_key_version_in_use: status.min_key_version_in_use,
            start_time: Some(timestamp(job.started_at)),
            end_time: job.ended_at.map(timestamp),
        }))
    }

    async fn delete_file(
        &self,
        request: Request<pb::DeleteFileRequest>,
    ) -> Result<Response<pb::DeleteFileResponse>, Status> {
        let principal = caller(&request)?;
        let r = request.get_ref();
        let (tenant, id) = file_ref(principal, &r.tenant_id, &r.file_id)?;
        self.files.delete(principal, tenant, id).await?;
        Ok(Response::new(pb::DeleteFileResponse {}))
    }

    async fn purge_tenant_files(
        &self,
        request: Request<pb::PurgeTenantFilesRequest>,
    ) -> Result<Response<pb::PurgeTenantFilesResponse>, Status> {
        let principal = caller(&request)?;
        let r = request.get_ref();
        let mut v = Violations::new();
        let tenant = v.uuid("tenant_id", &r.tenant_id);
        v.finish()?;
        let tenant = tenant_scope(principal, tenant)?;
        let (deleted_files, done) = self.files.purge_tenant(principal, tenant).await?;
        Ok(Response::new(pb::PurgeTenantFilesResponse {
            deleted_files,
            done,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::rewrap_wait;

    #[test]
    fn the_rewrap_wait_ends_before_the_first_deadline() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // The server's default deadline and no caller's: the 20 s cap.
        assert_eq!(rewrap_wait(s(30), None), s(20));
        // A shorter server deadline, or a shorter caller's, less the margin.
        assert_eq!(rewrap_wait(s(10), None), ms(9_500));
        assert_eq!(rewrap_wait(s(30), Some(s(5))), ms(4_500));
        assert_eq!(rewrap_wait(s(5), Some(s(60))), ms(4_500));
        // Less time than the margin: no wait at all.
        assert_eq!(rewrap_wait(s(30), Some(ms(200))), Duration::ZERO);
    }
}
