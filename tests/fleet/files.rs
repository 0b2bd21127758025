//! The files service: streaming upload with limits, content sniffing, a real clamd,
//! encryption at rest, downloads that catch tampering, and nothing left behind by a
//! refused, aborted or interrupted upload.

use std::path::{Path, PathBuf};
use std::time::Duration;

use penny_proto::audit::v1 as audit_pb;
use penny_proto::audit::v1::audit_service_client::AuditServiceClient;
use penny_proto::authz::v1 as authz_pb;
use penny_proto::authz::v1::authz_service_client::AuthzServiceClient;
use penny_proto::common::v1::PrincipalKind;
use penny_proto::files::v1 as pb;
use penny_proto::files::v1::file_service_client::FileServiceClient;
use penny_proto::keys::v1 as keys_pb;
use penny_proto::keys::v1::key_service_client::KeyServiceClient;
use penny_tests::clamd::{EICAR, EICAR_SIGNATURE};

use crate::audit_client::all_events;
use penny_tests::{
    TestFleet, TestFleetBuilder, assert_eventually, error_reason, hidden_file_rows, with_token,
};
use sha2::Digest as _;
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

const PNG: &[u8] =
    b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";
const PDF: &[u8] =
    b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n";
const MB: usize = 1024 * 1024;

struct Harness {
    fleet: TestFleet,
    files: FileServiceClient<Channel>,
    tenant: Uuid,
    user: Uuid,
    /// A member and viewer of `tenant`: may upload and read.
    token: String,
}

async fn bind(fleet: &TestFleet, tenant: Uuid, user: Uuid, roles: &[&str]) {
    let mut authz = AuthzServiceClient::new(fleet.authz().server.channel().await);
    for role in roles {
        authz
            .grant_role(with_token(
                authz_pb::GrantRoleRequest {
                    tenant_id: tenant.to_string(),
                    subject: Some(authz_pb::Subject {
                        kind: PrincipalKind::User as i32,
                        id: user.to_string(),
                        tenant_id: tenant.to_string(),
                    }),
                    role: (*role).into(),
                    workspace_id: String::new(),
                },
                &fleet.service_token(),
            ))
            .await
            .unwrap();
    }
}

fn token_of(fleet: &TestFleet, tenant: Uuid, user: Uuid) -> String {
    fleet.token(&penny_platform::signing::TokenGrant {
        subject: user.to_string(),
        tenant_id: tenant,
        roles: vec![],
        kind: penny_platform::PrincipalKind::User,
        session_id: Some(Uuid::new_v4().to_string()),
        lifetime: Duration::from_secs(600),
    })
}

/// A fleet with files, a tenant with its key, and a user who may upload and read.
async fn harness(builder: TestFleetBuilder) -> Harness {
    let fleet = builder.with_files().start().await;
    let tenant = Uuid::new_v4();
    let user = Uuid::now_v7();
    let mut keys = KeyServiceClient::new(fleet.keys().server.channel().await);
    keys.create_key(with_token(
        keys_pb::CreateKeyRequest {
            tenant_id: tenant.to_string(),
        },
        &fleet.service_token(),
    ))
    .await
    .unwrap();
    bind(&fleet, tenant, user, &["member", "viewer"]).await;
    let token = token_of(&fleet, tenant, user);
    let mut files = FileServiceClient::new(fleet.files().server.channel().await);
    assert_eventually!(
        Duration::from_secs(5),
        files
            .list_files(with_token(list(tenant), &token))
            .await
            .is_ok()
    );
    Harness {
        fleet,
        files,
        tenant,
        user,
        token,
    }
}

fn list(tenant: Uuid) -> pb::ListFilesRequest {
    pb::ListFilesRequest {
        tenant_id: tenant.to_string(),
        ..Default::default()
    }
}

fn header(tenant: Uuid, filename: &str, declared: &str) -> pb::UploadRequest {
    pb::UploadRequest {
        part: Some(pb::upload_request::Part::Header(pb::FileHeader {
            tenant_id: tenant.to_string(),
            filename: filename.into(),
            declared_content_type: declared.into(),
            ..Default::default()
        })),
    }
}

fn chunk(bytes: &[u8]) -> pb::UploadRequest {
    pb::UploadRequest {
        part: Some(pb::upload_request::Part::Chunk(
            bytes::Bytes::copy_from_slice(bytes),
        )),
    }
}

/// The messages of an upload of `files` (name, declared type, content), in 64 KiB chunks.
fn messages(tenant: Uuid, files: &[(&str, &str, &[u8])]) -> Vec<pb::UploadRequest> {
    let mut out = Vec::new();
    for (name, declared, content) in files {
        out.push(header(tenant, name, declared));
        for part in content.chunks(64 * 1024) {
            out.push(chunk(part));
        }
    }
    out
}

impl Harness {
    async fn upload(
        &self,
        files: &[(&str, &str, &[u8])],
    ) -> Result<Vec<pb::UploadResult>, tonic::Status> {
        self.upload_messages(messages(self.tenant, files)).await
    }

    async fn upload_messages(
        &self,
        messages: Vec<pb::UploadRequest>,
    ) -> Result<Vec<pb::UploadResult>, tonic::Status> {
        self.upload_messages_as(&self.token, messages).await
    }

    /// Uploads `files` into `tenant` with `token`, which all must be accepted.
    async fn upload_as(
        &self,
        tenant: Uuid,
        token: &str,
        files: &[(&str, &str, &[u8])],
    ) -> Vec<pb::File> {
        self.upload_messages_as(token, messages(tenant, files))
            .await
            .unwrap()
            .iter()
            .map(|r| file_of(r).clone())
            .collect()
    }

    async fn upload_messages_as(
        &self,
        token: &str,
        messages: Vec<pb::UploadRequest>,
    ) -> Result<Vec<pb::UploadResult>, tonic::Status> {
        self.files
            .clone()
            .upload(with_token(tokio_stream::iter(messages), token))
            .await
            .map(|r| r.into_inner().results)
    }

    async fn download(&self, file: &str) -> Result<Vec<u8>, tonic::Status> {
        let mut stream = self
            .files
            .clone()
            .download(with_token(
                pb::DownloadRequest {
                    tenant_id: self.tenant.to_string(),
                    file_id: file.into(),
                },
                &self.token,
            ))
            .await?
            .into_inner();
        let mut content = Vec::new();
        let mut first = true;
        while let Some(message) = stream.message().await? {
            match message.part {
                Some(pb::download_response::Part::File(f)) => {
                    assert!(first, "metadata comes first");
                    assert_eq!(f.id, file);
                }
                Some(pb::download_response::Part::Chunk(bytes)) => {
                    assert!(!first, "metadata comes first");
                    assert!(bytes.len() <= MB);
                    content.extend_from_slice(&bytes);
                }
                None => panic!("empty download message"),
            }
            first = false;
        }
        Ok(content)
    }

    async fn listed(&self) -> Vec<pb::File> {
        self.files
            .clone()
            .list_files(with_token(list(self.tenant), &self.token))
            .await
            .unwrap()
            .into_inner()
            .files
    }

    fn storage(&self) -> PathBuf {
        self.fleet.files().storage_dir().to_path_buf()
    }

    /// The files database's store, through the owner's connection.
    async fn store(&self) -> penny_files::store::Store {
        penny_files::store::Store::new(
            sea_orm::Database::connect(self.fleet.files().database.owner_url())
                .await
                .unwrap(),
        )
    }

    /// Uploads a file, puts a directory with something in it in its object's place (the
    /// tests run as root, so permissions would not stop a removal), and deletes the file:
    /// the call succeeds, the object stays. The file's id and the object's path.
    async fn delete_with_a_stuck_object(&self) -> (String, PathBuf) {
        let results = self
            .upload(&[("doomed.txt", "text/plain", b"delete me")])
            .await
            .unwrap();
        let doomed = file_of(&results[0]).id.clone();
        let root = self.storage();
        let object = root.join(&stored(&root)[0]);
        std::fs::remove_file(&object).unwrap();
        std::fs::create_dir(&object).unwrap();
        std::fs::write(object.join("inside"), b"x").unwrap();
        self.files
            .clone()
            .delete_file(with_token(
                pb::DeleteFileRequest {
                    tenant_id: self.tenant.to_string(),
                    file_id: doomed.clone(),
                },
                &self.fleet.admin_token(),
            ))
            .await
            .unwrap();
        (doomed, object)
    }
}

/// Every stored object (not the incoming area), relative to the storage root.
fn objects(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn stored(root: &Path) -> Vec<PathBuf> {
    objects(root)
        .into_iter()
        .filter(|p| !p.starts_with(".incoming"))
        .collect()
}

/// Another tenant of the harness's fleet, with a key, a member and viewer, and one file
/// (`c.txt`, `gamma`): its id, that user's token and the file.
async fn other_tenant_with_a_file(h: &Harness) -> (Uuid, String, pb::File) {
    let mut keys = KeyServiceClient::new(h.fleet.keys().server.channel().await);
    let other = Uuid::new_v4();
    let user = Uuid::now_v7();
    keys.create_key(with_token(
        keys_pb::CreateKeyRequest {
            tenant_id: other.to_string(),
        },
        &h.fleet.service_token(),
    ))
    .await
    .unwrap();
    bind(&h.fleet, other, user, &["member", "viewer"]).await;
    let token = token_of(&h.fleet, other, user);
    let file = h
        .upload_as(other, &token, &[("c.txt", "text/plain", b"gamma\n")])
        .await
        .remove(0);
    (other, token, file)
}

fn file_of(result: &pb::UploadResult) -> &pb::File {
    match &result.result {
        Some(pb::upload_result::Result::File(file)) => file,
        other => panic!("{} was refused: {other:?}", result.filename),
    }
}

fn refusal_of(result: &pb::UploadResult) -> String {
    match &result.result {
        Some(pb::upload_result::Result::Error(error)) => {
            penny_proto::common::v1::ErrorReason::try_from(error.reason)
                .unwrap()
                .as_str_name()
                .trim_start_matches("ERROR_REASON_")
                .to_owned()
        }
        other => panic!("{} was not refused: {other:?}", result.filename),
    }
}

#[tokio::test]
async fn uploads_are_sniffed_encrypted_at_rest_and_download_intact() {
    let h = harness(TestFleet::builder()).await;
    let text = "a recognisable sentence that must never be stored in the clear. ".repeat(4000);
    let json = br#"{"messages": [{"role": "user", "content": "hello"}], "n": 1.5e3}"#;
    let results = h
        .upload(&[
            ("picture.png", "image/png", PNG),
            ("notes.txt", "text/plain", text.as_bytes()),
            ("chat.json", "application/json", json),
            ("doc.pdf", "application/pdf", PDF),
        ])
        .await
        .unwrap();
    assert_eq!(results.len(), 4);
    let names: Vec<&str> = results.iter().map(|r| r.filename.as_str()).collect();
    assert_eq!(names, ["picture.png", "notes.txt", "chat.json", "doc.pdf"]);
    let contents: [&[u8]; 4] = [PNG, text.as_bytes(), json, PDF];
    let types = [
        "image/png",
        "text/plain",
        "application/json",
        "application/pdf",
    ];
    for ((result, content), content_type) in results.iter().zip(contents).zip(types) {
        let file = file_of(result);
        assert_eq!(file.content_type, content_type);
        assert_eq!(file.size_bytes, content.len() as u64);
        assert_eq!(file.sha256, sha2::Sha256::digest(content).to_vec());
        assert_eq!(file.scan_status, pb::ScanStatus::Clean as i32);
        assert!(
            file.scanner_version.starts_with("ClamAV "),
            "{}",
            file.scanner_version
        );
        assert_eq!(file.owner_id, h.user.to_string());
        assert_eq!(file.tenant_id, h.tenant.to_string());
        assert!(file.key_version >= 1);
        assert_eq!(h.download(&file.id).await.unwrap(), content);
        let got = h
            .files
            .clone()
            .get_file(with_token(
                pb::GetFileRequest {
                    tenant_id: h.tenant.to_string(),
                    file_id: file.id.clone(),
                },
                &h.token,
            ))
            .await
            .unwrap()
            .into_inner()
            .file
            .unwrap();
        assert_eq!(&got, file);
    }
    // Listed newest first.
    let listed: Vec<String> = h.listed().await.into_iter().map(|f| f.id).collect();
    let mut uploaded: Vec<String> = results.iter().map(|r| file_of(r).id.clone()).collect();
    uploaded.reverse();
    assert_eq!(listed, uploaded);
    // Objects live at generated keys, `<tenant>/<yyyy>/<mm>/<user>/<random>.<ext>`, and
    // hold no plaintext.
    let root = h.storage();
    let objects = stored(&root);
    assert_eq!(objects.len(), 4);
    let now = time::OffsetDateTime::now_utc();
    for object in &objects {
        let parts: Vec<String> = object
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        assert_eq!(parts.len(), 5, "{object:?}");
        assert_eq!(parts[0], h.tenant.to_string());
        assert_eq!(parts[1], format!("{:04}", now.year()));
        assert_eq!(parts[2], format!("{:02}", u8::from(now.month())));
        assert_eq!(parts[3], h.user.to_string());
        let bytes = std::fs::read(root.join(object)).unwrap();
        for content in contents {
            let probe = &content[..content.len().min(24)];
            assert!(
                !bytes.windows(probe.len()).any(|w| w == probe),
                "plaintext in {object:?}"
            );
        }
    }
    assert!(
        objects
            .iter()
            .any(|o| o.extension().is_some_and(|e| e == "png"))
    );
    assert!(
        objects
            .iter()
            .any(|o| o.extension().is_some_and(|e| e == "json"))
    );
}

#[tokio::test]
async fn content_decides_the_type_and_filenames_are_never_paths() {
    let h = harness(TestFleet::builder()).await;
    let results = h
        .upload(&[
            ("picture.pdf", "application/pdf", PNG),
            (
                "../../etc/passwd",
                "text/plain",
                b"root:x:0:0:root:/root:/bin/bash\n",
            ),
            ("run.sh", "application/x-sh", b"#!/bin/sh\necho hi\n"),
            ("binary.txt", "text/plain", b"\x7fELF\x02\x01\x01\0\0\0\0\0"),
            ("broken.json", "application/json", b"{\"a\": [1, 2"),
            ("empty.txt", "text/plain", b""),
        ])
        .await
        .unwrap();
    assert_eq!(refusal_of(&results[0]), "FILE_TYPE_MISMATCH");
    let passwd = file_of(&results[1]);
    assert_eq!(passwd.display_name, "passwd");
    assert_eq!(refusal_of(&results[2]), "FILE_TYPE_NOT_ALLOWED");
    assert_eq!(refusal_of(&results[3]), "FILE_TYPE_NOT_ALLOWED");
    assert_eq!(refusal_of(&results[4]), "FILE_TYPE_MISMATCH");
    assert_eq!(refusal_of(&results[5]), "FILE_EMPTY");
    // Only the accepted file is stored, under a generated key inside the storage root.
    let root = h.storage();
    let objects = stored(&root);
    assert_eq!(objects.len(), 1);
    assert!(objects[0].starts_with(h.tenant.to_string()));
    assert!(!objects[0].to_string_lossy().contains("passwd"));
    assert!(!root.parent().unwrap().join("etc").exists());
    let listed = h.listed().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, passwd.id);
}

#[tokio::test]
async fn eicar_is_refused_audited_and_leaves_nothing() {
    let h = harness(TestFleet::builder().with_audit()).await;
    let results = h
        .upload(&[
            ("eicar.txt", "text/plain", EICAR),
            ("fine.txt", "text/plain", b"nothing to see here\n"),
            ("run.sh", "application/x-sh", b"#!/bin/sh\n"),
        ])
        .await
        .unwrap();
    assert_eq!(refusal_of(&results[0]), "FILE_INFECTED");
    assert_eq!(refusal_of(&results[2]), "FILE_TYPE_NOT_ALLOWED");
    let Some(pb::upload_result::Result::Error(error)) = &results[0].result else {
        unreachable!()
    };
    assert!(error.message.contains(EICAR_SIGNATURE), "{}", error.message);
    let fine = file_of(&results[1]).clone();
    assert_eq!(stored(&h.storage()).len(), 1);
    assert!(
        objects(&h.storage())
            .iter()
            .all(|o| !o.starts_with(".incoming"))
    );
    // The refusal and the stored file are in the tenant's audit trail.
    let mut audit = AuditServiceClient::new(h.fleet.audit().server.channel().await);
    let admin = h.fleet.admin_token();
    let mut refused: Vec<audit_pb::AuditEvent>;
    assert_eventually!(Duration::from_secs(5), {
        refused = all_events(&mut audit, &admin, h.tenant, "files.file_refused").await;
        refused.len() >= 2
    });
    assert_eq!(refused.len(), 2);
    let event = refused
        .iter()
        .find(|e| e.attributes["reason"] == "FILE_INFECTED")
        .unwrap();
    assert!(
        refused
            .iter()
            .any(|e| e.attributes["reason"] == "FILE_TYPE_NOT_ALLOWED")
    );
    assert_eq!(event.attributes["reason"], "FILE_INFECTED");
    assert_eq!(event.attributes["scan_signature"], EICAR_SIGNATURE);
    assert_eq!(event.user_id, h.user.to_string());
    assert_eq!(event.outcome, audit_pb::Outcome::Denied as i32);
    let mut stored_events: Vec<audit_pb::AuditEvent>;
    assert_eventually!(Duration::from_secs(5), {
        stored_events = all_events(&mut audit, &admin, h.tenant, "files.file_stored").await;
        !stored_events.is_empty()
    });
    assert_eq!(stored_events[0].resource_id, fine.id);
    assert_eq!(stored_events[0].user_id, h.user.to_string());
    assert_eq!(stored_events[0].principal_kind, PrincipalKind::User as i32);
}

/// Uploads ten files at a time until one call is cut off (aborted by its client) inside
/// its commit: its rows recorded, not yet visible. Returns how many files all the uploads
/// made hold. Needs files on S3 (moto), where each publish is a copy and a delete over
/// HTTP: ten of them make the commit long enough to cut the call off inside it.
async fn cut_off_mid_commit(h: &Harness, store: &penny_files::store::Store) -> usize {
    let names: Vec<String> = (0..10).map(|i| format!("part-{i}.txt")).collect();
    let mut uploads = 0;
    let mut cut_off = false;
    while !cut_off && uploads < 9 {
        let files: Vec<(&str, &str, &[u8])> = names
            .iter()
            .map(|n| {
                (
                    n.as_str(),
                    "text/plain",
                    &b"committed whole or not at all\n"[..],
                )
            })
            .collect();
        let request = with_token(tokio_stream::iter(messages(h.tenant, &files)), &h.token);
        let mut client = h.files.clone();
        let call = tokio::spawn(async move { client.upload(request).await });
        uploads += 1;
        // Cut the call off once its rows are recorded but not yet visible: mid-commit.
        while !call.is_finished() {
            if !hidden_file_rows(store).await.is_empty() {
                call.abort();
                cut_off = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert!(cut_off, "none of {uploads} uploads was caught mid-commit");
    uploads * names.len()
}

/// A server told to stop waits for the commits under way, one whose client went away
/// included: once it has stopped, every file of the cut-off upload is stored and visible,
/// and no row is left half-made.
#[tokio::test]
async fn a_stopping_server_finishes_the_commits_under_way() {
    let mut h = harness(TestFleet::builder().files_on_s3()).await;
    let store = h.store().await;
    let expected = cut_off_mid_commit(&h, &store).await;
    h.fleet
        .files
        .as_mut()
        .unwrap()
        .server
        .shutdown()
        .await
        .unwrap();
    // Stopped means done: no waiting here.
    assert!(hidden_file_rows(&store).await.is_empty());
    let visible = store
        .list(h.tenant, &Default::default(), None, 1000)
        .await
        .unwrap();
    assert_eq!(visible.len(), expected);
}

#[tokio::test]
async fn a_client_gone_mid_commit_leaves_every_file_stored_and_audited() {
    let h = harness(TestFleet::builder().files_on_s3().with_audit()).await;
    let store = h.store().await;
    let expected = cut_off_mid_commit(&h, &store).await;
    // The commit went on without the client: every file of every upload is visible, none
    // is left half-made, and each has its `files.file_stored` event.
    assert_eventually!(Duration::from_secs(10), h.listed().await.len() == expected);
    assert!(hidden_file_rows(&store).await.is_empty());
    let mut audit = AuditServiceClient::new(h.fleet.audit().server.channel().await);
    let admin = h.fleet.admin_token();
    assert_eventually!(
        Duration::from_secs(10),
        all_events(&mut audit, &admin, h.tenant, "files.file_stored")
            .await
            .len()
            == expected
    );
}

#[tokio::test]
async fn with_clamd_stopped_uploads_are_refused_never_accepted() {
    let mut h = harness(TestFleet::builder()).await;
    let clean = h
        .upload(&[("a.txt", "text/plain", b"before")])
        .await
        .unwrap();
    file_of(&clean[0]);
    h.fleet.files_mut().clamd.stop();
    let results = h
        .upload(&[
            ("b.txt", "text/plain", b"after clamd stopped"),
            ("eicar.txt", "text/plain", EICAR),
        ])
        .await
        .unwrap();
    assert_eq!(refusal_of(&results[0]), "FILE_UNSCANNABLE");
    assert_eq!(refusal_of(&results[1]), "FILE_UNSCANNABLE");
    assert_eq!(stored(&h.storage()).len(), 1);
    assert_eq!(h.listed().await.len(), 1);
}

#[tokio::test]
async fn quarantined_unscannable_files_are_kept_but_never_downloadable() {
    let mut h = harness(TestFleet::builder().files_quarantine_unscannable()).await;
    h.fleet.files_mut().clamd.stop();
    let results = h
        .upload(&[("b.txt", "text/plain", b"unscanned")])
        .await
        .unwrap();
    assert_eq!(refusal_of(&results[0]), "FILE_UNSCANNABLE");
    let listed = h.listed().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].scan_status, pb::ScanStatus::Unscannable as i32);
    let status = h.download(&listed[0].id).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_reason(&status), "FILE_NOT_CLEAN");
}

#[tokio::test]
async fn stream_limits_abort_the_whole_upload_and_store_nothing() {
    let h = harness(TestFleet::builder()).await;
    // 50 MB + 1 byte, behind a file that was fine: refused as soon as the limit is
    // crossed (the client would go on sending forever), and nothing of either is kept.
    let block = vec![b'a'; MB];
    let endless = messages(h.tenant, &[("first.txt", "text/plain", b"fine")])
        .into_iter()
        .chain(std::iter::once(header(h.tenant, "big.txt", "text/plain")))
        .chain(std::iter::repeat(chunk(&block)));
    let status = h
        .files
        .clone()
        .upload(with_token(tokio_stream::iter(endless), &h.token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(error_reason(&status), "FILE_TOO_LARGE");
    // Exactly 50 MB is fine; one byte more is not.
    let limit = 50 * MB;
    let mut exact = vec![header(h.tenant, "exact.txt", "text/plain")];
    exact.extend(std::iter::repeat_n(chunk(&block), 50));
    let results = h.upload_messages(exact.clone()).await.unwrap();
    assert_eq!(file_of(&results[0]).size_bytes, limit as u64);
    let mut over = exact;
    over.push(chunk(b"!"));
    let status = h.upload_messages(over).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    // Eleven files: refused, and the ten before it are not kept.
    let eleven: Vec<(String, &str, &[u8])> = (0..11)
        .map(|i| (format!("f{i}.txt"), "text/plain", &b"small"[..]))
        .collect();
    let refs: Vec<(&str, &str, &[u8])> = eleven
        .iter()
        .map(|(n, t, c)| (n.as_str(), *t, *c))
        .collect();
    let status = h.upload(&refs).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(error_reason(&status), "TOO_MANY_FILES");
    assert!(h.upload(&refs[..10]).await.is_ok());
    // A chunk before any header, and an empty stream.
    let status = h.upload_messages(vec![chunk(b"x")]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = h.upload_messages(vec![]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // What is stored: the exact-limit file and the ten small ones; nothing incoming.
    assert_eq!(h.listed().await.len(), 11);
    assert_eq!(stored(&h.storage()).len(), 11);
    assert!(
        objects(&h.storage())
            .iter()
            .all(|o| !o.starts_with(".incoming"))
    );
}

#[tokio::test]
async fn a_changed_cut_or_reordered_object_fails_to_download() {
    let h = harness(TestFleet::builder()).await;
    let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    let results = h
        .upload(&[("long.txt", "text/plain", text.as_bytes())])
        .await
        .unwrap();
    let file = file_of(&results[0]).clone();
    assert_eq!(h.download(&file.id).await.unwrap(), text.as_bytes());
    let root = h.storage();
    let object = root.join(&stored(&root)[0]);
    let original = std::fs::read(&object).unwrap();
    let segment = penny_files::seal::SEGMENT + penny_files::seal::TAG;
    let header = penny_files::seal::HEADER;
    assert!(original.len() > header + 2 * segment);
    let flipped = {
        let mut bytes = original.clone();
        bytes[header + segment + 10] ^= 0x01;
        bytes
    };
    let truncated = original[..header + 2 * segment].to_vec();
    let swapped = {
        let mut bytes = original[..header].to_vec();
        bytes.extend_from_slice(&original[header + segment..header + 2 * segment]);
        bytes.extend_from_slice(&original[header..header + segment]);
        bytes.extend_from_slice(&original[header + 2 * segment..]);
        bytes
    };
    for (what, bytes) in [
        ("flipped", flipped),
        ("truncated", truncated),
        ("swapped", swapped),
    ] {
        std::fs::write(&object, &bytes).unwrap();
        let status = h.download(&file.id).await.unwrap_err();
        assert_eq!(status.code(), Code::DataLoss, "{what}");
        assert_eq!(error_reason(&status), "FILE_INTEGRITY_FAILED", "{what}");
    }
    std::fs::write(&object, &original).unwrap();
    assert_eq!(h.download(&file.id).await.unwrap(), text.as_bytes());
}

#[tokio::test]
async fn keys_down_mid_upload_fails_it_and_leaves_nothing() {
    let mut h = harness(TestFleet::builder()).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let call = {
        let mut files = h.files.clone();
        let token = h.token.clone();
        tokio::spawn(async move {
            files
                .upload(with_token(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    &token,
                ))
                .await
        })
    };
    for message in messages(h.tenant, &[("first.txt", "text/plain", &[b'x'; 300_000])]) {
        tx.send(message).await.unwrap();
    }
    // The first file is under way (its data key made); keys goes down before the second.
    assert_eventually!(
        Duration::from_secs(5),
        objects(&h.storage())
            .iter()
            .any(|o| o.starts_with(".incoming"))
    );
    h.fleet
        .keys
        .as_mut()
        .unwrap()
        .server
        .shutdown()
        .await
        .unwrap();
    for message in messages(h.tenant, &[("second.txt", "text/plain", b"more")]) {
        let _ = tx.send(message).await;
    }
    drop(tx);
    let status = call.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_reason(&status), "DEPENDENCY_UNAVAILABLE");
    assert!(h.listed().await.is_empty());
    assert!(
        objects(&h.storage()).is_empty(),
        "{:?}",
        objects(&h.storage())
    );
    // No row either, not even an invisible one.
    let store = h.store().await;
    assert!(hidden_file_rows(&store).await.is_empty());
}

#[tokio::test]
async fn what_an_interrupted_upload_leaves_is_swept_at_start() {
    let mut h = harness(TestFleet::builder()).await;
    let kept = h
        .upload(&[("kept.txt", "text/plain", b"kept")])
        .await
        .unwrap();
    let kept = file_of(&kept[0]).clone();
    let root = h.storage();
    // A crash mid-upload leaves an incoming object; one mid-commit, a row not yet visible
    // and its object.
    std::fs::write(root.join(".incoming").join("crashed.part"), b"sealed bytes").unwrap();
    let store = h.store().await;
    let id = Uuid::now_v7();
    let key = format!("{}/2026/12/{}/{}.txt", h.tenant, h.user, id.simple());
    std::fs::create_dir_all(root.join(&key).parent().unwrap()).unwrap();
    std::fs::write(root.join(&key), b"sealed").unwrap();
    let now = time::OffsetDateTime::now_utc();
    store
        .insert_uncommitted(
            h.tenant,
            &[penny_files::domain::StoredFile {
                id,
                tenant_id: h.tenant,
                workspace_id: None,
                owner_id: h.user.to_string(),
                display_name: "half.txt".into(),
                content_type: "text/plain".into(),
                size_bytes: 4,
                sha256: [0; 32],
                scan_status: penny_files::domain::ScanStatus::Clean,
                scan_signature: String::new(),
                scanner_version: "test".into(),
                scan_time: Some(now),
                key_version: 1,
                wrapped_key: "penny:v1:x".into(),
                storage_key: key.clone(),
                created_at: now,
            }],
        )
        .await
        .unwrap();
    // Not visible before the sweep either.
    assert_eq!(h.listed().await.len(), 1);
    h.fleet.restart_files().await;
    let h = Harness {
        files: FileServiceClient::new(h.fleet.files().server.channel().await),
        ..h
    };
    assert!(!root.join(&key).exists());
    assert!(!root.join(".incoming").join("crashed.part").exists());
    let listed = h.listed().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, kept.id);
    assert_eq!(h.download(&kept.id).await.unwrap(), b"kept");
}

#[tokio::test]
async fn a_deleted_files_object_that_cannot_be_removed_is_swept_at_a_later_start() {
    let mut h = harness(TestFleet::builder()).await;
    let (doomed, object) = h.delete_with_a_stuck_object().await;
    // Gone for every reader at once, its wrapped data key with it.
    assert!(h.listed().await.is_empty());
    assert_eq!(
        h.download(&doomed).await.unwrap_err().code(),
        Code::NotFound
    );
    let store = h.store().await;
    let hidden = hidden_file_rows(&store).await;
    assert_eq!(hidden.len(), 1);
    assert_eq!(hidden[0].id.to_string(), doomed);
    assert!(hidden[0].wrapped_key.is_empty());
    // A start whose sweep still cannot remove the object starts all the same, and keeps
    // the row for the next one.
    h.fleet.restart_files().await;
    h.files = FileServiceClient::new(h.fleet.files().server.channel().await);
    assert!(h.listed().await.is_empty());
    assert_eq!(hidden_file_rows(&store).await.len(), 1);
    // Once the storage lets it, the next start removes the object and the row.
    std::fs::remove_dir_all(&object).unwrap();
    std::fs::write(&object, b"sealed bytes").unwrap();
    h.fleet.restart_files().await;
    h.files = FileServiceClient::new(h.fleet.files().server.channel().await);
    assert!(h.listed().await.is_empty());
    assert!(!object.exists());
    assert!(hidden_file_rows(&store).await.is_empty());
}

#[tokio::test]
async fn a_running_server_sweeps_what_a_failed_deletion_left() {
    // Sweeps at start and then every second, of what is a second old.
    let h = harness(TestFleet::builder().files_stale_after(Duration::from_secs(1))).await;
    let (_, object) = h.delete_with_a_stuck_object().await;
    let store = h.store().await;
    assert_eq!(hidden_file_rows(&store).await.len(), 1);
    // The storage lets go; no restart: a later sweep of the running server removes the
    // object and the row.
    std::fs::remove_dir_all(&object).unwrap();
    std::fs::write(&object, b"sealed bytes").unwrap();
    assert_eventually!(
        Duration::from_secs(10),
        !object.exists() && hidden_file_rows(&store).await.is_empty()
    );
    // Uploads go on beside the sweeps, and what they store stays.
    let kept = h
        .upload(&[("kept.txt", "text/plain", b"kept")])
        .await
        .unwrap();
    let kept = file_of(&kept[0]).clone();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(h.download(&kept.id).await.unwrap(), b"kept");
}

#[tokio::test]
async fn permissions_and_tenants_keep_files_apart() {
    let h = harness(TestFleet::builder()).await;
    let results = h
        .upload(&[("mine.txt", "text/plain", b"mine")])
        .await
        .unwrap();
    let file = file_of(&results[0]).clone();
    let get = |tenant: Uuid| pb::GetFileRequest {
        tenant_id: tenant.to_string(),
        file_id: file.id.clone(),
    };
    // A viewer reads but cannot upload; a member uploads but cannot read.
    let viewer = Uuid::now_v7();
    bind(&h.fleet, h.tenant, viewer, &["viewer"]).await;
    let viewer_token = token_of(&h.fleet, h.tenant, viewer);
    let member = Uuid::now_v7();
    bind(&h.fleet, h.tenant, member, &["member"]).await;
    let member_token = token_of(&h.fleet, h.tenant, member);
    let mut files = h.files.clone();
    assert_eventually!(
        Duration::from_secs(5),
        files
            .get_file(with_token(get(h.tenant), &viewer_token))
            .await
            .is_ok()
    );
    let upload = |token: &str| {
        with_token(
            tokio_stream::iter(messages(h.tenant, &[("x.txt", "text/plain", b"x")])),
            token,
        )
    };
    let status = files.upload(upload(&viewer_token)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eventually!(
        Duration::from_secs(5),
        files.upload(upload(&member_token)).await.is_ok()
    );
    let status = files
        .get_file(with_token(get(h.tenant), &member_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Deleting needs `file:delete`, which neither role holds.
    let delete = pb::DeleteFileRequest {
        tenant_id: h.tenant.to_string(),
        file_id: file.id.clone(),
    };
    let status = files
        .delete_file(with_token(delete.clone(), &h.token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Another tenant's reader finds nothing, with its own tenant id or with ours.
    let other = Uuid::new_v4();
    let outsider = Uuid::now_v7();
    bind(&h.fleet, other, outsider, &["viewer"]).await;
    let outsider_token = token_of(&h.fleet, other, outsider);
    assert_eventually!(
        Duration::from_secs(5),
        files
            .list_files(with_token(list(other), &outsider_token))
            .await
            .is_ok_and(|r| r.into_inner().files.is_empty())
    );
    for tenant in [h.tenant, other] {
        let status = files
            .get_file(with_token(get(tenant), &outsider_token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{tenant}");
        let status = files
            .download(with_token(
                pb::DownloadRequest {
                    tenant_id: tenant.to_string(),
                    file_id: file.id.clone(),
                },
                &outsider_token,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{tenant}");
    }
    // Staff delete it: the row and the object go.
    let before = stored(&h.storage()).len();
    files
        .delete_file(with_token(delete.clone(), &h.fleet.admin_token()))
        .await
        .unwrap();
    assert_eq!(stored(&h.storage()).len(), before - 1);
    let status = files
        .get_file(with_token(get(h.tenant), &h.token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = files
        .delete_file(with_token(delete, &h.fleet.admin_token()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn signed_urls_serve_the_file_with_security_headers_and_refuse_any_alteration() {
    let h = harness(TestFleet::builder().with_audit()).await;
    let content = b"the signed download's content\n";
    let results = h
        .upload(&[
            ("r\u{e9}sum\u{e9} \"final\".txt", "text/plain", content),
            ("other.txt", "text/plain", b"another file"),
        ])
        .await
        .unwrap();
    let file = file_of(&results[0]).clone();
    let other_file = file_of(&results[1]).clone();
    let http = h.fleet.files().http_addr;
    let sign = |ttl: Option<prost_types::Duration>, file: &str| pb::CreateSignedUrlRequest {
        tenant_id: h.tenant.to_string(),
        file_id: file.to_owned(),
        ttl,
    };
    let mut files = h.files.clone();
    let signed = files
        .create_signed_url(with_token(sign(None, &file.id), &h.token))
        .await
        .unwrap()
        .into_inner();
    let prefix = format!("http://{http}");
    assert!(
        signed
            .url
            .starts_with(&format!("{prefix}/v1/files/{}/{}?", h.tenant, file.id)),
        "{}",
        signed.url
    );
    let expires =
        signed.expire_time.unwrap().seconds - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((3590..=3600).contains(&expires), "{expires}");
    let target = signed.url.strip_prefix(&prefix).unwrap().to_owned();
    let (status, headers, body) = penny_tests::http_request(http, "GET", &target).await;
    assert_eq!(status, 200);
    assert_eq!(body, content);
    assert_eq!(headers["content-type"], "text/plain");
    assert_eq!(headers["content-length"], content.len().to_string());
    assert_eq!(
        headers["content-disposition"],
        "attachment; filename=\"r_sum_ _final_.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%22final%22.txt"
    );
    for (name, value) in penny_platform::http::SECURITY_HEADERS {
        assert_eq!(headers.get(name).map(String::as_str), Some(value), "{name}");
    }
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    // Any alteration is 403, with nothing of the file in the answer.
    let (path, query) = target.split_once('?').unwrap();
    let sig = query.rsplit_once("sig=").unwrap().1;
    let flipped_sig = {
        let last = sig.chars().last().unwrap().to_digit(16).unwrap() ^ 1;
        format!(
            "{}{}",
            &sig[..sig.len() - 1],
            char::from_digit(last, 16).unwrap()
        )
    };
    let other_tenant = Uuid::new_v4();
    let forbidden = [
        format!("{path}?{}", query.replace(sig, &flipped_sig)),
        format!(
            "{}?{query}",
            path.replace(&h.tenant.to_string(), &other_tenant.to_string())
        ),
        format!("{}?{query}", path.replace(&file.id, &other_file.id)),
        format!("{path}?{query}&{}", query.split('&').nth(1).unwrap()),
        format!("{path}?{query}&download=1"),
        format!("{path}?{}", query.replace("expires=", "expires=0")),
        format!(
            "{}?{query}",
            path.replace("/v1/files/", "/v1/files/../files/")
        ),
        format!("{}?{query}", path.replace("/v1/files/", "/v1//files/")),
        format!(
            "{}?{query}",
            path.replace(&file.id, &file.id.to_uppercase())
        ),
        format!("{}?{query}", path.replace('-', "%2D")),
        path.to_owned(),
        format!("{path}/?{query}"),
    ];
    for target in &forbidden {
        let (status, _, body) = penny_tests::http_request(http, "GET", target).await;
        assert_eq!(status, 403, "{target}");
        assert_eq!(body, b"forbidden\n", "{target}");
    }
    let (status, headers, _) = penny_tests::http_request(http, "POST", &target).await;
    assert_eq!(status, 405);
    assert_eq!(headers["allow"], "GET");
    // Lifetimes: at most 7 days, at least 1 s; an expired URL is refused.
    for bad in [0, -1, 7 * 24 * 3600 + 1] {
        let ttl = prost_types::Duration {
            seconds: bad,
            nanos: 0,
        };
        let status = files
            .create_signed_url(with_token(sign(Some(ttl), &file.id), &h.token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}");
    }
    let week = prost_types::Duration {
        seconds: 7 * 24 * 3600,
        nanos: 0,
    };
    assert!(
        files
            .create_signed_url(with_token(sign(Some(week), &file.id), &h.token))
            .await
            .is_ok()
    );
    let short = files
        .create_signed_url(with_token(
            sign(
                Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                &file.id,
            ),
            &h.token,
        ))
        .await
        .unwrap()
        .into_inner();
    let short_target = short.url.strip_prefix(&prefix).unwrap().to_owned();
    assert_eventually!(
        Duration::from_secs(5),
        penny_tests::http_request(http, "GET", &short_target)
            .await
            .0
            == 403
    );
    // Another tenant's reader cannot sign a URL for it.
    let outsider = Uuid::now_v7();
    bind(&h.fleet, other_tenant, outsider, &["viewer"]).await;
    let outsider_token = token_of(&h.fleet, other_tenant, outsider);
    assert_eventually!(Duration::from_secs(5), {
        files
            .create_signed_url(with_token(sign(None, &file.id), &outsider_token))
            .await
            .is_err_and(|s| s.code() == Code::NotFound)
    });
    // Deleting the file ends its URLs.
    files
        .delete_file(with_token(
            pb::DeleteFileRequest {
                tenant_id: h.tenant.to_string(),
                file_id: file.id.clone(),
            },
            &h.fleet.admin_token(),
        ))
        .await
        .unwrap();
    assert_eq!(penny_tests::http_request(http, "GET", &target).await.0, 403);
    // Creating, using and refusing URLs are in the audit trail.
    let mut audit = AuditServiceClient::new(h.fleet.audit().server.channel().await);
    let admin = h.fleet.admin_token();
    assert_eventually!(Duration::from_secs(5), {
        let used = all_events(&mut audit, &admin, h.tenant, "files.file_downloaded").await;
        let created = all_events(&mut audit, &admin, h.tenant, "files.signed_url_created").await;
        let refused = all_events(
            &mut audit,
            &admin,
            penny_platform::principal::PLATFORM_TENANT_ID,
            "files.signed_url_refused",
        )
        .await;
        let gone = all_events(&mut audit, &admin, h.tenant, "files.signed_url_refused").await;
        // Refusals of URLs this service signed (the expired one, the deleted file's) are
        // audited; forged and malformed ones are not (anyone could flood the trail).
        used.iter().any(|e| {
            e.attributes.get("via").is_some_and(|v| v == "signed_url")
                && e.ip_address == "127.0.0.1"
        }) && created.len() == 3
            && refused.len() == 1
            && refused[0].attributes["reason"] == "expired"
            && gone.len() == 1
            && gone[0].attributes["reason"] == "gone"
    });
}

/// A rotation is followed without anyone calling RewrapTenant: a files service that looks
/// for tenants whose files are behind their key rewraps every file of the rotated tenant,
/// once, and nothing of a tenant whose key did not move; with the minimum then raised,
/// every file still downloads.
#[tokio::test]
async fn after_a_rotation_a_running_files_service_rewraps_the_tenant_by_itself() {
    let h = harness(
        TestFleet::builder()
            .with_audit()
            .files_rewrap_every(Duration::from_millis(200)),
    )
    .await;
    let contents: [&[u8]; 2] = [b"alpha\n", b"beta\n"];
    let ids: Vec<String> = h
        .upload(&[
            ("a.txt", "text/plain", contents[0]),
            ("b.txt", "text/plain", contents[1]),
        ])
        .await
        .unwrap()
        .iter()
        .map(|r| file_of(r).id.clone())
        .collect();
    // Another tenant, with a file, whose key is never rotated.
    let (other, other_token, other_file) = other_tenant_with_a_file(&h).await;
    assert_eq!(other_file.key_version, 1);
    let mut keys = KeyServiceClient::new(h.fleet.keys().server.channel().await);

    let admin = h.fleet.admin_token();
    keys.rotate_key(with_token(
        keys_pb::RotateKeyRequest {
            tenant_id: h.tenant.to_string(),
        },
        &admin,
    ))
    .await
    .unwrap();
    assert_eventually!(
        Duration::from_secs(10),
        h.listed().await.iter().all(|f| f.key_version == 2)
    );
    keys.update_key_config(with_token(
        keys_pb::UpdateKeyConfigRequest {
            tenant_id: h.tenant.to_string(),
            min_decryption_version: Some(2),
            deletion_allowed: None,
        },
        &admin,
    ))
    .await
    .unwrap();
    for (id, content) in ids.iter().zip(contents) {
        assert_eq!(h.download(id).await.unwrap(), content);
    }

    // One rewrap, audited, however many passes looked afterwards; none for the other
    // tenant, whose file keeps its version.
    let mut audit = AuditServiceClient::new(h.fleet.audit().server.channel().await);
    let mut finished: Vec<audit_pb::AuditEvent>;
    assert_eventually!(Duration::from_secs(5), {
        finished = all_events(&mut audit, &admin, h.tenant, "files.rewrap_finished").await;
        !finished.is_empty()
    });
    assert_eq!(finished[0].attributes["rewrapped_files"], "2");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        all_events(&mut audit, &admin, h.tenant, "files.rewrap_started")
            .await
            .len(),
        1
    );
    assert!(
        all_events(&mut audit, &admin, other, "files.rewrap_started")
            .await
            .is_empty()
    );
    let other_now = h
        .files
        .clone()
        .get_file(with_token(
            pb::GetFileRequest {
                tenant_id: other.to_string(),
                file_id: other_file.id.clone(),
            },
            &other_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .file
        .unwrap();
    assert_eq!(other_now.key_version, 1);
}

/// A rewrap that failed on files keys refused (here a damaged wrapped key) is not started
/// again by every background pass, each of which would fail the same way and add to the
/// trail: it waits for an operator, whose RewrapTenant runs it again.
#[tokio::test]
async fn a_rewrap_keys_refused_is_left_for_an_operator_not_restarted_every_pass() {
    let h = harness(
        TestFleet::builder()
            .with_audit()
            .files_rewrap_every(Duration::from_millis(200)),
    )
    .await;
    let ids: Vec<Uuid> = h
        .upload(&[
            ("a.txt", "text/plain", b"alpha\n"),
            ("b.txt", "text/plain", b"beta\n"),
        ])
        .await
        .unwrap()
        .iter()
        .map(|r| file_of(r).id.parse().unwrap())
        .collect();
    let store = h.store().await;
    let file = store.get(h.tenant, ids[1]).await.unwrap().unwrap();
    let prefix = "penny:v1:";
    assert!(file.wrapped_key.starts_with(prefix), "{}", file.wrapped_key);
    // A character of the nonce changed: keys cannot open it, so cannot rewrap it.
    let mut damaged = file.wrapped_key.clone().into_bytes();
    let at = prefix.len() + 4;
    damaged[at] = if damaged[at] == b'A' { b'B' } else { b'A' };
    let damaged = String::from_utf8(damaged).unwrap();
    assert!(
        store
            .set_wrapped_key(h.tenant, file.id, &file.wrapped_key, &damaged, 1)
            .await
            .unwrap()
    );

    let admin = h.fleet.admin_token();
    let mut keys = KeyServiceClient::new(h.fleet.keys().server.channel().await);
    keys.rotate_key(with_token(
        keys_pb::RotateKeyRequest {
            tenant_id: h.tenant.to_string(),
        },
        &admin,
    ))
    .await
    .unwrap();
    let mut audit = AuditServiceClient::new(h.fleet.audit().server.channel().await);
    let mut finished: Vec<audit_pb::AuditEvent>;
    assert_eventually!(Duration::from_secs(10), {
        finished = all_events(&mut audit, &admin, h.tenant, "files.rewrap_finished").await;
        !finished.is_empty()
    });
    let event = &finished[0];
    assert_eq!(
        event.outcome,
        audit_pb::Outcome::Failure as i32,
        "{event:?}"
    );
    assert_eq!(
        (
            event.attributes["rewrapped_files"].as_str(),
            event.attributes["failed_files"].as_str()
        ),
        ("1", "1")
    );
    // Five more passes: none starts it again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = |audit: &mut AuditServiceClient<Channel>| {
        let mut audit = audit.clone();
        let admin = admin.clone();
        let tenant = h.tenant;
        async move {
            all_events(&mut audit, &admin, tenant, "files.rewrap_started")
                .await
                .len()
        }
    };
    assert_eq!(started(&mut audit).await, 1);
    assert_eq!(
        h.listed()
            .await
            .iter()
            .map(|f| f.key_version)
            .collect::<std::collections::BTreeSet<_>>(),
        [1, 2].into()
    );

    // The operator's call runs it again, and it fails on the same file.
    let answer = h
        .files
        .clone()
        .rewrap_tenant(with_token(
            pb::RewrapTenantRequest {
                tenant_id: h.tenant.to_string(),
                wait: true,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.state, pb::RewrapState::Failed as i32, "{answer:?}");
    assert_eq!((answer.rewrapped_files, answer.failed_files), (1, 1));
    assert_eventually!(Duration::from_secs(5), started(&mut audit).await == 2);
}

/// Once a tenant's key is deleted, PurgeTenantFiles removes every file of the tenant,
/// objects and rows, and nothing of another tenant; while the key exists it removes
/// nothing, and users cannot call it at all.
#[tokio::test]
async fn purging_a_shredded_tenant_removes_its_files_and_nothing_else() {
    let h = harness(TestFleet::builder().with_audit()).await;
    let ids: Vec<String> = h
        .upload(&[
            ("a.txt", "text/plain", b"alpha\n"),
            ("b.txt", "text/plain", b"beta\n"),
            ("c.png", "image/png", PNG),
        ])
        .await
        .unwrap()
        .iter()
        .map(|r| file_of(r).id.clone())
        .collect();
    let (other, other_token, other_file) = other_tenant_with_a_file(&h).await;
    let purge = |token: &str| {
        let mut files = h.files.clone();
        let request = with_token(
            pb::PurgeTenantFilesRequest {
                tenant_id: h.tenant.to_string(),
            },
            token,
        );
        async move { files.purge_tenant_files(request).await }
    };
    let tenant_objects = |tenant: Uuid| {
        stored(&h.storage())
            .into_iter()
            .filter(|o| o.starts_with(tenant.to_string()))
            .count()
    };

    let status = purge(&h.token).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // The key still opens the files: nothing goes.
    let service = h.fleet.service_token();
    let status = purge(&service).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(h.listed().await.len(), 3);
    assert_eq!(tenant_objects(h.tenant), 3);

    let admin = h.fleet.admin_token();
    let mut keys = KeyServiceClient::new(h.fleet.keys().server.channel().await);
    keys.update_key_config(with_token(
        keys_pb::UpdateKeyConfigRequest {
            tenant_id: h.tenant.to_string(),
            min_decryption_version: None,
            deletion_allowed: Some(true),
        },
        &admin,
    ))
    .await
    .unwrap();
    keys.delete_key(with_token(
        keys_pb::DeleteKeyRequest {
            tenant_id: h.tenant.to_string(),
        },
        &admin,
    ))
    .await
    .unwrap();
    let purged = purge(&service).await.unwrap().into_inner();
    assert_eq!((purged.deleted_files, purged.done), (3, true));
    assert!(h.listed().await.is_empty());
    assert_eq!(tenant_objects(h.tenant), 0);
    let store = h.store().await;
    for id in &ids {
        assert!(
            store
                .get(h.tenant, id.parse().unwrap())
                .await
                .unwrap()
                .is_none()
        );
    }
    // No hidden row is left for the sweep either.
    assert!(
        hidden_file_rows(&store)
            .await
            .iter()
            .all(|f| f.tenant_id != h.tenant)
    );
    // Again: nothing left, nothing to do.
    let again = purge(&service).await.unwrap().into_inner();
    assert_eq!((again.deleted_files, again.done), (0, true));

    // The other tenant's file is untouched.
    assert_eq!(tenant_objects(other), 1);
    let mut stream = h
        .files
        .clone()
        .download(with_token(
            pb::DownloadRequest {
                tenant_id: other.to_string(),
                file_id: other_file.id.clone(),
            },
            &other_token,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut content = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        if let Some(pb::download_response::Part::Chunk(bytes)) = message.part {
            content.extend_from_slice(&bytes);
        }
    }
    assert_eq!(content, b"gamma\n");

    let mut audit = AuditServiceClient::new(h.fleet.audit().server.channel().await);
    let mut purges: Vec<audit_pb::AuditEvent>;
    assert_eventually!(Duration::from_secs(5), {
        purges = all_events(&mut audit, &admin, h.tenant, "files.tenant_purged").await;
        purges.len() == 2
    });
    assert!(
        purges
            .iter()
            .any(|e| e.attributes["deleted_files"] == "3" && e.attributes["done"] == "true")
    );
}

#[tokio::test]
async fn after_rotation_rewrap_and_a_raised_minimum_every_file_still_downloads() {
    let h = harness(TestFleet::builder()).await;
    let contents: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            format!("file number {i}\n")
                .repeat(100 * (i + 1))
                .into_bytes()
        })
        .collect();
    let names = ["a.txt", "b.txt", "c.txt"];
    let batch: Vec<(&str, &str, &[u8])> = names
        .iter()
        .zip(&contents)
        .map(|(n, c)| (*n, "text/plain", c.as_slice()))
        .collect();
    let ids: Vec<String> = h
        .upload(&batch)
        .await
        .unwrap()
        .iter()
        .map(|r| file_of(r).id.clone())
        .collect();
    let admin = h.fleet.admin_token();
    let mut keys = KeyServiceClient::new(h.fleet.keys().server.channel().await);
    let rotate = |keys: &mut KeyServiceClient<Channel>| {
        let request = with_token(
            keys_pb::RotateKeyRequest {
                tenant_id: h.tenant.to_string(),
            },
            &admin,
        );
        let mut keys = keys.clone();
        async move { keys.rotate_key(request).await.unwrap() }
    };
    let raise = |version: u32| {
        with_token(
            keys_pb::UpdateKeyConfigRequest {
                tenant_id: h.tenant.to_string(),
                min_decryption_version: Some(version),
                deletion_allowed: None,
            },
            &admin,
        )
    };
    let rewrap = || {
        with_token(
            pb::RewrapTenantRequest {
                tenant_id: h.tenant.to_string(),
                wait: true,
            },
            &admin,
        )
    };
    let mut files = h.files.clone();
    // A signed URL made before the rewrap.
    let url = files
        .create_signed_url(with_token(
            pb::CreateSignedUrlRequest {
                tenant_id: h.tenant.to_string(),
                file_id: ids[0].clone(),
                ttl: None,
            },
            &h.token,
        ))
        .await
        .unwrap()
        .into_inner()
        .url;
    let http = h.fleet.files().http_addr;
    let target = url
        .strip_prefix(&format!("http://{http}"))
        .unwrap()
        .to_owned();
    assert_eq!(penny_tests::http_request(http, "GET", &target).await.0, 200);

    // Rotated to version 2, rewrapped: every data key moves to version 2, and with the
    // minimum raised to 2 every file still opens.
    rotate(&mut keys).await;
    let done = files.rewrap_tenant(rewrap()).await.unwrap().into_inner();
    assert_eq!(done.state, pb::RewrapState::Succeeded as i32, "{done:?}");
    assert_eq!(
        (
            done.target_key_version,
            done.total_files,
            done.rewrapped_files,
            done.failed_files
        ),
        (2, 3, 3, 0)
    );
    assert_eq!(done.min_key_version_in_use, 2);
    assert!(done.end_time.is_some());
    keys.update_key_config(raise(2)).await.unwrap();
    for (id, content) in ids.iter().zip(&contents) {
        assert_eq!(&h.download(id).await.unwrap(), content);
    }
    // The URL signed for version 1 no longer works.
    assert_eq!(penny_tests::http_request(http, "GET", &target).await.0, 403);

    // Once more: rotate to 3, rewrap, raise the minimum to 3, and every file downloads.
    rotate(&mut keys).await;
    let done = files.rewrap_tenant(rewrap()).await.unwrap().into_inner();
    assert_eq!(
        (
            done.state,
            done.target_key_version,
            done.rewrapped_files,
            done.min_key_version_in_use
        ),
        (pb::RewrapState::Succeeded as i32, 3, 3, 3)
    );
    keys.update_key_config(raise(3)).await.unwrap();
    for (id, content) in ids.iter().zip(&contents) {
        assert_eq!(&h.download(id).await.unwrap(), content);
        let file = files
            .get_file(with_token(
                pb::GetFileRequest {
                    tenant_id: h.tenant.to_string(),
                    file_id: id.clone(),
                },
                &h.token,
            ))
            .await
            .unwrap()
            .into_inner()
            .file
            .unwrap();
        assert_eq!(file.key_version, 3);
    }
    // Nothing left to do: the same job is reported, not a new one.
    let again = files.rewrap_tenant(rewrap()).await.unwrap().into_inner();
    assert_eq!(again.start_time, done.start_time);
    // A tenant's own users cannot start it.
    let status = files
        .rewrap_tenant(with_token(
            pb::RewrapTenantRequest {
                tenant_id: h.tenant.to_string(),
                wait: false,
            },
            &h.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // The test of the test: in another tenant, rotating and raising the minimum without a
    // rewrap leaves its file unreadable.
    let other = Uuid::new_v4();
    keys.create_key(with_token(
        keys_pb::CreateKeyRequest {
            tenant_id: other.to_string(),
        },
        &h.fleet.service_token(),
    ))
    .await
    .unwrap();
    let stranded = h
        .upload_as(other, &admin, &[("s.txt", "text/plain", b"stranded")])
        .await
        .remove(0)
        .id;
    let stranded_url = files
        .create_signed_url(with_token(
            pb::CreateSignedUrlRequest {
                tenant_id: other.to_string(),
                file_id: stranded.clone(),
                ttl: None,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .url;
    let stranded_target = stranded_url
        .strip_prefix(&format!("http://{http}"))
        .unwrap()
        .to_owned();
    assert_eq!(
        penny_tests::http_request(http, "GET", &stranded_target)
            .await
            .0,
        200
    );
    keys.rotate_key(with_token(
        keys_pb::RotateKeyRequest {
            tenant_id: other.to_string(),
        },
        &admin,
    ))
    .await
    .unwrap();
    keys.update_key_config(with_token(
        keys_pb::UpdateKeyConfigRequest {
            tenant_id: other.to_string(),
            min_decryption_version: Some(2),
            deletion_allowed: None,
        },
        &admin,
    ))
    .await
    .unwrap();
    let status = files
        .download(with_token(
            pb::DownloadRequest {
                tenant_id: other.to_string(),
                file_id: stranded,
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    // Its signed URL, still naming the file's key version, can never work again: 403, the
    // same as any refusal, not a 503 that asks the client to retry.
    let (code, _, body) = penny_tests::http_request(http, "GET", &stranded_target).await;
    assert_eq!((code, body.as_slice()), (403, &b"forbidden\n"[..]));
}

#[tokio::test]
async fn a_rewrap_replica_whose_lease_passed_writes_nothing_more() {
    use penny_files::domain::{RewrapJob, RewrapState};
    let h = harness(TestFleet::builder()).await;
    let store = h.store().await;
    let job = |started_at: time::OffsetDateTime| RewrapJob {
        tenant_id: h.tenant,
        state: RewrapState::Running,
        target_key_version: 2,
        total_files: 10,
        rewrapped_files: 0,
        failed_files: 0,
        started_at,
        ended_at: None,
        lease_until: started_at + time::Duration::seconds(30),
    };
    let t0 = time::OffsetDateTime::now_utc();
    let (mut first, claimed) = store.claim_rewrap_job(&job(t0), t0).await.unwrap();
    assert!(claimed);
    first.rewrapped_files = 3;
    assert!(store.save_rewrap_job(&first).await.unwrap());
    // While its lease holds, nobody else takes the job.
    let soon = t0 + time::Duration::seconds(10);
    let (held, claimed) = store.claim_rewrap_job(&job(soon), soon).await.unwrap();
    assert!(!claimed);
    assert_eq!(held.rewrapped_files, 3);
    // The first replica stalls past its lease; a second one takes the job over.
    let later = t0 + time::Duration::seconds(31);
    let (mut second, claimed) = store.claim_rewrap_job(&job(later), later).await.unwrap();
    assert!(claimed);
    // The first one wakes up: neither its progress nor its end is written.
    first.rewrapped_files = 9;
    assert!(!store.save_rewrap_job(&first).await.unwrap());
    first.state = RewrapState::Succeeded;
    first.ended_at = Some(later);
    assert!(!store.save_rewrap_job(&first).await.unwrap());
    let stored = store.rewrap_job(h.tenant).await.unwrap().unwrap();
    assert_eq!(stored.state, RewrapState::Running);
    assert_eq!(stored.rewrapped_files, 0);
    // The holder's own writes go through, its end included; after that, not even it writes.
    second.rewrapped_files = 5;
    assert!(store.save_rewrap_job(&second).await.unwrap());
    second.state = RewrapState::Failed;
    assert!(store.save_rewrap_job(&second).await.unwrap());
    assert!(!store.save_rewrap_job(&second).await.unwrap());
    let stored = store.rewrap_job(h.tenant).await.unwrap().unwrap();
    assert_eq!(
        (stored.state, stored.rewrapped_files),
        (RewrapState::Failed, 5)
    );
}

#[tokio::test]
async fn on_s3_objects_are_sealed_tampering_is_caught_and_a_crash_is_swept() {
    let mut h = harness(TestFleet::builder().files_on_s3()).await;
    let text = "an S3 object must never hold this sentence in the clear. ".repeat(3000);
    let results = h
        .upload(&[
            ("notes.txt", "text/plain", text.as_bytes()),
            ("picture.png", "image/png", PNG),
        ])
        .await
        .unwrap();
    let notes = file_of(&results[0]).clone();
    let picture = file_of(&results[1]).clone();
    assert_eq!(h.download(&notes.id).await.unwrap(), text.as_bytes());
    assert_eq!(h.download(&picture.id).await.unwrap(), PNG);
    // Two objects at generated keys, none left incoming, no plaintext in either.
    let keys = h.fleet.files().s3().unwrap().keys().await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    let s3 = h.fleet.files().s3().unwrap();
    for key in &keys {
        assert!(key.starts_with(&format!("{}/", h.tenant)), "{key}");
        assert!(key.contains(&format!("/{}/", h.user)), "{key}");
        let object = s3.get(key).await.unwrap();
        assert!(
            !object.windows(40).any(|w| w == &text.as_bytes()[..40]),
            "plaintext in {key}"
        );
    }
    let notes_key = keys.iter().find(|k| k.ends_with(".txt")).unwrap().clone();
    // A flipped byte in the bucket: the download fails its check.
    let original = s3.get(&notes_key).await.unwrap();
    let mut flipped = original.clone();
    flipped[penny_files::seal::HEADER + 100] ^= 0x01;
    s3.put(&notes_key, &flipped).await;
    let status = h.download(&notes.id).await.unwrap_err();
    assert_eq!(status.code(), Code::DataLoss);
    s3.put(&notes_key, &original).await;
    assert_eq!(h.download(&notes.id).await.unwrap(), text.as_bytes());
    // A crash mid-upload leaves an incoming object: swept at start.
    s3.put(".incoming/crashed.part", b"sealed bytes").await;
    assert!(
        s3.keys()
            .await
            .iter()
            .any(|k| k == ".incoming/crashed.part")
    );
    h.fleet.restart_files().await;
    let s3 = h.fleet.files().s3().unwrap();
    assert!(!s3.keys().await.iter().any(|k| k.starts_with(".incoming")));
    // Deleting removes the object.
    let files = FileServiceClient::new(h.fleet.files().server.channel().await);
    files
        .clone()
        .delete_file(with_token(
            pb::DeleteFileRequest {
                tenant_id: h.tenant.to_string(),
                file_id: picture.id.clone(),
            },
            &h.fleet.admin_token(),
        ))
        .await
        .unwrap();
    assert_eq!(s3.keys().await, vec![notes_key]);
    h.files = files;
    assert_eq!(h.download(&notes.id).await.unwrap(), text.as_bytes());
}
