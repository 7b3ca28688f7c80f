//! Alerts: rules with configurable defaults, set-based evaluation after scoring (and periodically for
//! time-based rules), and the task workflow editors drive (acknowledge, resolve, snooze, assign,
//! feedback).
//!
//! Raising is idempotent: at most one unresolved alert per account and rule (a partial unique
//! index), a cool-down after a resolution, and hysteresis on auto-resolution (a condition must be
//! clear by a margin), so a score hovering at a threshold does not flap. New alert rows publish
//! themselves: a trigger enqueues webhook deliveries and notifies the fan-out in the same
//! transaction.

pub mod evaluate;
pub mod rules;
pub mod store;

pub use evaluate::{
    evaluate, evaluate_with, run_periodic_evaluation, AlertScope, EvaluationSummary,
};
pub use rules::{AlertRuleSettings, RuleSet, RULES};
pub use store::{AlertFilterSpec, AlertRow, AlertStatus};

use crate::db::DbError;

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("alert {0} does not exist")]
    NotFound(i64),
    #[error("alert {id} is {from}; it cannot be {action}")]
    InvalidTransition {
        id: i64,
        from: String,
        action: &'static str,
    },
    #[error("unknown alert rule `{0}`; known rules: score_drop, tier_worsened, no_login, invoice_past_due, urgent_ticket_open, renewal_at_risk")]
    UnknownRule(String),
    #[error("{0}")]
    InvalidInput(String),
}

impl From<diesel::result::Error> for AlertError {
    fn from(e: diesel::result::Error) -> Self {
        AlertError::Db(DbError::Query(e))
    }
}

impl AlertError {
    /// True when the caller, not the server, is at fault (the message is safe to show).
    pub fn is_client_error(&self) -> bool {
        !matches!(self, AlertError::Db(_))
    }
}
