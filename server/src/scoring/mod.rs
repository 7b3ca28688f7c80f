//! Scoring: turns usage, support and billing facts into a 0–100 health score per account, with the
//! reasons in plain words.
//!
//! - [`engine::score_account`] is the one pure scoring function over (facts as of T, T, model). Today's
//!   scores, history rebuilds, the model split of `healthChange` and calibration backtests all use it.
//! - [`inputs`] loads every account's facts as of T with one set-based statement per batch of accounts.
//! - [`run::rescore`] scores in bulk and writes `health_current`, `health_scores` and `score_changes`
//!   in one transaction per batch (the feed's trigger sends `NOTIFY healthd_events` with it).
//! - [`model`] holds weights, curves, tiers, caps and segments, versioned in `scoring_models`.
//!
//! # The stored `signals` JSON (contract with the read API)
//!
//! `health_scores.signals` (a `json` column) holds an array of objects with these keys ([`breakdown`]
//! writes them). Each breakdown is stored once: the current score's is `health_current.signals` when
//! set (its breakdown changed since its last history row, score and tier did not), else that of the
//! history row `health_current.history_at` names. The view `current_health_scores` resolves it;
//! readers use the view.
//!
//! | key | meaning |
//! | --- | --- |
//! | `key` | `login_recency`, `breadth`, `frequency`, `usage_trend`, `feature_adoption`, `support`, `billing`; `override:<name>` for a score cap; `freshness:<kind>` for stale data |
//! | `value` | the raw number (days since login, active users, percent change, tickets in 30 days, days overdue...) |
//! | `score` | 0–1 |
//! | `weight` | points this signal could earn in this score (after missing signals' weight was shared out; the weights of present signals sum to 100) |
//! | `contribution` | points earned (`weight × score`; a cap entry holds minus the points it took) |
//! | `impact` | points lost (`weight − contribution`; for a cap, the points it took) |
//! | `explanation` | plain words with the real numbers ("No login in 21 days") |
//! | `missing` | present and `true` only when there is no data of this kind for the account; weight 0, left out of the score |
//! | `stale` | present and `true` only on `freshness:<kind>` entries ("Usage data is 3 days old"); their impact is 0 |
//!
//! The read API adds `label` ("Login recency"), derived from `key` ([`breakdown::label_for`]);
//! rows written by earlier versions also carry `label`, `source` and `configured_weight`, which
//! readers ignore. A feed row (`score_changes`) has the drivers of the
//! history row written with it (same account, same moment): readers derive them with the SQL function
//! `healthd_breakdown_drivers`; feed rows from earlier versions stored them in `drivers`.
//!
//! The score equals the sum of `contribution`s (rounded to one decimal). **Drivers** are derived on
//! read: entries with `stale: true` first, then entries with `impact > 0`, largest impact first
//! ([`engine::drivers`] implements the rule). A stale score also has `stale = true` on the row.

pub mod breakdown;
pub mod calibration;
pub mod daily;
pub mod diff;
pub mod engine;
pub mod inputs;
pub mod model;
pub mod preview;
pub mod report;
pub mod run;
pub mod signals;

pub use calibration::{calibrate, CalibrationReport};
pub use daily::run_daily;
pub use diff::{health_change, HealthChange, SignalDelta};
pub use engine::{score_account, Score, SignalScore, Tier};
pub use model::{ModelConfig, ScoringModel};
pub use run::{recompute_now, rescore, rescore_at, RescoreScope, RescoreSummary};

/// Errors from scoring. `Display` is for logs and admins; GraphQL maps them to client-safe errors.
#[derive(Debug, thiserror::Error)]
pub enum ScoringError {
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("database connection unavailable: {0}")]
    Pool(#[from] diesel_async::pooled_connection::bb8::RunError),
    #[error("invalid scoring model: {0}")]
    InvalidModel(String),
    #[error("scoring model version {0} does not exist")]
    ModelNotFound(i32),
    #[error("account {0} does not exist")]
    AccountNotFound(i64),
    #[error("cannot calibrate: {0}")]
    Calibration(String),
    #[error("database error: {0}")]
    Db(String),
}

impl From<crate::db::DbError> for ScoringError {
    fn from(e: crate::db::DbError) -> Self {
        match e {
            crate::db::DbError::Query(q) => ScoringError::Query(q),
            crate::db::DbError::Pool(p) => ScoringError::Pool(p),
            other => ScoringError::Db(other.to_string()),
        }
    }
}
