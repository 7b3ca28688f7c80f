//! Hostile input through the real `healthd sync` binary and the real csv plugin: one bad row
//! never stops a source, every rejection names file, line and reason, and the next run proceeds.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use healthd::db::DbPool;
use healthd::testing::TestDb;

#[path = "support/plugin_libs.rs"]
#[allow(dead_code)]
mod plugin_libs;
#[path = "support/process.rs"]
#[allow(dead_code)]
mod process;

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName, Debug, PartialEq)]
struct Rej {
    #[diesel(sql_type = Nullable<Text>)]
    file: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    line: Option<i64>,
    #[diesel(sql_type = Text)]
    reason: String,
}

async fn count(pool: &DbPool, sql: &str) -> i64 {
    let mut conn = pool.get().await.unwrap();
    let r: N = diesel::sql_query(sql).get_result(&mut conn).await.unwrap();
    r.n
}

/// Rejections of the last run, in order.
async fn last_rejections(pool: &DbPool) -> Vec<(String, i64, String)> {
    let mut conn = pool.get().await.unwrap();
    let rows: Vec<Rej> = diesel::sql_query(
        "SELECT file, line, reason FROM connector_run_rejections \
         WHERE run_id = (SELECT max(id) FROM connector_runs) ORDER BY seq",
    )
    .load(&mut conn)
    .await
    .unwrap();
    rows.into_iter()
        .map(|r| (r.file.unwrap_or_default(), r.line.unwrap_or(0), r.reason))
        .collect()
}

/// A test database, a drop folder and a config reading it (kept alive together).
struct DropDir {
    db: TestDb,
    _tmp: tempfile::TempDir,
    drops: std::path::PathBuf,
    config: std::path::PathBuf,
}

impl DropDir {
    async fn new() -> DropDir {
        let db = TestDb::new().await;
        let tmp = tempfile::tempdir().unwrap();
        let drops = tmp.path().join("drops");
        std::fs::create_dir(&drops).unwrap();
        let config = config(&db, tmp.path(), &drops);
        DropDir {
            db,
            _tmp: tmp,
            drops,
            config,
        }
    }
}

/// A config with one csv instance `files` reading `drops`.
fn config(db: &TestDb, dir: &Path, drops: &Path) -> std::path::PathBuf {
    plugin_libs::cargo_build(&["-p", "healthd-connector-csv"], None);
    let path = dir.join("healthd.toml");
    std::fs::write(
        &path,
        format!(
            "database_url = \"{}\"\nbackground_jobs = false\n\n[[connector]]\nname = \"files\"\nplugin = \"csv\"\n[connector.settings]\ndir = \"{}\"\n",
            db.url(),
            drops.display()
        ),
    )
    .unwrap();
    path
}

fn healthd(config: &Path, args: &[&str]) -> Output {
    let mut cmd = process::healthd();
    cmd.arg("--config").arg(config).args(args);
    cmd.output().expect("run healthd")
}

fn sync(config: &Path) -> String {
    let out = healthd(config, &["sync", "files", "--quiet"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "sync failed: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_rows_are_rejected_with_file_line_and_reason_and_the_rest_ingests() {
    let drop_dir = DropDir::new().await;
    let (pool, drops, cfg) = (drop_dir.db.pool(), &drop_dir.drops, &drop_dir.config);
    let big = "x".repeat(5 * 1024 * 1024);
    std::fs::write(
        drops.join("usage_events-1.csv"),
        format!(
            "account_key,user_id,event,feature,occurred_at,count,event_id\n\
             acct-01,u1,{big},,2026-11-20T10:00:00Z,1,big-event\n\
             acct-01,u1,login,,2026-11-20T10:00:00Z,1,{big}\n\
             acct-01,u1,\"login,,2026-11-20T10:00:00Z,1,oq-b1\n\
             acct-01,u1,login,,2026-11-20T11:00:00Z,1,ok-1\n\
             acct-01,u1,login,,2026-11-20T12:00:00Z,1,ok-2\n\
             acct-01,u1,login,,2026-11-20T13:00:00Z,99999999999,ok-3\n\
             acct-01,u1,login,,2026-11-20T14:00:00Z,1,ok-4\n"
        ),
    )
    .unwrap();
    std::fs::write(
        drops.join("tickets.csv"),
        "account_key,ticket_id,status,opened_at,closed_at\n\
         acct-01,t1,solved,2026-11-20T10:00:00Z,2026-11-19T10:00:00Z\n\
         acct-01,t2,solved,2026-11-20T10:00:00Z,2026-11-21T10:00:00Z\n",
    )
    .unwrap();
    std::fs::write(
        drops.join("accounts.csv"),
        "account_key,name,account_key\nacct-01,Acme,acct-02\n",
    )
    .unwrap();
    let out = sync(cfg);
    assert!(out.contains("4 records ingested"), "{out}");
    assert!(out.contains("6 rejected"), "{out}");
    let ue = "usage_events-1.csv".to_string();
    assert_eq!(
        last_rejections(pool).await,
        vec![
            ("accounts.csv".to_string(), 1, "file skipped: the header names column `account_key` more than once".to_string()),
            ("tickets.csv".to_string(), 2, "`closed_at` is before `opened_at`".to_string()),
            (ue.clone(), 2, "`event` is 5242880 bytes long; at most 512 are allowed".to_string()),
            (ue.clone(), 3, "`event_id` is 5242880 bytes long; at most 256 are allowed".to_string()),
            (ue.clone(), 4, "unterminated quote: the quoted value in `event` starting on this line runs past the end of the line (`event` cannot hold a line break); reading resumes at the next line".to_string()),
            (ue.clone(), 7, "invalid count `99999999999`: expected a whole number of at least 1".to_string()),
        ]
    );
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM usage_events").await,
        3
    );
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM support_tickets").await,
        1
    );

    // The next run proceeds: a good file dropped later ingests.
    std::fs::write(
        drops.join("usage_events-2.csv"),
        "account_key,event,occurred_at\nacct-01,login,2026-11-21T10:00:00Z\n",
    )
    .unwrap();
    let out = sync(cfg);
    assert!(out.contains("1 records ingested"), "{out}");
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM usage_events").await,
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dates_at_the_edges_of_the_range_ingest_and_score() {
    let drop_dir = DropDir::new().await;
    let (pool, drops, cfg) = (drop_dir.db.pool(), &drop_dir.drops, &drop_dir.config);
    std::fs::write(
        drops.join("accounts.csv"),
        "account_key,renewal_date\nold,0001-01-01\nfar,9999-12-31\n",
    )
    .unwrap();
    std::fs::write(
        drops.join("usage_events.csv"),
        "account_key,event,occurred_at\nold,login,0001-01-01T00:00:00Z\nfar,login,9999-12-31T23:59:59Z\n",
    )
    .unwrap();
    std::fs::write(
        drops.join("tickets.csv"),
        "account_key,ticket_id,status,opened_at,closed_at\nold,t1,solved,0001-01-01T00:00:00Z,9999-12-31T23:59:59Z\nfar,t2,open,9999-12-31T23:59:59Z,\n",
    )
    .unwrap();
    std::fs::write(
        drops.join("invoices.csv"),
        "account_key,invoice_id,amount,due_date,paid_at,status\nold,i1,10.00,0001-01-01,,open\nfar,i2,10.00,9999-12-31,9999-12-31T00:00:00Z,paid\n",
    )
    .unwrap();
    let out = sync(cfg);
    assert!(out.contains("8 records ingested"), "{out}");
    assert!(out.contains(" 0 rejected"), "{out}");
    let out = healthd(cfg, &["score"]);
    assert!(
        out.status.success(),
        "score failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM current_health_scores").await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_after_a_killed_sync_recovers_the_dead_run_and_says_so() {
    let drop_dir = DropDir::new().await;
    let (pool, drops, cfg) = (drop_dir.db.pool(), &drop_dir.drops, &drop_dir.config);
    let mut csv = String::from("account_key,event,occurred_at,event_id\n");
    for i in 0..300_000 {
        csv.push_str(&format!(
            "acct-{},login,2026-11-{:02}T{:02}:{:02}:{:02}Z,e{i}\n",
            i % 40,
            1 + i % 25,
            i % 24,
            (i / 24) % 60,
            (i / 1440) % 60
        ));
    }
    std::fs::write(drops.join("usage_events.csv"), csv).unwrap();
    let mut child = process::healthd()
        .arg("--config")
        .arg(cfg)
        .args(["sync", "files", "--quiet"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(pool, "SELECT count(*) AS n FROM usage_events").await < 10_000 {
        assert!(Instant::now() < deadline, "the child sync made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child exited early"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // Until the dead run's heartbeat is old enough, a sync says why it cannot start yet; then
    // it recovers the run itself (no `serve` process runs) and resumes.
    let deadline = Instant::now() + Duration::from_secs(90);
    let text = loop {
        let out = healthd(cfg, &["sync", "files", "--quiet"]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            break text;
        }
        assert!(
            text.contains("is already running (run 1, last heartbeat"),
            "{text}"
        );
        assert!(
            Instant::now() < deadline,
            "the dead run was never recovered: {text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        text.contains("recovered run 1 of `files`: its process stopped"),
        "{text}"
    );
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM usage_events").await,
        300_000
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) AS n FROM connector_runs WHERE id = 1 AND status = 'failed'"
        )
        .await,
        1
    );
}

/// Run errors a viewer reads carry a reference, not database text.
#[test]
fn a_failed_batch_shows_a_reference_not_database_text() {
    let e = healthd::connectors::ingest::IngestError::Database {
        reference: "abc".into(),
    };
    assert_eq!(
        e.to_string(),
        "saving a batch failed: the database refused it (reference abc; the server log has the detail)"
    );
}
