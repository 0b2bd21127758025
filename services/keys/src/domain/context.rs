//! The encryption context: what a ciphertext is bound to.

use super::TenantId;

/// Longest purpose, in bytes.
pub const MAX_PURPOSE_LEN: usize = 64;
/// Longest object id, in bytes.
pub const MAX_OBJECT_ID_LEN: usize = 256;

/// The tenant, purpose and object a ciphertext belongs to. Bound as AES-GCM associated data
/// by the local engine and as the key-derivation context by Vault (`derived=true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptionContext {
    /// The tenant whose key is used.
    pub tenant_id: TenantId,
    /// What the data is for (`mfa`, `file`, `signing-key`…): `[a-z0-9_.-]{1,64}`.
    pub purpose: String,
    /// The object it belongs to: 1..=256 bytes.
    pub object_id: String,
}

impl EncryptionContext {
    /// An unambiguous byte encoding: a domain tag, the tenant's 16 bytes, then purpose and
    /// object id each prefixed by its 2-byte big-endian length. No two contexts encode
    /// alike, so no choice of strings can make one context pass for another.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 16 + 4 + self.purpose.len() + self.object_id.len());
        out.extend_from_slice(b"penny.context.v1");
        out.extend_from_slice(self.tenant_id.0.as_bytes());
        for part in [&self.purpose, &self.object_id] {
            let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn ctx(tenant: Uuid, purpose: &str, object: &str) -> EncryptionContext {
        EncryptionContext {
            tenant_id: TenantId(tenant),
            purpose: purpose.into(),
            object_id: object.into(),
        }
    }

    #[test]
    fn encoding_is_unambiguous() {
        let t = Uuid::new_v4();
        assert_ne!(ctx(t, "ab", "c").encode(), ctx(t, "a", "bc").encode());
        assert_ne!(
            ctx(t, "a", "b").encode(),
            ctx(Uuid::new_v4(), "a", "b").encode()
        );
        assert_eq!(ctx(t, "a", "b").encode(), ctx(t, "a", "b").encode());
    }
}
