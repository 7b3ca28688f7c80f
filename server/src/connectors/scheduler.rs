//! The scheduler: every healthd process with background jobs runs one; they coordinate through
//! PostgreSQL so each due run happens exactly once.
//!
//! A claim is one transaction: lock due instances with `FOR UPDATE SKIP LOCKED` (a row another
//! process is claiming is skipped, never waited for), insert the run row (the partial unique
//! index `connector_runs_one_running_idx` refuses a second running run of an instance), and move
//! `next_run_at` to the next slot. Failed runs are retried with backoff (see
//! [`super::schedule::retry_delay`]). Runs whose process died are found by their liveness lock
//! and marked failed, and their instance becomes due again at once.

use std::time::Duration;

use chrono::Utc;
use diesel::sql_types::{BigInt, Integer, Text, Timestamptz};
use diesel::{ExpressionMethods, QueryDsl, SelectableHelper};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tokio::task::JoinSet;

use super::instances::ConnectorInstance;
use super::progress::Progress;
use super::runner::{insert_run, ConnectorRuntime, RunTrigger, RUN_LOCK_CLASS};
use super::schedule::Schedule;
use super::RuntimeError;
use crate::db::schema::{connector_runs, connectors};
use crate::db::DbPool;

/// Scheduler tuning.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// How often due instances are looked for.
    pub poll_every: Duration,
    /// Runs this process executes at once.
    pub max_concurrent: usize,
    /// A running run whose heartbeat is older than this is considered dead even if its lock
    /// is held (a wedged process).
    pub stale_after: Duration,
    /// A run whose heartbeat is at least this old is checked for its liveness lock.
    pub lock_check_after: Duration,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            poll_every: Duration::from_secs(5),
            max_concurrent: 4,
            stale_after: Duration::from_secs(300),
            lock_check_after: Duration::from_secs(15),
        }
    }
}

/// Claims up to `limit` due instances for this process; returns them with their new run ids.
pub async fn claim_due(
    pool: &DbPool,
    limit: usize,
) -> Result<Vec<(ConnectorInstance, i64)>, RuntimeError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut pooled = pool.get().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    conn.transaction::<_, RuntimeError, _>(async |conn| {
        let now = Utc::now();
        let running = connector_runs::table
            .filter(connector_runs::connector_id.eq(connectors::id))
            .filter(connector_runs::status.eq("running"));
        let due: Vec<ConnectorInstance> = connectors::table
            .filter(connectors::enabled.eq(true))
            .filter(connectors::next_run_at.le(now))
            .filter(diesel::dsl::not(diesel::dsl::exists(running)))
            .order(connectors::next_run_at.asc())
            .limit(limit as i64)
            .select(ConnectorInstance::as_select())
            .for_update()
            .skip_locked()
            .load(conn)
            .await?;
        let mut claimed = Vec::with_capacity(due.len());
        for instance in due {
            let next = match Schedule::parse(&instance.schedule) {
                Ok(s) => s.next_after(now),
                Err(e) => {
                    tracing::warn!(connector = %instance.name, "{e}; retrying in a day");
                    now + chrono::Duration::days(1)
                }
            };
            diesel::update(connectors::table.filter(connectors::id.eq(instance.id)))
                .set(connectors::next_run_at.eq(Some(next)))
                .execute(conn)
                .await?;
            if let Some(run_id) = insert_run(conn, instance.id, RunTrigger::Schedule).await? {
                claimed.push((instance, run_id));
            }
        }
        Ok(claimed)
    })
    .await
}

/// Marks runs whose process died as failed (their liveness lock is free, or their heartbeat is
/// older than `stale_after`) and makes their instances due now. Returns the run ids.
pub async fn recover_stale_runs(
    pool: &DbPool,
    options: &SchedulerOptions,
) -> Result<Vec<i64>, RuntimeError> {
    #[derive(diesel::QueryableByName)]
    struct Candidate {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = Timestamptz)]
        heartbeat_at: chrono::DateTime<Utc>,
    }
    #[derive(diesel::QueryableByName)]
    struct Locked {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        locked: bool,
    }
    let mut conn = pool.get().await?;
    let candidates: Vec<Candidate> = diesel::sql_query(
        "SELECT id, heartbeat_at FROM connector_runs WHERE status = 'running' \
         AND heartbeat_at < now() - make_interval(secs => $1)",
    )
    .bind::<diesel::sql_types::Double, _>(options.lock_check_after.as_secs_f64())
    .load(&mut conn)
    .await?;
    let mut recovered = Vec::new();
    for c in candidates {
        let age = (Utc::now() - c.heartbeat_at).to_std().unwrap_or_default();
        let dead = if age >= options.stale_after {
            true
        } else {
            // Taking the lock proves its holder (the process running the run) is gone.
            let l: Locked = diesel::sql_query(
                "SELECT pg_try_advisory_lock($1, ($2 % 2147483647)::int) AS locked",
            )
            .bind::<Integer, _>(RUN_LOCK_CLASS)
            .bind::<BigInt, _>(c.id)
            .get_result(&mut conn)
            .await?;
            if l.locked {
                diesel::sql_query("SELECT pg_advisory_unlock($1, ($2 % 2147483647)::int)")
                    .bind::<Integer, _>(RUN_LOCK_CLASS)
                    .bind::<BigInt, _>(c.id)
                    .execute(&mut conn)
                    .await?;
            }
            l.locked
        };
        if !dead {
            continue;
        }
        let n = diesel::sql_query(
            "WITH r AS (UPDATE connector_runs SET status = 'failed', finished_at = now(), \
               error = $2 WHERE id = $1 AND status = 'running' RETURNING connector_id) \
             UPDATE connectors c SET failures = failures + 1, next_run_at = now() FROM r \
             WHERE c.id = r.connector_id",
        )
        .bind::<BigInt, _>(c.id)
        .bind::<Text, _>(format!(
            "the process running this sync stopped (last heartbeat {}); the next run resumes from the last saved batch",
            c.heartbeat_at.format("%Y-%m-%d %H:%M:%S UTC")
        ))
        .execute(&mut conn)
        .await?;
        if n > 0 {
            tracing::warn!(
                run_id = c.id,
                "connector run abandoned by a stopped process marked failed"
            );
            recovered.push(c.id);
        }
    }
    Ok(recovered)
}

/// [`recover_stale_runs`], describing each recovered run in one line for a terminal.
pub async fn recover_stale_runs_described(
    pool: &DbPool,
    options: &SchedulerOptions,
) -> Result<Vec<String>, RuntimeError> {
    #[derive(diesel::QueryableByName)]
    struct Recovered {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = Text)]
        name: String,
        #[diesel(sql_type = Timestamptz)]
        heartbeat_at: chrono::DateTime<Utc>,
    }
    let ids = recover_stale_runs(pool, options).await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = pool.get().await?;
    let rows: Vec<Recovered> = diesel::sql_query(
        "SELECT r.id, c.name, r.heartbeat_at FROM connector_runs r \
         JOIN connectors c ON c.id = r.connector_id WHERE r.id = ANY($1) ORDER BY r.id",
    )
    .bind::<diesel::sql_types::Array<BigInt>, _>(&ids)
    .load(&mut conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            format!(
                "recovered run {} of `{}`: its process stopped (last heartbeat {}); marked failed, the next run resumes from its last saved batch",
                r.id,
                r.name,
                r.heartbeat_at.format("%Y-%m-%d %H:%M:%S UTC")
            )
        })
        .collect())
}

/// The scheduler loop of one process: recovers dead runs, claims due instances and executes
/// them (at most `max_concurrent` at once) until `runtime.shutdown` is cancelled; then waits for
/// the runs in progress, which are told to stop.
pub async fn run_scheduler(runtime: ConnectorRuntime, options: SchedulerOptions) {
    let mut running: JoinSet<()> = JoinSet::new();
    tracing::info!("connector scheduler started");
    loop {
        while running.try_join_next().is_some() {}
        if let Err(e) = recover_stale_runs(&runtime.pool, &options).await {
            tracing::warn!("checking for abandoned connector runs failed: {e}");
        }
        let room = options.max_concurrent.saturating_sub(running.len());
        match claim_due(&runtime.pool, room).await {
            Ok(claimed) => {
                for (instance, run_id) in claimed {
                    let rt = runtime.clone();
                    running.spawn(async move {
                        rt.execute_run(instance, run_id, Progress::Silent).await;
                    });
                }
            }
            Err(e) => tracing::warn!("claiming due connector runs failed: {e}"),
        }
        tokio::select! {
            _ = runtime.shutdown.cancelled() => break,
            _ = tokio::time::sleep(options.poll_every) => {}
            // A finished run frees a slot: look again at once.
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
    tracing::info!(runs = running.len(), "connector scheduler stopping");
    while running.join_next().await.is_some() {}
}

/// The connector background job of a server process: applies the config file's `[[connector]]`
/// entries, then runs the scheduler until `state.shutdown` is cancelled. Spawn it from the
/// background jobs: `tokio::spawn(crate::connectors::run_connector_jobs(state.clone()))`.
pub async fn run_connector_jobs(state: crate::app::AppState) {
    match super::instances::sync_config(&state.pool, Some(&state.plugins), &state.config.connectors)
        .await
    {
        Ok(report) => {
            if !report.created.is_empty() || !report.updated.is_empty() {
                tracing::info!(created = ?report.created, updated = ?report.updated, "connectors from the config file applied");
            }
        }
        Err(e) => tracing::error!("applying the config file's connectors failed: {e}"),
    }
    run_scheduler(
        ConnectorRuntime::from_state(&state),
        SchedulerOptions::default(),
    )
    .await;
}
