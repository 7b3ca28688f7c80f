//! Benchmark commands (being written).

pub mod ingest;
pub mod scoring;
pub mod subscriptions;
