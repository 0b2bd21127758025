//! Authentication rules, free of transport: password policy and hashing, lockout, IP
//! ranges, TOTP.

pub mod cidr;
pub mod lockout;
pub mod password;
pub mod totp;
