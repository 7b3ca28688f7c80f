//! Benchmark commands (`healthd bench …`); small runs of each are part of the test suite.

pub mod ingest;
pub mod scoring;
pub mod subscriptions;
