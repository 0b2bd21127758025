//! Penny authentication. This first part holds the rules every credential path shares:
//! the password policy and argon2id hashing, and lockout counters kept exactly under
//! concurrency in the auth database. The gRPC service (login, MFA, tokens, sessions, API
//! keys) is built on them and is not served yet.

#![forbid(unsafe_code)]

pub mod domain;
pub mod migration;
pub mod store;
