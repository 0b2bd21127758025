//! AIP-158 page tokens: an opaque, URL-safe encoding of the last item's sort key.
//!
//! A token only says where to resume; it grants nothing. Every list still runs under the
//! caller's tenant scope, so a token forged or carried over from another tenant's listing
//! can only skip rows the caller could see anyway.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::{ApiError, Reason};

/// Longest page token accepted: the base64 of the longest sort key any list uses (a
/// case-folded name of 128 characters, up to 512 bytes), with room to spare.
const MAX_TOKEN_LEN: usize = 1024;

/// The token that resumes after `cursor`.
pub fn encode_page_token(cursor: &str) -> String {
    URL_SAFE_NO_PAD.encode(cursor.as_bytes())
}

/// The cursor in `token`, `None` for the first page (an empty token).
pub fn decode_page_token(token: &str) -> Result<Option<String>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(page_token_error());
    }
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .map(Some)
        .ok_or_else(page_token_error)
}

/// INVALID_ARGUMENT / PAGE_TOKEN_INVALID: a token this service did not issue.
pub fn page_token_error() -> ApiError {
    ApiError::new(
        tonic::Code::InvalidArgument,
        Reason::PageTokenInvalid,
        "page_token is not a token this service issued",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejection() {
        assert_eq!(decode_page_token("").unwrap(), None);
        // The longest cursor a listing makes (128 four-byte characters) round-trips.
        let longest = "𝔸".repeat(128);
        assert_eq!(
            decode_page_token(&encode_page_token(&longest)).unwrap(),
            Some(longest)
        );
        let token = encode_page_token("2026-12-04T10:00:00Z|abc");
        assert_eq!(
            decode_page_token(&token).unwrap().as_deref(),
            Some("2026-12-04T10:00:00Z|abc")
        );
        for bad in ["***", "/x", &"A".repeat(1100)] {
            assert_eq!(
                decode_page_token(bad).unwrap_err().reason(),
                Reason::PageTokenInvalid
            );
        }
    }
}
