//! Webhooks: receivers admins register, a durable outbox (`webhook_deliveries`, filled by triggers
//! in the same transaction as each alert or score change), and a delivery worker that signs each
//! request, retries with exponential back-off and jitter, and logs every attempt.
//!
//! Delivery is at least once: a row is marked delivered only after the receiver answered 2xx, and
//! never sent again after that, across restarts and processes (rows are claimed with
//! `FOR UPDATE SKIP LOCKED` and a lease). Receivers can drop the rare duplicate (a crash between
//! the 2xx and the bookkeeping) by `X-Healthd-Delivery`.

pub mod signature;
pub mod store;
pub mod worker;

pub use signature::{sign, verify};
pub use store::{NewWebhook, WebhookDeliveryRow, WebhookRow};
pub use worker::{deliver_due, run_delivery_worker, DeliverySettings};

use crate::db::DbError;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    InvalidInput(String),
    #[error("webhook {0} does not exist")]
    NotFound(i64),
    #[error("a webhook named `{0}` already exists")]
    Duplicate(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

impl From<diesel::result::Error> for WebhookError {
    fn from(e: diesel::result::Error) -> Self {
        WebhookError::Db(DbError::Query(e))
    }
}

impl WebhookError {
    pub fn is_client_error(&self) -> bool {
        !matches!(self, WebhookError::Db(_) | WebhookError::Client(_))
    }
}

/// Event types a receiver can subscribe to.
pub const EVENTS: &[&str] = &["alert.raised", "score.changed"];
