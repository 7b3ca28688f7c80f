//! Turning domain errors into client-safe GraphQL errors.

use async_graphql::ErrorExtensions;

/// Logs the real error and returns one that carries no SQL, paths or stack traces.
pub fn internal(err: impl std::fmt::Display) -> async_graphql::Error {
    let reference = uuid::Uuid::new_v4().simple().to_string();
    let reference = &reference[..12];
    tracing::error!(error = %err, reference, "request failed");
    async_graphql::Error::new(format!(
        "internal error (reference {reference}); see the server log"
    ))
    .extend_with(|_, e| e.set("code", "INTERNAL"))
}

/// A client mistake: the message is shown as is.
pub fn bad_input(message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message.into()).extend_with(|_, e| e.set("code", "BAD_USER_INPUT"))
}

pub fn not_found(message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message.into()).extend_with(|_, e| e.set("code", "NOT_FOUND"))
}
