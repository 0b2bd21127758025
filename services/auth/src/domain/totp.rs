//! TOTP (RFC 6238: SHA-1, 6 digits, 30 s steps, ±1 step), recovery codes, and the QR code
//! of the `otpauth://` URI as a PNG.

use sha2::{Digest, Sha256};
use totp_rs::{Algorithm, Builder, Secret, Totp};
use uuid::Uuid;

/// The issuer shown in authenticator apps.
pub const ISSUER: &str = "PENNY";
/// Seconds per step.
pub const STEP_SECS: u64 = 30;
/// Recovery codes issued on confirmation.
pub const RECOVERY_CODES: usize = 10;

/// Why a TOTP could not be built (a stored secret that is not one).
#[derive(Debug, thiserror::Error)]
#[error("TOTP: {0}")]
pub struct TotpError(String);

/// A fresh 160-bit secret.
pub fn new_secret() -> Vec<u8> {
    let mut bytes = vec![0u8; 20];
    rand::fill(&mut bytes[..]);
    bytes
}

/// The TOTP of a secret, for `account` (the user's email).
pub fn totp(secret: &[u8], account: &str) -> Result<Totp, TotpError> {
    // The otpauth label may not contain ':'; an email never does, but be safe.
    let account = account.replace(':', "");
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(6)
        .with_skew(1)
        .with_step_duration(STEP_SECS)
        .with_secret(Secret::new(secret.to_vec().into_boxed_slice()))
        .with_issuer(Some(ISSUER))
        .with_account_name(account)
        .build()
        .map_err(|e| TotpError(e.to_string()))
}

/// The secret in base32 without padding, for manual entry.
pub fn secret_base32(secret: &[u8]) -> String {
    Secret::new(secret.to_vec().into_boxed_slice()).to_base32()
}

/// The step a 6-digit `code` matches at `now` (current step ±1), if any. Only digits are
/// accepted.
pub fn matching_step(totp: &Totp, code: &str, now: u64) -> Option<u64> {
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    totp.check(code, now)
}

/// A recovery code: 10 characters of base32 in two groups (`abcde-fghij`, 50 bits).
pub fn new_recovery_code() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut bytes = [0u8; 10];
    rand::fill(&mut bytes[..]);
    let chars: String = bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 31)]))
        .collect();
    format!("{}-{}", &chars[..5], &chars[5..])
}

/// What is stored for a recovery code: SHA-256 over the user id and the code as typed
/// (lowercase, without spaces or dashes), hex.
pub fn recovery_code_hash(user: Uuid, code: &str) -> String {
    let normalised: String = code
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .flat_map(char::to_lowercase)
        .collect();
    let mut hasher = Sha256::new();
    hasher.update(user.as_bytes());
    hasher.update(normalised.as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A PNG image of the QR code for `text` (medium error correction, 4 pixels per module,
/// a 4-module quiet zone).
pub fn qr_png(text: &str) -> Option<Vec<u8>> {
    let code = qrcodegen::QrCode::encode_text(text, qrcodegen::QrCodeEcc::Medium).ok()?;
    const SCALE: usize = 4;
    const BORDER: i32 = 4;
    let modules = usize::try_from(code.size() + 2 * BORDER).ok()?;
    let side = modules * SCALE;
    // 8-bit greyscale rows, each starting with filter type 0.
    let mut raw = Vec::with_capacity(side * (side + 1));
    for y in 0..side {
        raw.push(0u8);
        let my = i32::try_from(y / SCALE).ok()? - BORDER;
        for x in 0..side {
            let mx = i32::try_from(x / SCALE).ok()? - BORDER;
            raw.push(if code.get_module(mx, my) { 0 } else { 255 });
        }
    }
    let side = u32::try_from(side).ok()?;
    Some(png::encode_grey(side, side, &raw))
}

/// The smallest PNG writer that suffices: one IDAT of stored (uncompressed) deflate blocks.
mod png {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn adler32(bytes: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &byte in bytes {
            a = (a + u32::from(byte)) % 65_521;
            b = (b + a) % 65_521;
        }
        (b << 16) | a
    }

    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }

    /// A greyscale PNG of `raw` (rows already prefixed with their filter byte).
    pub fn encode_grey(width: u32, height: u32, raw: &[u8]) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut header = Vec::with_capacity(13);
        header.extend_from_slice(&width.to_be_bytes());
        header.extend_from_slice(&height.to_be_bytes());
        header.extend_from_slice(&[8, 0, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &header);
        let mut zlib = vec![0x78, 0x01];
        let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
        for (i, block) in blocks.iter().enumerate() {
            zlib.push(u8::from(i + 1 == blocks.len()));
            let len = u16::try_from(block.len()).unwrap_or(u16::MAX);
            zlib.extend_from_slice(&len.to_le_bytes());
            zlib.extend_from_slice(&(!len).to_le_bytes());
            zlib.extend_from_slice(block);
        }
        zlib.extend_from_slice(&adler32(raw).to_be_bytes());
        chunk(&mut out, b"IDAT", &zlib);
        chunk(&mut out, b"IEND", &[]);
        out
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn checksums_match_known_values() {
            assert_eq!(super::crc32(b"IEND"), 0xAE42_6082);
            assert_eq!(super::adler32(b"Wikipedia"), 0x11E6_0398);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_their_step_and_neighbours_only() {
        let secret = new_secret();
        let t = totp(&secret, "ada@example.org").unwrap();
        let now = 1_800_000_000;
        let code = t.generate(now);
        let code = code.to_string();
        assert_eq!(matching_step(&t, &code, now), Some(now / STEP_SECS));
        assert_eq!(
            matching_step(&t, &code, now + STEP_SECS),
            Some(now / STEP_SECS)
        );
        assert_eq!(matching_step(&t, &code, now + 2 * STEP_SECS), None);
        assert_eq!(matching_step(&t, "12345", now), None);
        assert_eq!(matching_step(&t, "12345a", now), None);
        let uri = t.to_url().unwrap();
        assert!(
            uri.starts_with("otpauth://totp/PENNY:ada%40example.org?"),
            "{uri}"
        );
        assert!(uri.contains("issuer=PENNY"), "{uri}");
    }

    #[test]
    fn recovery_codes_hash_the_same_however_typed() {
        let user = Uuid::new_v4();
        let code = new_recovery_code();
        assert_eq!(code.len(), 11);
        let upper = code.to_uppercase().replace('-', " ");
        assert_eq!(
            recovery_code_hash(user, &code),
            recovery_code_hash(user, &upper)
        );
        assert_ne!(
            recovery_code_hash(user, &code),
            recovery_code_hash(Uuid::new_v4(), &code)
        );
    }

    #[test]
    fn the_qr_code_is_a_png() {
        let png = qr_png("otpauth://totp/PENNY:a?secret=AAAA&issuer=PENNY").unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(png.ends_with(&[0xAE, 0x42, 0x60, 0x82]));
    }
}
