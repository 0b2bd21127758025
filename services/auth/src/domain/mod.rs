//! Authentication rules, free of transport: password policy and hashing, lockout, IP
//! ranges.

pub mod cidr;
pub mod lockout;
pub mod password;
