//! A process killed (SIGKILL) in the middle of a large sync: after a restart the instance resumes
//! from its last committed batch and every row is stored exactly once.
//!
//! The killed process is the real `healthd` binary running `healthd sync big` (plugins found next
//! to it, as for users), killed without any chance to clean up.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::sql_types::BigInt;
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use healthd::connectors::instances::{self, NewConnector};
use healthd::connectors::progress::Progress;
use healthd::connectors::scheduler::{recover_stale_runs, SchedulerOptions};
use healthd::connectors::{ConnectorRuntime, RunTrigger};
use healthd::db::DbPool;
use healthd::plugins::PluginRegistry;
use healthd::testing::TestDb;
use serde_json::json;

const ROWS: usize = 200_000;

#[path = "support/plugin_libs.rs"]
#[allow(dead_code)]
mod plugin_libs;

fn registry() -> Arc<PluginRegistry> {
    Arc::new(plugin_libs::csv_registry())
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count(pool: &DbPool, sql: &str) -> i64 {
    let mut conn = pool.get().await.unwrap();
    let r: N = diesel::sql_query(sql).get_result(&mut conn).await.unwrap();
    r.n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_killed_mid_run_resumes_with_every_row_once() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("account_key,user_id,event,feature,occurred_at\n");
    for i in 0..ROWS {
        csv.push_str(&format!(
            "acct-{},u{},{},,2026-11-{:02}T{:02}:{:02}:{:02}Z\n",
            i % 50,
            i % 17,
            if i % 2 == 0 { "login" } else { "page_view" },
            1 + i % 25,
            i % 24,
            (i / 24) % 60,
            (i / 1440) % 60
        ));
    }
    std::fs::write(dir.path().join("usage_events.csv"), csv).unwrap();
    let plugins = registry();
    instances::create(
        pool,
        Some(&plugins),
        NewConnector {
            name: "big".into(),
            plugin: "csv".into(),
            settings: Some(json!({"dir": dir.path(), "batch_size": 2000})),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    let config = dir.path().join("healthd.toml");
    std::fs::write(
        &config,
        format!("database_url = \"{}\"\nbackground_jobs = false\n", db.url()),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_healthd"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "sync",
            "big",
            "--quiet",
        ])
        .env_remove("HEALTHD_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once a good part, but not all, of the file is in.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = count(pool, "SELECT count(*) AS n FROM usage_events").await;
        if n >= 20_000 {
            break;
        }
        assert!(Instant::now() < deadline, "the child sync made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child exited early"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = count(pool, "SELECT count(*) AS n FROM usage_events").await;
    assert!(
        partial < ROWS as i64,
        "the child finished before it was killed"
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) AS n FROM connector_runs WHERE status = 'running'"
        )
        .await,
        1
    );

    // "Start again": the dead run is found (its liveness lock is gone) and the next run resumes.
    let options = SchedulerOptions {
        lock_check_after: Duration::ZERO,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while recover_stale_runs(pool, &options).await.unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the killed run was never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut rt = ConnectorRuntime::new(pool.clone(), db.url(), plugins);
    rt.options.rescore = false;
    let summary = rt
        .sync_now("big", RunTrigger::Manual, Progress::Silent)
        .await
        .unwrap();
    assert!(summary.succeeded, "{}", summary.render());
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM usage_events").await,
        ROWS as i64
    );
    assert_eq!(
        count(pool, "SELECT sum(events)::bigint AS n FROM usage_daily").await,
        ROWS as i64
    );
    // The resumed run read only what the killed one had not committed.
    assert_eq!(
        summary.records_ingested as i64 + partial,
        ROWS as i64,
        "resumed from the last committed batch"
    );
}
