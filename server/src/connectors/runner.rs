//! One run of a connector instance: claim, plugin on a blocking thread with a timeout, batches
//! written by [`super::ingest`], bookkeeping on the run row, freshness, rescoring.
//!
//! Liveness: the run holds a PostgreSQL advisory lock (keyed by run id) on its own connection for
//! as long as it writes. If the process dies, PostgreSQL drops the connection and the lock, and
//! [`super::scheduler::recover_stale_runs`] marks the run failed so the instance runs again from
//! its last committed cursor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use diesel::sql_types::{Array, BigInt, Text, Timestamptz};
use diesel::{ExpressionMethods, OptionalExtension, QueryDsl, SelectableHelper};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tokio_util::sync::CancellationToken;

use super::ingest::{sink_pair, with_reference, BatchWriter, WriteTotals};
use super::instances::{self, ConnectorInstance, RejectionRow};
use super::progress::{self, Progress};
use super::schedule::{retry_delay, Schedule};
use super::RuntimeError;
use crate::app::AppState;
use crate::db::schema::connectors;
use crate::db::DbPool;
use crate::plugins::{run_sync_with_timeout, CancelToken, PluginError, PluginRegistry};

/// First key of the advisory locks that mark a run as alive (second key: the run id).
pub const RUN_LOCK_CLASS: i32 = 73_685_003;

/// Why a run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunTrigger {
    /// The scheduler found it due.
    Schedule,
    /// `syncConnector` over GraphQL.
    Manual,
    /// `healthd sync NAME`.
    Cli,
}

impl RunTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            RunTrigger::Schedule => "schedule",
            RunTrigger::Manual => "manual",
            RunTrigger::Cli => "cli",
        }
    }
}

/// Tuning of runs; the defaults suit production.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// After the timeout, how long a connector gets to notice it was cancelled before its thread
    /// is abandoned.
    pub grace: Duration,
    /// How often a running run's heartbeat is refreshed even when no batch arrives.
    pub heartbeat_every: Duration,
    /// Batches that may wait while one is written (parsing overlaps writing).
    pub queue_depth: usize,
    /// Rescore the accounts a run wrote data for.
    pub rescore: bool,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        RunnerOptions {
            grace: Duration::from_secs(5),
            heartbeat_every: Duration::from_secs(5),
            queue_depth: 2,
            rescore: true,
        }
    }
}

/// Everything runs need: the database, the plugins, the shutdown signal.
#[derive(Clone)]
pub struct ConnectorRuntime {
    pub pool: DbPool,
    /// Each run writes on its own connection (it carries the run's liveness lock).
    pub database_url: Arc<str>,
    pub registry: Arc<PluginRegistry>,
    /// Cancelled at shutdown: running connectors are told to stop.
    pub shutdown: CancellationToken,
    pub options: RunnerOptions,
}

/// The outcome of a run, as `healthd sync` prints it.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_id: i64,
    pub connector: String,
    pub succeeded: bool,
    pub records_ingested: u64,
    pub records_rejected: u64,
    /// The first few rejections (file, line, reason).
    pub first_rejections: Vec<RejectionRow>,
    pub error: Option<String>,
    pub duration: Duration,
    /// Accounts the run wrote data for.
    pub accounts_touched: usize,
    /// Runs of dead processes recovered before this run started (one line each).
    pub recovered: Vec<String>,
}

impl RunSummary {
    /// Records per second.
    pub fn rate(&self) -> f64 {
        progress::rate(self.records_ingested, self.duration)
    }

    /// A few lines for a terminal.
    pub fn render(&self) -> String {
        let mut out: String = self.recovered.iter().map(|r| format!("{r}\n")).collect();
        out += &format!(
            "sync `{}` (run {}) {} in {:.1} s: {} records ingested ({}/s), {} rejected",
            self.connector,
            self.run_id,
            if self.succeeded {
                "succeeded"
            } else {
                "FAILED"
            },
            self.duration.as_secs_f64(),
            progress::group(self.records_ingested),
            progress::group(self.rate() as u64),
            progress::group(self.records_rejected),
        );
        for r in &self.first_rejections {
            let place = match (&r.file, r.line) {
                (Some(f), Some(l)) => format!("{f}:{l}"),
                (Some(f), None) => f.clone(),
                (None, Some(l)) => format!("line {l}"),
                (None, None) => "-".into(),
            };
            out.push_str(&format!("\n  rejected {place}: {}", r.reason));
        }
        if self.records_rejected > self.first_rejections.len() as u64 {
            out.push_str(&format!(
                "\n  ... and {} more (see connectorRuns)",
                self.records_rejected - self.first_rejections.len() as u64
            ));
        }
        if let Some(e) = &self.error {
            out.push_str(&format!("\n  error: {e}"));
        }
        out
    }
}

fn is_unique_violation(e: &diesel::result::Error) -> bool {
    matches!(
        e,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}

/// Inserts the running run row; `None` when the instance already has a running run.
pub(crate) async fn insert_run(
    conn: &mut AsyncPgConnection,
    connector_id: i64,
    trigger: RunTrigger,
) -> Result<Option<i64>, diesel::result::Error> {
    #[derive(diesel::QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let row: Result<Id, _> = diesel::sql_query(
        "INSERT INTO connector_runs (connector_id, status, trigger) VALUES ($1, 'running', $2) \
         ON CONFLICT (connector_id) WHERE status = 'running' DO NOTHING RETURNING id",
    )
    .bind::<BigInt, _>(connector_id)
    .bind::<Text, _>(trigger.as_str())
    .get_result(conn)
    .await;
    match row {
        Ok(r) => Ok(Some(r.id)),
        Err(diesel::result::Error::NotFound) => Ok(None),
        Err(e) if is_unique_violation(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

impl ConnectorRuntime {
    pub fn new(pool: DbPool, database_url: &str, registry: Arc<PluginRegistry>) -> Self {
        ConnectorRuntime {
            pool,
            database_url: Arc::from(database_url),
            registry,
            shutdown: CancellationToken::new(),
            options: RunnerOptions::default(),
        }
    }

    /// The runtime of a server process (shares its pool, plugins and shutdown signal).
    pub fn from_state(state: &AppState) -> Self {
        ConnectorRuntime {
            pool: state.pool.clone(),
            database_url: Arc::clone(&state.database_url),
            registry: Arc::clone(&state.plugins),
            shutdown: state.shutdown.clone(),
            options: RunnerOptions::default(),
        }
    }

    /// Starts a run of `name` now, unless one is running. Returns the instance and the run id.
    /// Runs whose process died are recovered first (as the scheduler does), so a crashed run
    /// never blocks its instance.
    pub async fn start_run(
        &self,
        name: &str,
        trigger: RunTrigger,
    ) -> Result<(ConnectorInstance, i64), RuntimeError> {
        self.start_run_recovering(name, trigger)
            .await
            .map(|(i, id, _)| (i, id))
    }

    /// [`Self::start_run`], also returning what it recovered (one line per dead run).
    pub async fn start_run_recovering(
        &self,
        name: &str,
        trigger: RunTrigger,
    ) -> Result<(ConnectorInstance, i64, Vec<String>), RuntimeError> {
        let recovered = super::scheduler::recover_stale_runs_described(
            &self.pool,
            &super::scheduler::SchedulerOptions::default(),
        )
        .await?;
        match self.insert_run_for(name, trigger).await {
            Ok((i, id)) => Ok((i, id, recovered)),
            Err(RuntimeError::AlreadyRunning(_)) => Err(running_detail(&self.pool, name).await),
            Err(e) => Err(e),
        }
    }

    async fn insert_run_for(
        &self,
        name: &str,
        trigger: RunTrigger,
    ) -> Result<(ConnectorInstance, i64), RuntimeError> {
        let mut pooled = self.pool.get().await?;
        let conn: &mut AsyncPgConnection = &mut pooled;
        let name = name.to_string();
        conn.transaction::<_, RuntimeError, _>(async |conn| {
            // The row lock keeps a concurrent scheduler claim out while the run row is added.
            let instance: ConnectorInstance = connectors::table
                .filter(connectors::name.eq(&name))
                .select(ConnectorInstance::as_select())
                .for_update()
                .first(conn)
                .await
                .optional()?
                .ok_or_else(|| RuntimeError::NotFound(name.clone()))?;
            match insert_run(conn, instance.id, trigger).await? {
                Some(run_id) => Ok((instance, run_id)),
                None => Err(RuntimeError::AlreadyRunning(name.clone())),
            }
        })
        .await
    }

    /// Runs `name` now and waits for the end of the run.
    pub async fn sync_now(
        &self,
        name: &str,
        trigger: RunTrigger,
        progress: Progress,
    ) -> Result<RunSummary, RuntimeError> {
        let (instance, run_id, recovered) = self.start_run_recovering(name, trigger).await?;
        let mut summary = self.execute_run(instance, run_id, progress).await;
        summary.recovered = recovered;
        Ok(summary)
    }

    /// Executes a run whose row exists (status running) and records its outcome. Never fails:
    /// every problem ends up as the run's error.
    pub async fn execute_run(
        &self,
        instance: ConnectorInstance,
        run_id: i64,
        progress: Progress,
    ) -> RunSummary {
        let started = Instant::now();
        tracing::info!(connector = %instance.name, run_id, "connector run started");
        let result = self
            .execute_inner(&instance, run_id, &progress, started)
            .await;
        progress.finish();
        let (totals, error) = match result {
            Ok(t) => (t, None),
            Err((t, e)) => (t, Some(e)),
        };
        let kinds: Vec<String> = totals
            .kinds
            .iter()
            .map(|k| k.as_str().to_string())
            .collect();
        let manifest_kinds: Vec<String> = self
            .registry
            .get(&instance.plugin)
            .map(|p| {
                p.manifest()
                    .record_kinds
                    .iter()
                    .map(|k| k.as_str().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let interrupted = error.is_some() && self.shutdown.is_cancelled();
        if let Err(e) = finish_run(
            &self.pool,
            &instance,
            run_id,
            error.as_deref(),
            interrupted,
            &kinds,
            &manifest_kinds,
        )
        .await
        {
            tracing::error!(connector = %instance.name, run_id, "recording the end of the run failed: {e}");
        }
        let accounts: Vec<i64> = totals.accounts.iter().copied().collect();
        if self.options.rescore && !accounts.is_empty() {
            self.rescore(&instance.name, accounts).await;
        }
        let (records_ingested, records_rejected) =
            match instances::run_by_id(&self.pool, run_id).await {
                Ok(Some(r)) => (r.records_ingested as u64, r.records_rejected as u64),
                _ => (totals.records, totals.rejections),
            };
        let first_rejections = if records_rejected > 0 {
            instances::rejections(&self.pool, run_id, 5)
                .await
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let summary = RunSummary {
            run_id,
            connector: instance.name.clone(),
            succeeded: error.is_none(),
            records_ingested,
            records_rejected,
            first_rejections,
            error,
            duration: started.elapsed(),
            accounts_touched: totals.accounts.len(),
            recovered: Vec::new(),
        };
        let status = if summary.succeeded {
            "succeeded"
        } else {
            "failed"
        };
        let connector = summary.connector.clone();
        metrics::counter!("healthd_connector_runs_total", "connector" => connector.clone(), "status" => status)
            .increment(1);
        metrics::counter!("healthd_connector_records_ingested_total", "connector" => connector.clone())
            .increment(summary.records_ingested);
        metrics::counter!("healthd_connector_records_rejected_total", "connector" => connector.clone())
            .increment(summary.records_rejected);
        metrics::histogram!("healthd_connector_run_seconds", "connector" => connector)
            .record(summary.duration.as_secs_f64());
        match &summary.error {
            None => tracing::info!(
                connector = %summary.connector,
                run_id,
                records = summary.records_ingested,
                rejected = summary.records_rejected,
                secs = summary.duration.as_secs_f64(),
                "connector run succeeded"
            ),
            Some(e) => tracing::warn!(
                connector = %summary.connector,
                run_id,
                records = summary.records_ingested,
                "connector run failed: {e}"
            ),
        }
        summary
    }

    async fn rescore(&self, connector: &str, accounts: Vec<i64>) {
        tracing::debug!(
            connector,
            accounts = accounts.len(),
            "rescoring accounts after sync"
        );
        rescore_accounts(&self.pool, accounts).await;
    }

    async fn execute_inner(
        &self,
        instance: &ConnectorInstance,
        run_id: i64,
        progress: &Progress,
        started: Instant,
    ) -> Result<WriteTotals, (WriteTotals, String)> {
        let empty = WriteTotals::default;
        let Some(plugin) = self.registry.get(&instance.plugin) else {
            let installed: Vec<String> = self.registry.list().into_iter().map(|p| p.name).collect();
            return Err((
                empty(),
                format!(
                    "plugin `{}` is not installed (installed: {})",
                    instance.plugin,
                    if installed.is_empty() {
                        "none".to_string()
                    } else {
                        installed.join(", ")
                    }
                ),
            ));
        };
        let mut conn = AsyncPgConnection::establish(&self.database_url)
            .await
            .map_err(|e| {
                let m = with_reference(
                    "cannot connect to the database",
                    "a connector run cannot connect to the database",
                    &e,
                );
                (empty(), m)
            })?;
        diesel::sql_query("SELECT pg_advisory_lock($1, ($2 % 2147483647)::int)")
            .bind::<diesel::sql_types::Integer, _>(RUN_LOCK_CLASS)
            .bind::<BigInt, _>(run_id)
            .execute(&mut conn)
            .await
            .map_err(|e| {
                let m = with_reference(
                    "cannot lock the run",
                    "a connector run cannot take its liveness lock",
                    &e,
                );
                (empty(), m)
            })?;

        let done = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.pool.clone(),
            run_id,
            self.options.heartbeat_every,
            done.clone(),
        ));
        let cancel = CancelToken::new();
        let on_shutdown = {
            let cancel = cancel.clone();
            let shutdown = self.shutdown.clone();
            let done = done.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => cancel.cancel(),
                    _ = done.cancelled() => {}
                }
            })
        };

        let (sink, sink_writer) = sink_pair(self.options.queue_depth);
        let mut writer = BatchWriter::new(&instance.name, instance.id, run_id);
        let stop_writer = CancellationToken::new();
        let timeout = Duration::from_secs(instance.timeout_secs.max(1) as u64);
        let plugin_run = {
            let stop_writer = stop_writer.clone();
            let fut = run_sync_with_timeout(
                plugin,
                instance.settings.clone(),
                instance.cursor.clone(),
                sink,
                cancel.clone(),
                timeout,
                self.options.grace,
            );
            async move {
                let r = fut.await;
                // An abandoned connector thread keeps the sink alive: stop the writer explicitly.
                if matches!(r, Err(PluginError::TimedOut { .. })) {
                    stop_writer.cancel();
                }
                r
            }
        };
        let write_run = sink_writer.run(&mut conn, &mut writer, stop_writer.clone(), |t| {
            progress.update(t, started.elapsed())
        });
        let (written, ran) = tokio::join!(write_run, plugin_run);
        done.cancel();
        let _ = heartbeat.await;
        let _ = on_shutdown.await;
        // Dropping the connection releases the liveness lock.
        drop(conn);
        let totals = writer.totals.clone();

        let elapsed = started.elapsed();
        let error = match (written, ran) {
            (Err(w), _) => Some(w.to_string()),
            (Ok(()), Ok(_)) => None,
            (Ok(()), Err(e)) => Some(match e {
                PluginError::TimedOut { .. } => format!(
                    "timed out after {} s (the connector did not stop when asked; its thread was abandoned)",
                    instance.timeout_secs
                ),
                PluginError::Cancelled { .. } if self.shutdown.is_cancelled() => {
                    "cancelled: healthd is shutting down".to_string()
                }
                PluginError::Cancelled { .. } => {
                    format!("timed out after {} s", instance.timeout_secs)
                }
                _ if elapsed >= timeout && !self.shutdown.is_cancelled() => {
                    format!("timed out after {} s: {e}", instance.timeout_secs)
                }
                other => other.to_string(),
            }),
        };
        match error {
            None => Ok(totals),
            Some(e) => Err((totals, e)),
        }
    }
}

/// The "already running" error for `name`, with what is known of its running run.
async fn running_detail(pool: &DbPool, name: &str) -> RuntimeError {
    #[derive(diesel::QueryableByName)]
    struct Running {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = diesel::sql_types::Double)]
        age: f64,
    }
    let plain = || RuntimeError::AlreadyRunning(name.to_string());
    let Ok(mut conn) = pool.get().await else {
        return plain();
    };
    let running: Option<Running> = diesel::sql_query(
        "SELECT r.id, extract(epoch FROM now() - r.heartbeat_at)::float8 AS age \
         FROM connector_runs r JOIN connectors c ON c.id = r.connector_id \
         WHERE c.name = $1 AND r.status = 'running'",
    )
    .bind::<Text, _>(name)
    .get_result(&mut conn)
    .await
    .optional()
    .ok()
    .flatten();
    match running {
        Some(r) => RuntimeError::StillRunning {
            name: name.to_string(),
            run_id: r.id,
            heartbeat_secs: r.age.max(0.0) as u64,
            recover_after_secs: super::scheduler::SchedulerOptions::default()
                .lock_check_after
                .as_secs(),
        },
        None => plain(),
    }
}

/// Recomputes the scores of accounts whose data changed (after a run, or a remap). Failures are
/// logged: the daily rescore catches up.
pub async fn rescore_accounts(pool: &DbPool, accounts: Vec<i64>) {
    if accounts.is_empty() {
        return;
    }
    let n = accounts.len();
    match crate::scoring::rescore(pool, crate::scoring::RescoreScope::Accounts(accounts)).await {
        Ok(s) => tracing::debug!(
            accounts = n,
            scored = s.accounts_scored,
            changed = s.changed_account_ids.len(),
            "rescored accounts after ingest"
        ),
        Err(e) => tracing::warn!(accounts = n, "rescoring after ingest failed: {e}"),
    }
}

async fn heartbeat_loop(pool: DbPool, run_id: i64, every: Duration, done: CancellationToken) {
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Ok(mut conn) = pool.get().await else {
            continue;
        };
        let _ = diesel::sql_query(
            "UPDATE connector_runs SET heartbeat_at = now() WHERE id = $1 AND status = 'running'",
        )
        .bind::<BigInt, _>(run_id)
        .execute(&mut conn)
        .await;
    }
}

/// Records the end of a run: status, error, kinds; on success resets the failure count and
/// refreshes `source_freshness` for the plugin's record kinds; on failure schedules a retry
/// with backoff (never later than the next regular run). One transaction.
async fn finish_run(
    pool: &DbPool,
    instance: &ConnectorInstance,
    run_id: i64,
    error: Option<&str>,
    interrupted: bool,
    kinds: &[String],
    manifest_kinds: &[String],
) -> Result<(), RuntimeError> {
    let mut pooled = pool.get().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    let now = Utc::now();
    let schedule = Schedule::parse(&instance.schedule).ok();
    let retry_at = {
        let interval = schedule
            .as_ref()
            .map(|s| s.nominal_interval(now))
            .unwrap_or_else(|| chrono::Duration::days(1));
        now + retry_delay(instance.failures + 1, interval)
    };
    let next_regular = schedule
        .map(|s| s.next_after(now))
        .unwrap_or_else(|| now + chrono::Duration::days(1));
    conn.transaction::<_, RuntimeError, _>(async |conn| {
        let status = if error.is_some() { "failed" } else { "succeeded" };
        let n = diesel::sql_query(
            "UPDATE connector_runs SET status = $2, finished_at = now(), heartbeat_at = now(), \
             error = $3, record_kinds = $4 WHERE id = $1 AND status = 'running'",
        )
        .bind::<BigInt, _>(run_id)
        .bind::<Text, _>(status)
        .bind::<diesel::sql_types::Nullable<Text>, _>(error)
        .bind::<Array<Text>, _>(kinds)
        .execute(conn)
        .await?;
        if n == 0 {
            // Someone else (stale-run recovery) already closed it and scheduled the retry.
            return Ok(());
        }
        match error {
            None => {
                // A run outside the schedule (manual, CLI) that covered an overdue slot counts
                // as that slot's run.
                diesel::sql_query(
                    "UPDATE connectors SET failures = 0, last_success_at = now(), next_run_at = CASE \
                       WHEN next_run_at IS NULL OR next_run_at <= now() THEN $2 ELSE next_run_at END \
                     WHERE id = $1",
                )
                .bind::<BigInt, _>(instance.id)
                .bind::<Timestamptz, _>(next_regular)
                .execute(conn)
                .await?;
                diesel::sql_query(
                    "INSERT INTO source_freshness (connector_id, kind, last_success_at) \
                     SELECT $1, k, now() FROM unnest($2::text[]) AS k \
                     ON CONFLICT (connector_id, kind) DO UPDATE SET last_success_at = EXCLUDED.last_success_at",
                )
                .bind::<BigInt, _>(instance.id)
                .bind::<Array<Text>, _>(manifest_kinds)
                .execute(conn)
                .await?;
            }
            // Stopped by shutdown: not the connector's fault; due again at the next start.
            Some(_) if interrupted => {
                diesel::sql_query("UPDATE connectors SET next_run_at = now() WHERE id = $1")
                    .bind::<BigInt, _>(instance.id)
                    .execute(conn)
                    .await?;
            }
            Some(_) => {
                diesel::sql_query(
                    "UPDATE connectors SET failures = failures + 1, \
                     next_run_at = LEAST(next_run_at, $2) WHERE id = $1",
                )
                .bind::<BigInt, _>(instance.id)
                .bind::<Timestamptz, _>(retry_at)
                .execute(conn)
                .await?;
            }
        }
        Ok(())
    })
    .await
}

/// `healthd sync NAME`: applies the config file's `[[connector]]` entries, then runs the instance
/// once in this process. With `progress`, live progress goes to stderr (a bar on a terminal,
/// a line every 5 s otherwise). Returns the run's summary (print it with
/// [`RunSummary::render`]), also when the run failed; errors are for runs that could not start
/// (unknown instance, already running, database down).
pub async fn sync_from_cli(
    state: &AppState,
    name: &str,
    progress: bool,
) -> anyhow::Result<RunSummary> {
    instances::sync_config(&state.pool, Some(&state.plugins), &state.config.connectors).await?;
    let runtime = ConnectorRuntime::from_state(state);
    let reporter = if progress {
        Progress::for_terminal(name)
    } else {
        Progress::Silent
    };
    Ok(runtime.sync_now(name, RunTrigger::Cli, reporter).await?)
}
