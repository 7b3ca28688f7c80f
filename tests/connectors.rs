//! The connector runtime against a real PostgreSQL and the real plugin libraries: ingest
//! idempotency, rejections, batch+cursor atomicity, exactly-once scheduling, retry backoff,
//! timeouts, identity mapping.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use diesel::sql_types::BigInt;
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use healthd::connectors::instances::{self, NewConnector};
use healthd::connectors::progress::Progress;
use healthd::connectors::scheduler::{claim_due, recover_stale_runs, SchedulerOptions};
use healthd::connectors::{identities, ConnectorRuntime, RunTrigger};
use healthd::db::DbPool;
use healthd::plugins::PluginRegistry;
use healthd::testing::TestDb;
use serde_json::json;

#[path = "support/plugin_libs.rs"]
#[allow(dead_code)]
mod plugin_libs;

use plugin_libs::{cargo_build, lib_path as lib, profile_dir, registry_of, workspace_dir};

/// The real csv and synthetic connectors plus the `hanging` fixture, built once per process.
fn registry() -> Arc<PluginRegistry> {
    static REGISTRY: OnceLock<Arc<PluginRegistry>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            cargo_build(
                &[
                    "-p",
                    "healthd-connector-csv",
                    "-p",
                    "healthd-connector-synthetic",
                ],
                None,
            );
            let fixtures = workspace_dir().join("target").join("fixtures");
            cargo_build(
                &["--manifest-path", "tests/fixtures/bad-plugins/Cargo.toml"],
                Some(&fixtures),
            );
            let fixtures = fixtures.join(profile_dir().file_name().unwrap());
            Arc::new(registry_of(&[
                lib(&profile_dir(), "healthd_connector_csv"),
                lib(&profile_dir(), "healthd_connector_synthetic"),
                lib(&fixtures, "fixture_hanging"),
            ]))
        })
        .clone()
}

fn runtime(db: &TestDb) -> ConnectorRuntime {
    let mut rt = ConnectorRuntime::new(db.pool().clone(), db.url(), registry());
    rt.options.rescore = false;
    rt
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

async fn exec(pool: &DbPool, sql: &str) {
    let mut conn = pool.get().await.unwrap();
    diesel::sql_query(sql).execute(&mut conn).await.unwrap();
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

async fn csv_instance(pool: &DbPool, name: &str, dir: &Path, batch_size: u64) {
    instances::create(
        pool,
        Some(&registry()),
        NewConnector {
            name: name.into(),
            plugin: "csv".into(),
            schedule: Some("every 1h".into()),
            settings: Some(json!({"dir": dir, "batch_size": batch_size})),
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

fn usage_csv(rows: usize, offset: usize) -> String {
    let mut s = String::from("account_key,user_id,event,feature,occurred_at,count\n");
    for i in offset..offset + rows {
        s.push_str(&format!(
            "acct-{},user-{},{},{},2026-11-{:02}T{:02}:{:02}:00Z,1\n",
            i % 7,
            i % 13,
            ["login", "page_view", "report_run"][i % 3],
            if i % 3 == 2 { "reports" } else { "" },
            1 + i % 25,
            i % 24,
            i % 60
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_folder_synced_twice_holds_every_row_once() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "accounts.csv",
        "account_key,name,domain,plan,seats,mrr,renewal_date\n\
         acct-0,Acme,acme.com,growth,10,1200.50,2027-01-31\n\
         acct-1,Beta,beta.io,starter,3,99,\n",
    );
    write(
        dir.path(),
        "usage_events-2026-11-01.csv",
        &usage_csv(700, 0),
    );
    write(
        dir.path(),
        "tickets.csv",
        "account_key,ticket_id,subject,priority,status,opened_at,closed_at,csat\n\
         acct-0,T1,Login broken,high,open,2026-11-20T10:00:00Z,,\n\
         acct-0,T1,Login broken,high,solved,2026-11-20T10:00:00Z,2026-11-21T10:00:00Z,4\n\
         acct-1,T2,,low,new,2026-11-22T10:00:00Z,,\n",
    );
    write(
        dir.path(),
        "subscriptions.csv",
        "account_key,subscription_id,status,mrr,current_period_end,cancel_at_period_end\n\
         acct-0,sub_1,active,1200.50,2026-12-01T00:00:00Z,false\n",
    );
    write(
        dir.path(),
        "invoices.csv",
        "account_key,invoice_id,amount,currency,due_date,paid_at,status\n\
         acct-0,in_1,1200.50,,2026-11-01,2026-11-02T00:00:00Z,paid\n\
         acct-1,in_2,99.00,EUR,2026-11-01,,open\n",
    );
    write(
        dir.path(),
        "churn.csv",
        "account_key,churned_at\nacct-6,2026-10-01T00:00:00Z\n",
    );
    csv_instance(pool, "files", dir.path(), 100).await;
    let rt = runtime(&db);

    let first = rt
        .sync_now("files", RunTrigger::Manual, Progress::Silent)
        .await
        .unwrap();
    assert!(first.succeeded, "{}", first.render());
    assert_eq!(first.records_rejected, 0, "{}", first.render());
    let totals = |pool: DbPool| async move {
        (
            count(&pool, "SELECT count(*) AS n FROM usage_events").await,
            count(
                &pool,
                "SELECT COALESCE(sum(events), 0)::bigint AS n FROM usage_daily",
            )
            .await,
            count(&pool, "SELECT count(*) AS n FROM support_tickets").await,
            count(&pool, "SELECT count(*) AS n FROM subscriptions").await,
            count(&pool, "SELECT count(*) AS n FROM invoices").await,
            count(&pool, "SELECT count(*) AS n FROM churn_outcomes").await,
            count(&pool, "SELECT count(*) AS n FROM accounts").await,
        )
    };
    // The manual run took the overdue first slot: the next one is an hour away.
    let next = instances::get(pool, "files")
        .await
        .unwrap()
        .next_run_at
        .unwrap();
    assert!(
        next > chrono::Utc::now() + chrono::Duration::minutes(59),
        "{next}"
    );
    let after_first = totals(pool.clone()).await;
    assert_eq!(after_first, (700, 700, 2, 1, 2, 1, 7));
    // The later row of T1 won; EUR kept; the account details landed.
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM support_tickets WHERE ticket_id = 'T1' AND status = 'solved' AND csat = 4").await,
        1
    );
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM accounts WHERE key = 'acct-0' AND name = 'Acme' AND domain = 'acme.com' AND seats = 10 AND mrr = 1200.50").await,
        1
    );

    // Again: nothing new. Then with the cursor forgotten: every file read again, still once.
    let second = rt
        .sync_now("files", RunTrigger::Manual, Progress::Silent)
        .await
        .unwrap();
    assert!(second.succeeded);
    assert_eq!(totals(pool.clone()).await, after_first);
    instances::update(
        pool,
        None,
        "files",
        instances::ConnectorPatch {
            reset_cursor: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let third = rt
        .sync_now("files", RunTrigger::Manual, Progress::Silent)
        .await
        .unwrap();
    assert!(third.succeeded);
    assert!(third.records_ingested >= 700);
    assert_eq!(totals(pool.clone()).await, after_first);

    // A new daily drop adds only its rows.
    write(
        dir.path(),
        "usage_events-2026-11-02.csv",
        &usage_csv(50, 700),
    );
    let fourth = rt
        .sync_now("files", RunTrigger::Manual, Progress::Silent)
        .await
        .unwrap();
    assert_eq!(fourth.records_ingested, 50);
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM usage_events").await,
        750
    );
    assert_eq!(
        count(pool, "SELECT sum(events)::bigint AS n FROM usage_daily").await,
        750
    );
    // Freshness recorded for the plugin's kinds; the run history is newest first.
    assert!(count(pool, "SELECT count(*) AS n FROM source_freshness").await >= 5);
    let runs = instances::runs(pool, "files", 10).await.unwrap();
    assert_eq!(runs.len(), 4);
    assert!(runs[0].id > runs[1].id);
    assert!(runs.iter().all(|r| r.status == "succeeded"));
    // The listing's totals (kept on the instance) match the run history.
    let overview = instances::overview(pool).await.unwrap();
    let total: i64 = runs.iter().map(|r| r.records_ingested).sum();
    assert_eq!(overview[0].records_ingested, total);
    assert!(overview[0].last_success_at.is_some());
    assert_eq!(overview[0].last_run.as_ref().unwrap().id, runs[0].id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_rejected_with_file_and_line_and_the_rest_ingests() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "usage_events.csv",
        "account_key,event,occurred_at,user_id\n\
         a1,login,2026-11-23T09:00:00Z,u1\n\
         ,login,2026-11-23T09:00:00Z,u1\n\
         a1,login,yesterday,u1\n\
         a1,page_view,2026-11-23T10:00:00Z,u2\n",
    );
    write(
        dir.path(),
        "tickets.csv",
        "account_key,ticket_id,status,opened_at,priority\n\
         a1,T1,open,2026-11-23T09:00:00Z,urgent\n\
         a1,T2,wip,2026-11-23T09:00:00Z,low\n",
    );
    csv_instance(pool, "drops", dir.path(), 1000).await;
    let summary = runtime(&db)
        .sync_now("drops", RunTrigger::Cli, Progress::Silent)
        .await
        .unwrap();
    assert!(summary.succeeded, "{}", summary.render());
    assert_eq!(summary.records_ingested, 3);
    assert_eq!(summary.records_rejected, 3);
    let rejections = instances::rejections(pool, summary.run_id, 100)
        .await
        .unwrap();
    let mut places: Vec<(String, i64)> = rejections
        .iter()
        .map(|r| (r.file.clone().unwrap(), r.line.unwrap()))
        .collect();
    places.sort();
    assert_eq!(
        places,
        vec![
            ("tickets.csv".to_string(), 3),
            ("usage_events.csv".to_string(), 3),
            ("usage_events.csv".to_string(), 4)
        ]
    );
    assert!(rejections.iter().all(|r| !r.reason.is_empty()));
    let text = summary.render();
    assert!(text.contains("usage_events.csv:3"), "{text}");
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM usage_events").await,
        2
    );
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM support_tickets").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_mid_run_loses_and_duplicates_nothing() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "usage_events.csv", &usage_csv(1000, 0));
    csv_instance(pool, "flaky", dir.path(), 100).await;
    // The database refuses the batch that would take usage_events past 450 rows.
    exec(
        pool,
        "CREATE FUNCTION fail_past_450() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF (SELECT count(*) FROM usage_events) > 450 THEN RAISE EXCEPTION 'simulated failure'; END IF; \
           RETURN NULL; END $$",
    )
    .await;
    exec(
        pool,
        "CREATE TRIGGER fail_past_450 AFTER INSERT ON usage_events FOR EACH STATEMENT EXECUTE FUNCTION fail_past_450()",
    )
    .await;
    let rt = runtime(&db);
    let failed = rt
        .sync_now("flaky", RunTrigger::Manual, Progress::Silent)
        .await
        .unwrap();
    assert!(!failed.succeeded);
    // Viewers read the failure in their terms with a reference; the database text stays in the log.
    let error = failed.error.as_deref().unwrap();
    assert!(
        error.contains("saving a batch failed") && error.contains("reference"),
        "{error}"
    );
    assert!(!error.contains("simulated failure"), "{error}");
    // Four whole batches were committed with their cursor; the fifth not at all.
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM usage_events").await,
        400
    );
    assert_eq!(failed.records_ingested, 400);
    let instance = instances::get(pool, "flaky").await.unwrap();
    assert!(instance.cursor.is_some());
    assert_eq!(instance.failures, 1);

    exec(pool, "DROP TRIGGER fail_past_450 ON usage_events").await;
    let ok = rt
        .sync_now("flaky", RunTrigger::Manual, Progress::Silent)
        .await
        .unwrap();
    assert!(ok.succeeded, "{}", ok.render());
    assert_eq!(ok.records_ingested, 600);
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM usage_events").await,
        1000
    );
    assert_eq!(
        count(pool, "SELECT sum(events)::bigint AS n FROM usage_daily").await,
        1000
    );
    assert_eq!(instances::get(pool, "flaky").await.unwrap().failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_schedulers_on_one_database_claim_each_due_run_once() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let dir = tempfile::tempdir().unwrap();
    for i in 0..30 {
        csv_instance(pool, &format!("inst-{i:02}"), dir.path(), 100).await;
    }
    // A second "process": its own pool on the same database.
    let other = healthd::db::connect(db.url(), 8).await.unwrap();
    let claim_all = |pool: DbPool| async move {
        let mut mine = Vec::new();
        for _ in 0..20 {
            let claimed = claim_due(&pool, 3).await.unwrap();
            mine.extend(claimed.into_iter().map(|(i, run)| (i.name, run)));
            tokio::task::yield_now().await;
        }
        mine
    };
    let (a, b) = tokio::join!(
        tokio::spawn(claim_all(pool.clone())),
        tokio::spawn(claim_all(other.clone()))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut names: Vec<String> = a.iter().chain(&b).map(|(n, _)| n.clone()).collect();
    names.sort();
    let unique: std::collections::BTreeSet<_> = names.iter().cloned().collect();
    assert_eq!(names.len(), 30, "claimed {names:?}");
    assert_eq!(unique.len(), 30);
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM connector_runs").await,
        30
    );

    // Due again while the run is still going: not claimed a second time.
    exec(
        pool,
        "UPDATE connectors SET next_run_at = now() - interval '1 minute'",
    )
    .await;
    assert!(claim_due(pool, 100).await.unwrap().is_empty());
    // A manual sync of a running instance is refused too.
    let err = runtime(&db)
        .start_run("inst-00", RunTrigger::Manual)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already running"), "{err}");

    // The claiming processes "died": their runs hold no liveness lock, so they are recovered
    // once their heartbeat is older than the check threshold, and claimable again.
    exec(
        pool,
        "UPDATE connector_runs SET heartbeat_at = now() - interval '1 minute'",
    )
    .await;
    let options = SchedulerOptions {
        lock_check_after: Duration::from_secs(10),
        ..Default::default()
    };
    let recovered = recover_stale_runs(pool, &options).await.unwrap();
    assert_eq!(recovered.len(), 30);
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM connector_runs WHERE status = 'failed' AND error LIKE '%stopped%'").await,
        30
    );
    let again = claim_due(pool, 100).await.unwrap();
    assert_eq!(again.len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_runs_are_retried_with_growing_backoff() {
    let db = TestDb::new().await;
    let pool = db.pool();
    // The folder does not exist: the connector refuses to start.
    instances::create(
        pool,
        None,
        NewConnector {
            name: "broken".into(),
            plugin: "csv".into(),
            schedule: Some("every 1d".into()),
            settings: Some(json!({"dir": "/definitely/not/here"})),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let rt = runtime(&db);
    let mut delays = Vec::new();
    for attempt in 1..=3 {
        exec(pool, "UPDATE connectors SET next_run_at = now()").await;
        let mut claimed = claim_due(pool, 10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        let (instance, run_id) = claimed.pop().unwrap();
        let summary = rt.execute_run(instance, run_id, Progress::Silent).await;
        assert!(!summary.succeeded);
        assert!(
            summary
                .error
                .as_deref()
                .unwrap()
                .contains("/definitely/not/here"),
            "{:?}",
            summary.error
        );
        let i = instances::get(pool, "broken").await.unwrap();
        assert_eq!(i.failures, attempt);
        delays.push((i.next_run_at.unwrap() - chrono::Utc::now()).num_seconds());
    }
    // ~30 s, ~60 s, ~120 s (never the next regular run, a day away).
    assert!((25..=30).contains(&delays[0]), "{delays:?}");
    assert!((55..=60).contains(&delays[1]), "{delays:?}");
    assert!((115..=120).contains(&delays[2]), "{delays:?}");
    // An unknown plugin fails its run with a clear reason.
    instances::create(
        pool,
        None,
        NewConnector {
            name: "ghost".into(),
            plugin: "no-such-plugin".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let s = rt
        .sync_now("ghost", RunTrigger::Manual, Progress::Silent)
        .await
        .unwrap();
    assert!(s.error.unwrap().contains("not installed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_connector_times_out_and_the_process_goes_on() {
    let db = TestDb::new().await;
    let pool = db.pool();
    for (name, settings) in [
        ("polite", json!({"mode": "cooperative"})),
        ("stuck", json!({"mode": "stuck", "stuck_ms": 6000})),
    ] {
        instances::create(
            pool,
            Some(&registry()),
            NewConnector {
                name: name.into(),
                plugin: "hanging".into(),
                settings: Some(settings),
                timeout_secs: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let mut rt = runtime(&db);
    rt.options.grace = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let polite = rt
        .sync_now("polite", RunTrigger::Manual, Progress::Silent)
        .await
        .unwrap();
    assert!(!polite.succeeded);
    assert_eq!(polite.error.as_deref(), Some("timed out after 1 s"));
    let stuck = rt
        .sync_now("stuck", RunTrigger::Manual, Progress::Silent)
        .await
        .unwrap();
    assert!(stuck
        .error
        .as_deref()
        .unwrap()
        .starts_with("timed out after 1 s"));
    assert!(started.elapsed() < Duration::from_secs(10));
    // Both runs are closed; the instances can run again.
    assert_eq!(
        count(
            pool,
            "SELECT count(*) AS n FROM connector_runs WHERE status = 'running'"
        )
        .await,
        0
    );
    let overview = instances::overview(pool).await.unwrap();
    assert!(overview
        .iter()
        .all(|o| o.status == healthd::connectors::ConnectorStatus::Failed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_match_by_domain_create_placeholders_and_admins_remap() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let crm = tempfile::tempdir().unwrap();
    write(
        crm.path(),
        "accounts.csv",
        "account_key,name,domain\nacme-corp,Acme Corporation,acme.com\n",
    );
    let product = tempfile::tempdir().unwrap();
    write(
        product.path(),
        "accounts.csv",
        "account_key,name,domain\nA-77,ACME,https://www.Acme.com/\n",
    );
    write(
        product.path(),
        "usage_events.csv",
        "account_key,event,occurred_at\nA-77,login,2026-11-23T09:00:00Z\nX-1,login,2026-11-23T09:00:00Z\nX-1,page_view,2026-11-23T09:05:00Z\n",
    );
    csv_instance(pool, "crm", crm.path(), 100).await;
    csv_instance(pool, "product", product.path(), 100).await;
    let rt = runtime(&db);
    for name in ["crm", "product"] {
        let s = rt
            .sync_now(name, RunTrigger::Manual, Progress::Silent)
            .await
            .unwrap();
        assert!(s.succeeded, "{}", s.render());
    }
    let ids = identities::list(pool, Some("product"), None, 100)
        .await
        .unwrap();
    let by_key: std::collections::HashMap<_, _> =
        ids.iter().map(|i| (i.external_key.as_str(), i)).collect();
    assert_eq!(by_key["A-77"].account_key, "acme-corp");
    assert_eq!(by_key["A-77"].matched_by, "domain");
    // An unknown key became a placeholder account named after it.
    assert_eq!(by_key["X-1"].account_key, "X-1");
    assert_eq!(by_key["X-1"].account_name, "X-1");
    assert_eq!(count(pool, "SELECT count(*) AS n FROM accounts").await, 2);

    // The admin says X-1 is Acme too: its data moves and the placeholder goes away.
    let outcome = identities::remap(pool, "product", "X-1", "acme-corp")
        .await
        .unwrap();
    assert!(outcome.moved_data && outcome.deleted_previous);
    assert_eq!(outcome.identity.matched_by, "admin");
    assert_eq!(count(pool, "SELECT count(*) AS n FROM accounts").await, 1);
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM usage_events e JOIN accounts a ON a.id = e.account_id WHERE a.key = 'acme-corp'").await,
        3
    );
    assert_eq!(
        count(pool, "SELECT sum(events)::bigint AS n FROM usage_daily").await,
        3
    );
    let listed = identities::list(pool, None, Some("acme-corp"), 100)
        .await
        .unwrap();
    assert_eq!(listed.len(), 3);
    // Remapping to an unknown account or from an unknown key says so.
    let e = identities::remap(pool, "product", "X-1", "nope")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no account with key `nope`"), "{e}");
    let e = identities::remap(pool, "product", "Z-9", "acme-corp")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no identity"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_backfills_then_appends_and_config_entries_sync() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let config = healthd::config::Config::from_toml(
        r#"
        [[connector]]
        name = "demo"
        plugin = "synthetic"
        schedule = "every 1m"
        [connector.settings]
        accounts = 12
        days = 20
        "#,
    )
    .unwrap();
    let report = instances::sync_config(pool, Some(&registry()), &config.connectors)
        .await
        .unwrap();
    assert_eq!(report.created, vec!["demo".to_string()]);
    let again = instances::sync_config(pool, Some(&registry()), &config.connectors)
        .await
        .unwrap();
    assert!(again.created.is_empty() && again.updated.is_empty());
    let rt = runtime(&db);
    let first = rt
        .sync_now("demo", RunTrigger::Manual, Progress::Silent)
        .await
        .unwrap();
    assert!(first.succeeded, "{}", first.render());
    assert!(first.records_ingested > 100);
    assert_eq!(count(pool, "SELECT count(*) AS n FROM accounts").await, 12);
    let events = count(pool, "SELECT count(*) AS n FROM usage_events").await;
    let second = rt
        .sync_now("demo", RunTrigger::Manual, Progress::Silent)
        .await
        .unwrap();
    assert!(second.succeeded);
    assert!(count(pool, "SELECT count(*) AS n FROM usage_events").await >= events);
    assert_eq!(
        count(pool, "SELECT (SELECT COALESCE(sum(count), 0) FROM usage_events)::bigint - (SELECT COALESCE(sum(events), 0) FROM usage_daily)::bigint + (SELECT COALESCE(sum(events), 0) FROM usage_daily_external)::bigint AS n").await,
        0,
        "the daily rollup matches the raw events"
    );
    // Removing it from the config disables it.
    let report = instances::sync_config(pool, Some(&registry()), &[])
        .await
        .unwrap();
    assert_eq!(report.disabled, vec!["demo".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_ingest_benchmark_runs() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let report = healthd::bench::ingest::run_ingest_bench(db.url(), registry(), 20_000, dir.path())
        .await
        .unwrap();
    println!("{report}");
    assert_eq!(report.ingested, 20_000);
    assert!(report.rollup_rows > 0 && report.rollup_rows <= 20_000);
    assert!(report.copy_rate() > 0.0 && report.plugin_rate() > 0.0);
    // It cleans up after itself.
    assert_eq!(
        count(db.pool(), "SELECT count(*) AS n FROM usage_events").await,
        0
    );
    assert_eq!(
        count(db.pool(), "SELECT count(*) AS n FROM accounts").await,
        0
    );
}

/// The full benchmark: `cargo test --release -p healthd --test connectors -- --ignored --nocapture`
/// (`HEALTHD_BENCH_ROWS` overrides the 1,000,000 rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes a minute; run explicitly"]
async fn ingest_benchmark_full() {
    let rows = std::env::var("HEALTHD_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let report = healthd::bench::ingest::run_ingest_bench(db.url(), registry(), rows, dir.path())
        .await
        .unwrap();
    println!("{report}");
    assert_eq!(report.ingested, rows as u64);
}
