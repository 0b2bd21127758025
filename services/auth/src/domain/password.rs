//! Passwords: the policy a new password must meet, and argon2id hashing.
//!
//! Hashes are PHC strings (`$argon2id$v=19$m=19456,t=2,p=1$…`), so the parameters travel
//! with each hash and can be raised later without breaking old ones. Verification of an
//! unknown account runs against a dummy hash of the same cost, so the time and the answer
//! are the same whether the account exists or not. Hashing is CPU-bound (≈ 20 ms here): it
//! runs on the blocking pool, at most one hash per core at a time, so a login burst queues
//! instead of starving the async runtime.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

/// Argon2id memory cost in KiB (OWASP: at least 19 MiB).
pub const MEMORY_KIB: u32 = 19 * 1024;
/// Argon2id passes (OWASP: at least 2 with 19 MiB).
pub const ITERATIONS: u32 = 2;
/// Argon2id lanes.
pub const PARALLELISM: u32 = 1;
/// Shortest password, in Unicode code points.
pub const MIN_CHARS: usize = 8;
/// Longest password, in Unicode code points.
pub const MAX_CHARS: usize = 1024;

/// The shipped list of common passwords, one per line, lower-case.
const COMMON: &str = include_str!("common-passwords.txt");

fn common() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| COMMON.lines().filter(|l| !l.is_empty()).collect())
}

/// Why a new password is refused, if it is. Length counts code points; any Unicode is
/// accepted; there are no composition rules. `email` is the account's own email, which
/// is never an acceptable password either.
pub fn policy_problem(password: &str, email: &str) -> Option<&'static str> {
    let chars = password.chars().count();
    if chars < MIN_CHARS {
        return Some("must be at least 8 characters");
    }
    if chars > MAX_CHARS {
        return Some("must be at most 1024 characters");
    }
    let folded = Zeroizing::new(password.to_lowercase());
    if common().contains(folded.as_str()) {
        return Some("is too common: it appears in a list of frequently used passwords");
    }
    if !email.is_empty() && *folded == email.to_lowercase() {
        return Some("must not be the account's email address");
    }
    None
}

fn argon2() -> Argon2<'static> {
    // Constant, valid parameters: `new` cannot fail for them, and a failure would fall back
    // to the crate's defaults (also argon2id, also OWASP-grade) rather than panic.
    let params = Params::new(MEMORY_KIB, ITERATIONS, PARALLELISM, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Why hashing failed (never the password).
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// The hasher failed (out of memory, RNG failure).
    #[error("password hashing failed")]
    Failed,
    /// The blocking task was lost.
    #[error("password hashing was interrupted")]
    Interrupted,
}

/// Hashes and verifies passwords on the blocking pool, a bounded number at a time.
#[derive(Clone, Debug)]
pub struct PasswordHasherPool {
    permits: Arc<Semaphore>,
    dummy: Arc<str>,
}

impl PasswordHasherPool {
    /// A pool running at most `concurrency` hashes at once (the number of cores is right).
    pub fn new(concurrency: usize) -> Result<Self, HashError> {
        let secret = Zeroizing::new(uuid::Uuid::new_v4().to_string());
        let dummy = hash_blocking(secret.as_bytes())?;
        Ok(Self {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            dummy: dummy.into(),
        })
    }

    /// The PHC string of `password`, with a fresh random salt.
    pub async fn hash(&self, password: &str) -> Result<String, HashError> {
        let password = Zeroizing::new(password.as_bytes().to_vec());
        // The permit moves into the blocking task: a caller that goes away cannot free it
        // while the hash still runs.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| HashError::Interrupted)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            hash_blocking(&password)
        })
        .await
        .map_err(|_| HashError::Interrupted)?
    }

    /// Whether `password` matches `phc`. With `None` (no such account, or no password set)
    /// it verifies against the dummy hash and answers `false`, taking the same time.
    pub async fn verify(&self, password: &str, phc: Option<&str>) -> Result<bool, HashError> {
        let password = Zeroizing::new(password.as_bytes().to_vec());
        let known = phc.is_some();
        let phc: Arc<str> = phc.map_or_else(|| self.dummy.clone(), Arc::from);
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| HashError::Interrupted)?;
        let matched = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            verify_blocking(&password, &phc)
        })
        .await
        .map_err(|_| HashError::Interrupted)?;
        Ok(known && matched)
    }
}

/// One verification on the calling thread, exactly as sign-in does it (for the benchmark
/// that compares sign-in with the bare hash rate).
pub fn verify_blocking(password: &[u8], phc: &str) -> bool {
    let Ok(parsed) = argon2::PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
        return false;
    };
    let argon2id_v19 = parsed.algorithm == argon2::ARGON2ID_IDENT && parsed.version == Some(0x13);
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    if !argon2id_v19 {
        // Not what this service writes: let the crate handle it (allocating as it goes).
        return argon2().verify_password(password, phc).is_ok();
    }
    let hasher = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut computed = Zeroizing::new(vec![0u8; expected.as_bytes().len()]);
    let hashed = WORKING_MEMORY.with(|memory| {
        let Ok(mut memory) = memory.try_borrow_mut() else {
            return false;
        };
        let needed = params.block_count();
        if memory.len() < needed {
            memory.resize(needed, argon2::Block::default());
        }
        hasher
            .hash_password_into_with_memory(password, salt, &mut computed, &mut memory[..needed])
            .is_ok()
    });
    hashed
        && bool::from(subtle::ConstantTimeEq::ct_eq(
            computed.as_slice(),
            expected.as_bytes(),
        ))
}

thread_local! {
    /// Argon2's working memory, kept per thread: a verification reuses it instead of
    /// allocating (and faulting in) 19 MiB afresh, so memory stays bounded by the threads
    /// that hash, and hashing on a busy server costs what it costs on an idle one.
    static WORKING_MEMORY: std::cell::RefCell<Vec<argon2::Block>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// One hash on the calling thread (for the benchmark's setup).
pub fn hash_blocking(password: &[u8]) -> Result<String, HashError> {
    argon2()
        .hash_password(password)
        .map(|hash| hash.to_string())
        .map_err(|_| HashError::Failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_counts_code_points_and_refuses_common_and_own_email() {
        assert!(policy_problem("short", "").is_some());
        assert!(policy_problem("ñandú🦀", "").is_some(), "7 code points");
        assert_eq!(
            policy_problem("ñandú🦀🦀x", ""),
            None,
            "8 code points, any Unicode"
        );
        assert_eq!(policy_problem(&"a".repeat(1024), ""), None);
        assert!(policy_problem(&"a".repeat(1025), "").is_some());
        assert_eq!(policy_problem("correct horse battery staple", ""), None);
        for common in [
            "password",
            "Password1",
            "12345678",
            "QWERTY123",
            "iloveyou",
            "letmein123",
        ] {
            assert!(policy_problem(common, "").is_some(), "{common}");
        }
        assert!(policy_problem("Ada@Example.org", "ada@example.org").is_some());
    }

    #[test]
    fn verification_with_reused_memory_matches_the_crate() {
        let phc = hash_blocking(b"correct horse battery staple").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        // Twice on one thread: the second run reuses the first one's memory.
        for _ in 0..2 {
            assert!(verify_blocking(b"correct horse battery staple", &phc));
            assert!(!verify_blocking(b"correct horse battery stapler", &phc));
        }
        // Smaller parameters on the same thread (the memory is larger than needed).
        let small = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(64, 1, 1, None).unwrap(),
        )
        .hash_password(b"pw")
        .unwrap()
        .to_string();
        assert!(verify_blocking(b"pw", &small));
        assert!(!verify_blocking(b"pX", &small));
        // What this service never writes still verifies, through the crate.
        let argon2i = Argon2::new(
            Algorithm::Argon2i,
            Version::V0x13,
            Params::new(64, 1, 1, None).unwrap(),
        )
        .hash_password(b"pw")
        .unwrap()
        .to_string();
        assert!(verify_blocking(b"pw", &argon2i));
        assert!(!verify_blocking(b"px", &argon2i));
        // Garbage is no match.
        assert!(!verify_blocking(b"pw", "$argon2id$v=19$garbage"));
        assert!(!verify_blocking(b"pw", ""));
    }

    #[test]
    fn the_list_holds_only_what_length_alone_would_not_catch() {
        assert!(common().len() > 1000);
        assert!(common().iter().all(|p| p.chars().count() >= MIN_CHARS));
        assert!(common().iter().all(|p| *p == p.to_lowercase()));
    }

    #[tokio::test]
    async fn hashes_are_argon2id_at_owasp_cost_salted_and_verifiable() {
        let pool = PasswordHasherPool::new(2).unwrap();
        let first = pool.hash("correct horse battery staple").await.unwrap();
        let second = pool.hash("correct horse battery staple").await.unwrap();
        assert!(
            first.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{first}"
        );
        assert_ne!(first, second, "a fresh salt each time");
        assert!(!first.contains("horse"));
        assert!(
            pool.verify("correct horse battery staple", Some(&first))
                .await
                .unwrap()
        );
        assert!(
            !pool
                .verify("correct horse battery stapler", Some(&first))
                .await
                .unwrap()
        );
        // No account: the dummy is verified and the answer is always no.
        assert!(!pool.verify("anything at all", None).await.unwrap());
        assert!(!pool.verify("", Some("not a phc string")).await.unwrap());
    }
}
