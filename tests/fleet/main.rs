//! Fleet-level tests: one binary, one module per concern.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod access_tables;
mod api_keys;
mod audit;
mod audit_client;
mod auth;
mod authz;
mod db;
mod enforcement;
mod files;
mod ip_blocks;
mod isolation;
mod keys;
mod mfa;
mod monitor;
mod platform;
mod service_tokens;
mod sessions;
mod signing_keys;
mod tenants;
mod vault_contract;
