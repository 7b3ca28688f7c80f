//! The daily full rescore. Recency signals change as days pass even when no data arrives, so every
//! account is rescored at least once a day. Any number of processes may run this loop: a run is
//! claimed by moving `scoring_state.last_full_started_at` forward in one conditional `UPDATE`, so
//! exactly one process does each day's run.

use chrono::{DateTime, Duration, Utc};
use diesel::sql_types::{Double, Timestamptz};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use serde::Deserialize;

use super::run::{rescore_at, RescoreScope, RescoreSummary};
use super::ScoringError;
use crate::app::AppState;
use crate::db::DbPool;

/// `[scoring]` settings in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DailySettings {
    /// Hours between full rescores (default 24).
    pub full_rescore_hours: f64,
    /// How often each process checks whether a full rescore is due, in minutes (default 60).
    pub check_interval_minutes: f64,
    /// A claimed run that has not finished after this many hours is presumed dead (default 2).
    pub stuck_after_hours: f64,
}

impl Default for DailySettings {
    fn default() -> Self {
        DailySettings {
            full_rescore_hours: 24.0,
            check_interval_minutes: 60.0,
            stuck_after_hours: 2.0,
        }
    }
}

impl DailySettings {
    /// Reads the `[scoring]` table; unknown keys are ignored (other scoring settings may live there).
    pub fn from_config(value: &serde_json::Value) -> DailySettings {
        if value.is_null() {
            return DailySettings::default();
        }
        serde_json::from_value(value.clone()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "invalid [scoring] settings; using defaults");
            DailySettings::default()
        })
    }
}

/// Runs forever (until shutdown): checks on start and then every `check_interval_minutes` whether
/// the last full rescore is older than `full_rescore_hours`, and if this process wins the claim,
/// rescores every account. For `jobs.rs`.
pub async fn run_daily(state: AppState) {
    let settings = DailySettings::from_config(&state.config.scoring);
    let check =
        std::time::Duration::from_secs_f64((settings.check_interval_minutes * 60.0).max(5.0));
    loop {
        match run_if_due(&state.pool, Utc::now(), &settings).await {
            Ok(Some(s)) => tracing::info!(
                scored = s.accounts_scored,
                changed = s.changed_account_ids.len(),
                "daily rescore done"
            ),
            Ok(None) => tracing::debug!("daily rescore not due"),
            Err(e) => {
                tracing::warn!(error = %e, "daily rescore failed; will retry at the next check")
            }
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = tokio::time::sleep(check) => {}
        }
    }
}

/// Claims and runs a full rescore as of `now` when one is due. `Ok(None)`: not due, or another
/// process has it.
pub async fn run_if_due(
    pool: &DbPool,
    now: DateTime<Utc>,
    settings: &DailySettings,
) -> Result<Option<RescoreSummary>, ScoringError> {
    if !claim(pool, now, settings).await? {
        return Ok(None);
    }
    match rescore_at(pool, RescoreScope::All, now).await {
        Ok(s) => {
            // Alerts follow the daily scores at once (the periodic evaluation would catch up later).
            if let Err(e) = crate::alerts::evaluate(pool, &crate::alerts::AlertScope::All).await {
                tracing::warn!(error = %e, "alert evaluation after the daily rescore failed");
            }
            Ok(Some(s))
        }
        Err(e) => {
            // Release the claim so the next check (here or elsewhere) retries.
            if let Ok(mut conn) = pool.get().await {
                let _ = diesel::sql_query(
                    "UPDATE scoring_state SET last_full_started_at = NULL WHERE id = 1 AND last_full_started_at = $1",
                )
                .bind::<Timestamptz, _>(now)
                .execute(&mut conn)
                .await;
            }
            Err(e)
        }
    }
}

async fn claim(pool: &DbPool, now: DateTime<Utc>, s: &DailySettings) -> Result<bool, ScoringError> {
    #[derive(QueryableByName)]
    struct Claimed {
        #[diesel(sql_type = Double)]
        _one: f64,
    }
    let mut conn = pool.get().await?;
    let every = now - Duration::milliseconds((s.full_rescore_hours * 3_600_000.0) as i64);
    let stuck = now - Duration::milliseconds((s.stuck_after_hours * 3_600_000.0) as i64);
    // Due when the last finished run is older than the period, and no run is in flight (a claim
    // newer than the last finish and younger than `stuck_after_hours`).
    let rows: Vec<Claimed> = diesel::sql_query(
        "UPDATE scoring_state SET last_full_started_at = $1
         WHERE id = 1
           AND (last_full_finished_at IS NULL OR last_full_finished_at <= $2)
           AND (last_full_started_at IS NULL OR last_full_started_at <= $2
                OR (last_full_started_at <= $3 AND (last_full_finished_at IS NULL OR last_full_finished_at < last_full_started_at)))
         RETURNING 1::float8 AS _one",
    )
    .bind::<Timestamptz, _>(now)
    .bind::<Timestamptz, _>(every)
    .bind::<Timestamptz, _>(stuck)
    .load(&mut conn)
    .await?;
    Ok(!rows.is_empty())
}
