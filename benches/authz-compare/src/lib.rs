//! Benchmark-only crate: see benches/decision.rs.
