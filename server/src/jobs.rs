//! Background jobs each healthd process runs (when `background_jobs` is on). They coordinate through
//! PostgreSQL (SKIP LOCKED claims, advisory locks, LISTEN/NOTIFY), so any number of processes can
//! share one database and each scheduled piece of work still happens once.

use std::time::Duration;

use crate::app::AppState;

/// Starts the event fan-out (always: subscriptions need it) and, unless disabled, the connector
/// scheduler, the daily rescore, time-based alert evaluation and webhook delivery.
pub fn spawn_all(state: &AppState) {
    // Subscriptions on this process are served from its fan-out hub.
    let _hub = crate::feed::spawn_fanout(state);
    if !state.config.background_jobs {
        tracing::info!("background jobs disabled in this process (background_jobs = false)");
        return;
    }
    state
        .tasks
        .spawn(crate::connectors::run_connector_jobs(state.clone()));
    state
        .tasks
        .spawn(crate::scoring::daily::run_daily(state.clone()));
    state
        .tasks
        .spawn(crate::alerts::evaluate::run_periodic_evaluation(
            state.clone(),
        ));
    state
        .tasks
        .spawn(crate::webhooks::worker::run_delivery_worker(state.clone()));
}

/// Waits for background jobs to finish their current step after shutdown began (at most 30 s:
/// a connector run that ignores cancellation is abandoned, and its run is recovered later).
pub async fn wait_all(state: &AppState) {
    state.shutdown.cancel();
    state.tasks.close();
    if tokio::time::timeout(Duration::from_secs(30), state.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("background jobs still busy 30 s after shutdown; exiting anyway");
    }
}
