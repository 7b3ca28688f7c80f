//! Ingest benchmark: a drop of usage events ingested through the real `csv` plugin (parse, plugin
//! boundary, validation, identity mapping, `usage_events` insert with dedup and the `usage_daily`
//! rollup, cursor, run bookkeeping), compared with PostgreSQL `COPY` of the same rows into an
//! identical table (same primary key) that does none of that.
//!
//! It writes under the source name [`BENCH_SOURCE`] and account keys `bench-acct-*`, and removes
//! them (and its comparison table) at the end; still, run it against a scratch database.

use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use healthd_plugin_api::UsageEvent;
use serde_json::json;

use crate::connectors::instances::{self, NewConnector};
use crate::connectors::progress::{group, Progress};
use crate::connectors::{ConnectorRuntime, RunTrigger};
use crate::db::DbPool;
use crate::plugins::PluginRegistry;

/// Connector instance name (and `source`) the benchmark ingests under.
pub const BENCH_SOURCE: &str = "bench-ingest";
// 100 accounts x 8 users over 30 days: about 40 events per active user-day, as a product
// analytics export has; the daily rollup gets about one row per 10 events.
const ACCOUNTS: usize = 100;
const USERS_PER_ACCOUNT: usize = 8;
const DAYS: i64 = 30;
/// Records per batch (the csv plugin's `batch_size` setting).
const BATCH_SIZE: u64 = 50_000;
const EVENTS: [(&str, &str); 6] = [
    ("login", ""),
    ("page_view", ""),
    ("page_view", ""),
    ("page_view", ""),
    ("report_run", "reports"),
    ("export_csv", "exports"),
];

diesel::table! {
    bench_copy_usage_events (account_id, source, event_uid) {
        account_id -> Int8,
        source -> Text,
        event_uid -> Text,
        user_id -> Nullable<Text>,
        event -> Text,
        feature -> Nullable<Text>,
        occurred_at -> Timestamptz,
        count -> Int4,
    }
}

/// Measured figures.
#[derive(Debug, Clone)]
pub struct IngestBenchReport {
    pub rows: usize,
    /// Rows the plugin path saved (must equal `rows`).
    pub ingested: u64,
    pub plugin_time: Duration,
    pub copy_time: Duration,
    /// Rows written to `usage_daily` by the rollup.
    pub rollup_rows: i64,
}

impl IngestBenchReport {
    pub fn plugin_rate(&self) -> f64 {
        self.rows as f64 / self.plugin_time.as_secs_f64().max(1e-9)
    }
    pub fn copy_rate(&self) -> f64 {
        self.rows as f64 / self.copy_time.as_secs_f64().max(1e-9)
    }
    /// Plugin ingest rate as a fraction of the COPY rate (target: at least 0.8).
    pub fn ratio(&self) -> f64 {
        self.plugin_rate() / self.copy_rate().max(1e-9)
    }
}

impl fmt::Display for IngestBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "ingest benchmark: {} usage events",
            group(self.rows as u64)
        )?;
        writeln!(
            f,
            "  csv plugin -> usage_events + usage_daily: {:>7.2} s  {:>9} rows/s  ({} rollup rows)",
            self.plugin_time.as_secs_f64(),
            group(self.plugin_rate() as u64),
            group(self.rollup_rows as u64)
        )?;
        writeln!(
            f,
            "  COPY -> identical table (same PK):        {:>7.2} s  {:>9} rows/s",
            self.copy_time.as_secs_f64(),
            group(self.copy_rate() as u64)
        )?;
        write!(f, "  ratio: {:.2}x COPY (target >= 0.80x)", self.ratio())
    }
}

/// The deterministic rows of the drop (row `i` of `rows`): spread over accounts, users and
/// events, in time order as an analytics export is.
fn event(i: usize, rows: usize, start: DateTime<Utc>) -> UsageEvent {
    // A cheap deterministic scramble so consecutive rows hit different accounts and users.
    let h = (i as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(17);
    let account = (h % ACCOUNTS as u64) as usize;
    let user = ((h >> 12) % USERS_PER_ACCOUNT as u64) as usize;
    let (ev, feature) = EVENTS[((h >> 24) % EVENTS.len() as u64) as usize];
    let span_micros = DAYS * 86_400 * 1_000_000;
    let at = (i as i128 * span_micros as i128 / rows.max(1) as i128) as i64;
    UsageEvent {
        account_key: format!("bench-acct-{account:04}"),
        user_id: Some(format!("user-{account:04}-{user:02}@example.com")),
        event: ev.to_string(),
        feature: (!feature.is_empty()).then(|| feature.to_string()),
        occurred_at: start + chrono::Duration::microseconds(at),
        count: 1,
        event_id: None,
    }
}

/// Writes `usage_events-bench.csv` with `rows` events into `dir`.
pub fn write_drop(dir: &Path, rows: usize) -> std::io::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("usage_events-bench.csv");
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
    writeln!(out, "account_key,user_id,event,feature,occurred_at,count")?;
    let start = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap();
    for i in 0..rows {
        let e = event(i, rows, start);
        writeln!(
            out,
            "{},{},{},{},{},{}",
            e.account_key,
            e.user_id.as_deref().unwrap_or(""),
            e.event,
            e.feature.as_deref().unwrap_or(""),
            e.occurred_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            e.count
        )?;
    }
    out.flush()?;
    Ok(path)
}

async fn exec(conn: &mut AsyncPgConnection, sql: &str) -> anyhow::Result<()> {
    diesel::sql_query(sql).execute(conn).await?;
    Ok(())
}

/// Removes everything an earlier benchmark left.
async fn cleanup(pool: &DbPool) -> anyhow::Result<()> {
    let mut conn = pool.get().await?;
    exec(&mut conn, "DROP TABLE IF EXISTS bench_copy_usage_events").await?;
    exec(
        &mut conn,
        "DELETE FROM usage_daily WHERE account_id IN (SELECT id FROM accounts WHERE key LIKE 'bench-acct-%')",
    )
    .await?;
    exec(
        &mut conn,
        "DELETE FROM usage_events WHERE source = 'bench-ingest'",
    )
    .await?;
    exec(
        &mut conn,
        "DELETE FROM account_identities WHERE source = 'bench-ingest'",
    )
    .await?;
    exec(
        &mut conn,
        "DELETE FROM accounts WHERE key LIKE 'bench-acct-%'",
    )
    .await?;
    exec(
        &mut conn,
        "DELETE FROM connectors WHERE name = 'bench-ingest'",
    )
    .await?;
    Ok(())
}

/// Runs the benchmark: writes a drop of `rows` usage events into `dir`, ingests it through the
/// csv plugin from `plugins`, then COPYs the same rows into an identical table, and reports both.
pub async fn run_ingest_bench(
    database_url: &str,
    plugins: Arc<PluginRegistry>,
    rows: usize,
    dir: &Path,
) -> anyhow::Result<IngestBenchReport> {
    if plugins.get("csv").is_none() {
        anyhow::bail!(
            "the csv connector plugin was not found; build it (`cargo build --release --workspace`) \
             or point HEALTHD_PLUGIN_DIR at it"
        );
    }
    let pool = crate::db::connect(database_url, 4).await?;
    cleanup(&pool).await?;
    let drop_dir = dir.join("drop");
    let _ = std::fs::remove_dir_all(&drop_dir);
    write_drop(&drop_dir, rows)?;

    instances::create(
        &pool,
        Some(&plugins),
        NewConnector {
            name: BENCH_SOURCE.into(),
            plugin: "csv".into(),
            schedule: Some("every 365d".into()),
            settings: Some(json!({"dir": drop_dir, "batch_size": BATCH_SIZE})),
            timeout_secs: Some(24 * 3600),
            ..Default::default()
        },
    )
    .await?;
    let mut runtime = ConnectorRuntime::new(pool.clone(), database_url, plugins);
    runtime.options.rescore = false;
    let started = Instant::now();
    let summary = runtime
        .sync_now(BENCH_SOURCE, RunTrigger::Cli, Progress::Silent)
        .await?;
    let plugin_time = started.elapsed();
    if !summary.succeeded {
        anyhow::bail!("the benchmark sync failed: {}", summary.render());
    }

    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = pool.get().await?;
    let rollup: N = diesel::sql_query(
        "SELECT count(*) AS n FROM usage_daily WHERE account_id IN (SELECT id FROM accounts WHERE key LIKE 'bench-acct-%')",
    )
    .get_result(&mut conn)
    .await?;
    exec(
        &mut conn,
        "CREATE TABLE bench_copy_usage_events (LIKE usage_events INCLUDING ALL)",
    )
    .await?;

    // The same rows, as COPY input (built before the clock starts).
    #[derive(diesel::QueryableByName)]
    struct Ident {
        #[diesel(sql_type = diesel::sql_types::Text)]
        external_key: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        account_id: i64,
    }
    let idents: Vec<Ident> = diesel::sql_query(
        "SELECT external_key, account_id FROM account_identities WHERE source = 'bench-ingest'",
    )
    .load(&mut conn)
    .await?;
    drop(conn);
    let ids: std::collections::HashMap<String, i64> = idents
        .into_iter()
        .map(|i| (i.external_key, i.account_id))
        .collect();
    let start = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap();
    let mut data = Vec::with_capacity(rows * 120);
    for i in 0..rows {
        let e = event(i, rows, start);
        writeln!(
            data,
            "{},{},{},{},{},{},{},{}",
            ids.get(&e.account_key).copied().unwrap_or(0),
            BENCH_SOURCE,
            e.uid(),
            e.user_id.as_deref().unwrap_or(""),
            e.event,
            e.feature.as_deref().unwrap_or(""),
            e.occurred_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            e.count
        )?;
    }
    let url = database_url.to_string();
    let copy_time = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
        use diesel::prelude::ExecuteCopyFromDsl;
        use diesel::Connection;
        let mut conn = diesel::PgConnection::establish(&url)?;
        let started = Instant::now();
        let copy = diesel::copy_from(bench_copy_usage_events::table)
            .from_raw_data(bench_copy_usage_events::table, |w| {
                w.write_all(&data)
                    .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))
            })
            .with_format(diesel::pg::CopyFormat::Csv);
        ExecuteCopyFromDsl::execute(copy, &mut conn)?;
        Ok(started.elapsed())
    })
    .await??;

    let report = IngestBenchReport {
        rows,
        ingested: summary.records_ingested,
        plugin_time,
        copy_time,
        rollup_rows: rollup.n,
    };
    cleanup(&pool).await?;
    let _ = std::fs::remove_dir_all(&drop_dir);
    Ok(report)
}
