//! Authentication rules, free of transport: password policy and hashing, lockout.

pub mod lockout;
pub mod password;
