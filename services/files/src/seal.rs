//! Encryption at rest: a file's content is sealed with its own data key in segments
//! (AES-256-GCM, the STREAM construction): each segment's nonce holds its index and a flag
//! that marks the last one, so a reordered, dropped, duplicated or cut segment fails to
//! open, as does any changed byte.
//!
//! An object is a 12-byte header (`PENNYF`, format version 1, segment size) and then the
//! segments, each its ciphertext followed by a 16-byte tag. Every segment but the last
//! holds exactly the segment size of plaintext; the last holds 0..=segment size. The header
//! and the file id are the associated data of every segment.

use aes_gcm::aead::{AeadInOut, KeyInit, Nonce, Tag};
use aes_gcm::{Aes256Gcm, Key};
use uuid::Uuid;
use zeroize::Zeroizing;

/// Plaintext bytes per segment of objects written now.
pub const SEGMENT: usize = 64 * 1024;
/// The tag after each segment.
pub const TAG: usize = 16;
/// The header's length.
pub const HEADER: usize = 12;
const MAGIC: &[u8; 7] = b"PENNYF\0";
const VERSION: u8 = 1;
/// Segment sizes an object may declare.
const SEGMENT_RANGE: std::ops::RangeInclusive<usize> = 1024..=(1 << 20);

/// Sealing or opening failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// The data key is not 32 bytes.
    #[error("the data key is not 256 bits")]
    KeyLength,
    /// The object was changed, cut, reordered, or is not a Penny object.
    #[error("the object failed its integrity check")]
    Integrity,
    /// More segments than the format counts.
    #[error("the file is too large to seal")]
    TooLarge,
}

fn cipher(key: &[u8]) -> Result<Aes256Gcm, SealError> {
    let key = Key::<Aes256Gcm>::try_from(key).map_err(|_| SealError::KeyLength)?;
    Ok(Aes256Gcm::new(&key))
}

fn header(segment: usize) -> [u8; HEADER] {
    let mut header = [0u8; HEADER];
    header[..7].copy_from_slice(MAGIC);
    header[7] = VERSION;
    header[8..].copy_from_slice(&u32::try_from(segment).unwrap_or(u32::MAX).to_be_bytes());
    header
}

fn nonce(index: u32, last: bool) -> Nonce<Aes256Gcm> {
    let mut nonce = [0u8; 12];
    nonce[7..11].copy_from_slice(&index.to_be_bytes());
    nonce[11] = u8::from(last);
    Nonce::<Aes256Gcm>::from(nonce)
}

fn associated_data(header: &[u8; HEADER], file: Uuid) -> [u8; HEADER + 16] {
    let mut aad = [0u8; HEADER + 16];
    aad[..HEADER].copy_from_slice(header);
    aad[HEADER..].copy_from_slice(file.as_bytes());
    aad
}

/// Seals a file's plaintext as it arrives; the output is the object's bytes, in order.
pub struct Sealer {
    cipher: Aes256Gcm,
    aad: [u8; HEADER + 16],
    /// Plaintext of the segment being filled.
    pending: Zeroizing<Vec<u8>>,
    index: u32,
    header_written: bool,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for `file` under `key` (the file's 256-bit data key).
    pub fn new(key: &[u8], file: Uuid) -> Result<Self, SealError> {
        Ok(Self {
            cipher: cipher(key)?,
            aad: associated_data(&header(SEGMENT), file),
            pending: Zeroizing::new(Vec::with_capacity(SEGMENT + TAG)),
            index: 0,
            header_written: false,
        })
    }

    fn write_header(&mut self, out: &mut Vec<u8>) {
        if !self.header_written {
            out.extend_from_slice(&self.aad[..HEADER]);
            self.header_written = true;
        }
    }

    /// Seals `plaintext`, appending whole segments to `out` (a segment is written once the
    /// byte after it arrives, so that the last one can be marked).
    pub fn update(&mut self, mut plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        self.write_header(out);
        while !plaintext.is_empty() {
            if self.pending.len() == SEGMENT {
                self.seal_pending(false, out)?;
            }
            // Whole segments with more after them are sealed straight from the input,
            // without passing through `pending`.
            if self.pending.is_empty() && plaintext.len() > SEGMENT {
                let (segment, rest) = plaintext.split_at(SEGMENT);
                self.seal(segment, false, out)?;
                plaintext = rest;
                continue;
            }
            let take = (SEGMENT - self.pending.len()).min(plaintext.len());
            self.pending.extend_from_slice(&plaintext[..take]);
            plaintext = &plaintext[take..];
        }
        Ok(())
    }

    /// Seals what is left as the last segment.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), SealError> {
        self.write_header(out);
        self.seal_pending(true, out)
    }

    fn seal_pending(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), SealError> {
        let pending = std::mem::take(&mut self.pending);
        let sealed = self.seal(&pending, last, out);
        self.pending = pending;
        self.pending.clear();
        sealed
    }

    fn seal(&mut self, plaintext: &[u8], last: bool, out: &mut Vec<u8>) -> Result<(), SealError> {
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .cipher
            .encrypt_inout_detached(
                &nonce(self.index, last),
                &self.aad,
                (&mut out[start..]).into(),
            )
            .map_err(|_| SealError::TooLarge)?;
        out.extend_from_slice(&tag);
        self.index = self.index.checked_add(1).ok_or(SealError::TooLarge)?;
        Ok(())
    }
}

/// Opens an object as its bytes arrive, returning plaintext only once its segment is
/// authenticated.
pub struct Opener {
    cipher: Aes256Gcm,
    file: Uuid,
    aad: Option<[u8; HEADER + 16]>,
    segment: usize,
    /// Bytes received and not yet opened.
    pending: Vec<u8>,
    index: u32,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// An opener for `file`'s object under `key`.
    pub fn new(key: &[u8], file: Uuid) -> Result<Self, SealError> {
        Ok(Self {
            cipher: cipher(key)?,
            file,
            aad: None,
            segment: 0,
            pending: Vec::with_capacity(SEGMENT + TAG + 1),
            index: 0,
        })
    }

    /// Takes the next bytes of the object; appends what they complete to `out`.
    pub fn update(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        if self.aad.is_none() {
            let take = (HEADER - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() < HEADER {
                return Ok(());
            }
            let mut header = [0u8; HEADER];
            header.copy_from_slice(&self.pending[..HEADER]);
            self.pending.clear();
            if &header[..7] != MAGIC || header[7] != VERSION {
                return Err(SealError::Integrity);
            }
            let mut size = [0u8; 4];
            size.copy_from_slice(&header[8..]);
            let segment =
                usize::try_from(u32::from_be_bytes(size)).map_err(|_| SealError::Integrity)?;
            if !SEGMENT_RANGE.contains(&segment) {
                return Err(SealError::Integrity);
            }
            self.segment = segment;
            self.aad = Some(associated_data(&header, self.file));
        }
        let sealed = self.segment + TAG;
        while !bytes.is_empty() {
            // A full segment is opened as not-last only once a byte after it is seen.
            if self.pending.len() == sealed {
                self.open_pending(false, out)?;
            }
            let take = (sealed - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
        }
        Ok(())
    }

    /// Opens the last segment; fails when the object was cut short.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), SealError> {
        if self.aad.is_none() || self.pending.len() < TAG {
            return Err(SealError::Integrity);
        }
        self.open_pending(true, out)
    }

    fn open_pending(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), SealError> {
        let aad = self.aad.ok_or(SealError::Integrity)?;
        let body = self.pending.len() - TAG;
        let tag =
            Tag::<Aes256Gcm>::try_from(&self.pending[body..]).map_err(|_| SealError::Integrity)?;
        let start = out.len();
        out.extend_from_slice(&self.pending[..body]);
        self.pending.clear();
        if self
            .cipher
            .decrypt_inout_detached(
                &nonce(self.index, last),
                &aad,
                (&mut out[start..]).into(),
                &tag,
            )
            .is_err()
        {
            out.truncate(start);
            return Err(SealError::Integrity);
        }
        self.index = self.index.checked_add(1).ok_or(SealError::Integrity)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn seal(file: Uuid, plaintext: &[u8], chunk: usize) -> Vec<u8> {
        let mut sealer = Sealer::new(&KEY, file).unwrap();
        let mut out = Vec::new();
        for part in plaintext.chunks(chunk.max(1)) {
            sealer.update(part, &mut out).unwrap();
        }
        sealer.finish(&mut out).unwrap();
        out
    }

    fn open(file: Uuid, object: &[u8], chunk: usize) -> Result<Vec<u8>, SealError> {
        let mut opener = Opener::new(&KEY, file)?;
        let mut out = Vec::new();
        for part in object.chunks(chunk.max(1)) {
            opener.update(part, &mut out)?;
        }
        opener.finish(&mut out)?;
        Ok(out)
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect()
    }

    #[test]
    fn round_trips_at_every_size_and_split() {
        let file = Uuid::now_v7();
        for len in [
            0,
            1,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            3 * SEGMENT,
            3 * SEGMENT + 17,
        ] {
            let plaintext = sample(len);
            for chunk in [1000, SEGMENT, 100_000] {
                let object = seal(file, &plaintext, chunk);
                assert_eq!(
                    object.len(),
                    HEADER + len + len.div_ceil(SEGMENT).max(1) * TAG
                );
                for read in [1, 4096, 70_000] {
                    if len > 200_000 && read == 1 {
                        continue;
                    }
                    assert_eq!(
                        open(file, &object, read).unwrap(),
                        plaintext,
                        "len {len} chunk {chunk} read {read}"
                    );
                }
            }
        }
    }

    #[test]
    fn any_change_cut_or_reorder_fails() {
        let file = Uuid::now_v7();
        let plaintext = sample(3 * SEGMENT + 100);
        let object = seal(file, &plaintext, 50_000);
        let sealed = SEGMENT + TAG;
        // A flipped bit anywhere: header, body, tag.
        for at in [
            0,
            8,
            HEADER,
            HEADER + 5,
            HEADER + sealed - 1,
            object.len() - 1,
        ] {
            let mut changed = object.clone();
            changed[at] ^= 0x01;
            assert_eq!(
                open(file, &changed, 9000),
                Err(SealError::Integrity),
                "flip at {at}"
            );
        }
        // Cut at a segment boundary, inside a segment, or to nothing.
        for len in [
            0,
            HEADER,
            HEADER + sealed,
            HEADER + 2 * sealed,
            object.len() - 1,
        ] {
            assert_eq!(
                open(file, &object[..len], 9000),
                Err(SealError::Integrity),
                "cut to {len}"
            );
        }
        // Two segments swapped, one repeated, one dropped.
        let seg = |i: usize| &object[HEADER + i * sealed..HEADER + (i + 1) * sealed];
        let rest = &object[HEADER + 3 * sealed..];
        let build = |order: &[usize]| {
            let mut out = object[..HEADER].to_vec();
            for &i in order {
                out.extend_from_slice(seg(i));
            }
            out.extend_from_slice(rest);
            out
        };
        for order in [&[1, 0, 2][..], &[0, 0, 2], &[0, 2], &[0, 1, 2, 2]] {
            assert_eq!(
                open(file, &build(order), 9000),
                Err(SealError::Integrity),
                "{order:?}"
            );
        }
        assert_eq!(open(file, &build(&[0, 1, 2]), 9000).unwrap(), plaintext);
        // Another file's id, or trailing bytes.
        assert_eq!(
            open(Uuid::now_v7(), &object, 9000),
            Err(SealError::Integrity)
        );
        let mut longer = object.clone();
        longer.push(0);
        assert_eq!(open(file, &longer, 9000), Err(SealError::Integrity));
    }

    #[test]
    fn sealed_objects_hold_no_plaintext() {
        let plaintext = b"a very recognisable secret sentence ".repeat(1000);
        let object = seal(Uuid::now_v7(), &plaintext, 4096);
        assert!(!object.windows(20).any(|w| w == &plaintext[..20]));
    }
}
