//! The GraphQL API. `schema.rs` assembles it; each domain file holds thin resolvers that call
//! domain code; `loaders.rs` batches nested fields per request.

pub mod accounts;
pub mod admin;
pub mod alerts;
pub mod connectors;
pub mod errors;
pub mod loaders;
pub mod schema;
pub mod scoring;
pub mod subscriptions;

pub use errors::internal;
pub use schema::{build_schema, sdl, HealthdSchema};
