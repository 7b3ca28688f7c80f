//! The change feed: paging through the durable `score_changes` table, and the per-process fan-out
//! that pushes new score changes and alerts to GraphQL subscribers.
//!
//! Durability comes from the tables, never from notifications: `NOTIFY healthd_events` only wakes
//! the fan-out, which then reads rows by id since the last one it saw (and polls as a safety net).
//! Ids commit in order (a trigger serialises feed writers, see the `..._alerts` migration), so
//! "everything after id N" is a complete answer.

pub mod changes;
pub mod hub;

pub use changes::{
    latest_score_change_id, score_changes_after, ScoreChangeFilterSpec, ScoreChangeRow,
};
pub use hub::{spawn_fanout, FeedHub};

use crate::db::DbError;

/// The PostgreSQL channel every healthd writer notifies and every process listens on.
pub const CHANNEL: &str = "healthd_events";

/// Errors of the feed and its fan-out.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("LISTEN connection failed: {0}")]
    Listen(#[from] tokio_postgres::Error),
}

impl From<diesel::result::Error> for FeedError {
    fn from(e: diesel::result::Error) -> Self {
        FeedError::Db(DbError::Query(e))
    }
}
