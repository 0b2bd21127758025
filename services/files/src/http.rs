//! Signed downloads over plain HTTP/1.1: `GET /v1/files/<tenant>/<file>?expires=…&kv=…&sig=…`
//! (see [`crate::signed`]). A URL that is not valid, or no longer names a clean file at
//! the key version it was signed for, gets 403 and the same short body whatever the
//! reason. The content is decrypted as it streams, with `Content-Disposition: attachment`;
//! the platform adds the security headers to every response.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::{
    ALLOW, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER,
};
use penny_platform::http::PeerAddr;

use crate::service::{Files, SignedDownloadError};

/// The HTTP routes of the files service.
pub fn router(files: Files) -> axum::Router {
    axum::Router::new().fallback(download).with_state(files)
}

fn forbidden() -> Response {
    (
        StatusCode::FORBIDDEN,
        [(CONTENT_TYPE, "text/plain; charset=utf-8")],
        "forbidden\n",
    )
        .into_response()
}

/// `attachment; filename="<ASCII stand-in>"; filename*=UTF-8''<percent-encoded name>`
/// (RFC 6266): quotes, backslashes and anything outside printable ASCII never reach the
/// quoted form.
pub fn content_disposition(display_name: &str) -> String {
    let ascii: String = display_name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in display_name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

async fn download(State(files): State<Files>, request: Request) -> Response {
    if request.method() != http::Method::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, [(ALLOW, "GET")]).into_response();
    }
    let peer = request
        .extensions()
        .get::<PeerAddr>()
        .map(|info| info.0.ip());
    let uri = request.uri();
    let (file, mut reader) = match files.open_signed(uri.path(), uri.query(), peer).await {
        Ok(opened) => opened,
        Err(SignedDownloadError::Refused) => return forbidden(),
        Err(SignedDownloadError::Unavailable) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(RETRY_AFTER, "1")],
                "unavailable; retry later\n",
            )
                .into_response();
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let id = file.id;
    tokio::spawn(async move {
        while let Some(next) = reader.next().await {
            let message = match next {
                Ok(bytes) if bytes.is_empty() => continue,
                Ok(bytes) => Ok(bytes::Bytes::from(bytes)),
                Err(err) => {
                    // The body ends short of its Content-Length: the client sees a
                    // broken download, never bytes that failed their check.
                    tracing::error!(file = %id, error = %err.message(), "a signed download failed its integrity check");
                    Err(std::io::Error::other("integrity check failed"))
                }
            };
            let failed = message.is_err();
            if tx.send(message).await.is_err() || failed {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    (
        StatusCode::OK,
        [
            (CONTENT_TYPE, file.content_type.clone()),
            (CONTENT_LENGTH, file.size_bytes.to_string()),
            (CONTENT_DISPOSITION, content_disposition(&file.display_name)),
            (CACHE_CONTROL, "private, no-store".to_owned()),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispositions_are_attachments_with_safe_names() {
        assert_eq!(
            content_disposition("report.pdf"),
            "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"
        );
        assert_eq!(
            content_disposition("a \"b\"\\c é.txt"),
            "attachment; filename=\"a _b__c _.txt\"; filename*=UTF-8''a%20%22b%22%5Cc%20%C3%A9.txt"
        );
    }
}
