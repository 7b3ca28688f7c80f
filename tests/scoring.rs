//! Scoring against a real PostgreSQL: accounts whose health is known by construction, history and
//! feed rows, models and segments, freshness, score diffs, calibration, the daily job and a small run
//! of the benchmark.

use chrono::{DateTime, Duration, Utc};
use diesel::sql_types::{BigInt, Bool, Double, Integer, Json, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use healthd::db::DbPool;
use healthd::scoring::engine::{drivers, SignalScore};
use healthd::scoring::model::{self, ModelConfig, NewModel, Segment};
use healthd::scoring::{rescore_at, RescoreScope};
use healthd::testing::TestDb;

/// Scores are computed at 10:00 UTC today, so that the few hours tests add stay on the same day.
fn t0() -> DateTime<Utc> {
    Utc::now()
        .date_naive()
        .and_hms_opt(10, 0, 0)
        .unwrap()
        .and_utc()
}

async fn exec(conn: &mut AsyncPgConnection, sql: &str) {
    diesel::sql_query(sql)
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("{e}: {sql}"));
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

async fn account(conn: &mut AsyncPgConnection, key: &str, seats: i32, plan: &str) -> i64 {
    let r: Id = diesel::sql_query(
        "INSERT INTO accounts (key, name, seats, plan) VALUES ($1, $1, $2, $3) RETURNING id",
    )
    .bind::<Text, _>(key)
    .bind::<Integer, _>(seats)
    .bind::<Text, _>(plan)
    .get_result(conn)
    .await
    .unwrap();
    r.id
}

/// Daily usage for `users` users on the days `from_ago..=to_ago` days before `now`: a login, a page
/// view and two features a day, `events` each.
async fn usage(
    conn: &mut AsyncPgConnection,
    id: i64,
    now: DateTime<Utc>,
    from_ago: i32,
    to_ago: i32,
    users: i32,
    events: i64,
) {
    diesel::sql_query(
        "INSERT INTO usage_daily (account_id, day, user_id, event, feature, events)
         SELECT $1, ($2::timestamptz AT TIME ZONE 'UTC')::date - d, 'user' || u, e.event, e.feature, $6
         FROM generate_series($3, $4) d, generate_series(1, $5) u,
              (VALUES ('login', ''), ('page_view', ''), ('use', 'reports'), ('use', 'exports')) e(event, feature)
         ON CONFLICT (account_id, day, user_id, event, feature) DO UPDATE SET events = usage_daily.events + EXCLUDED.events",
    )
    .bind::<BigInt, _>(id)
    .bind::<Timestamptz, _>(now)
    .bind::<Integer, _>(from_ago)
    .bind::<Integer, _>(to_ago)
    .bind::<Integer, _>(users)
    .bind::<BigInt, _>(events)
    .execute(conn)
    .await
    .unwrap();
}

async fn paid_up(conn: &mut AsyncPgConnection, id: i64, now: DateTime<Utc>) {
    diesel::sql_query(
        "INSERT INTO subscriptions (account_id, source, subscription_id, status, mrr, current_period_end)
         VALUES ($1, 'billing', 'sub-' || $1, 'active', 500, $2 + interval '20 days');
         ",
    )
    .bind::<BigInt, _>(id)
    .bind::<Timestamptz, _>(now)
    .execute(conn)
    .await
    .unwrap();
    diesel::sql_query(
        "INSERT INTO invoices (account_id, source, invoice_id, amount, due_date, paid_at, status)
         SELECT $1, 'billing', 'inv-' || $1 || '-' || m, 500, ($2::timestamptz AT TIME ZONE 'UTC')::date - m * 30,
                $2 - make_interval(days => m * 30 + 1), 'paid'
         FROM generate_series(1, 3) m",
    )
    .bind::<BigInt, _>(id)
    .bind::<Timestamptz, _>(now)
    .execute(conn)
    .await
    .unwrap();
    // A normal, solved ticket: support data exists and is quiet.
    diesel::sql_query(
        "INSERT INTO support_tickets (account_id, source, ticket_id, priority, status, opened_at, closed_at, csat)
         VALUES ($1, 'desk', 'ok-' || $1, 'normal', 'solved', $2 - interval '20 days', $2 - interval '19 days', 5)",
    )
    .bind::<BigInt, _>(id)
    .bind::<Timestamptz, _>(now)
    .execute(conn)
    .await
    .unwrap();
}

#[derive(QueryableByName, Debug)]
struct Current {
    #[diesel(sql_type = Double)]
    score: f64,
    #[diesel(sql_type = Text)]
    tier: String,
    #[diesel(sql_type = Bool)]
    stale: bool,
    #[diesel(sql_type = Integer)]
    model_version: i32,
    #[diesel(sql_type = Json)]
    signals: serde_json::Value,
    #[diesel(sql_type = Nullable<Double>)]
    previous_score: Option<f64>,
    #[diesel(sql_type = Double)]
    score_change: f64,
}

impl Current {
    fn signals(&self) -> Vec<SignalScore> {
        serde_json::from_value(self.signals.clone()).expect("stored signals parse")
    }
    fn first_driver(&self) -> String {
        let s = self.signals();
        drivers(&s)
            .into_iter()
            .next()
            .map(|d| d.explanation.clone())
            .unwrap_or_default()
    }
    fn driver_texts(&self) -> Vec<String> {
        let s = self.signals();
        drivers(&s).iter().map(|d| d.explanation.clone()).collect()
    }
    fn signal(&self, key: &str) -> SignalScore {
        self.signals()
            .into_iter()
            .find(|s| s.key == key)
            .unwrap_or_else(|| panic!("no signal {key}"))
    }
}

async fn current(pool: &DbPool, id: i64) -> Current {
    let mut conn = pool.get().await.unwrap();
    diesel::sql_query(
        "SELECT score, tier, stale, model_version, signals, previous_score, score_change
         FROM current_health_scores WHERE account_id = $1",
    )
    .bind::<BigInt, _>(id)
    .get_result(&mut conn)
    .await
    .unwrap_or_else(|e| panic!("no health_current for {id}: {e}"))
}

async fn count(pool: &DbPool, sql: &str) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = pool.get().await.unwrap();
    let n: N = diesel::sql_query(sql).get_result(&mut conn).await.unwrap();
    n.n
}

struct Fixture {
    healthy: Vec<i64>,
    quiet: i64,
    overdue: i64,
    cancelling: i64,
    urgent: i64,
    declining: i64,
}

/// Accounts with known health, dated relative to `now`.
async fn fixture(pool: &DbPool, now: DateTime<Utc>) -> Fixture {
    let mut c = pool.get().await.unwrap();
    let conn = &mut *c;
    let mut healthy = Vec::new();
    for i in 0..3 {
        let id = account(conn, &format!("healthy-{i}"), 10, "pro").await;
        usage(conn, id, now, 0, 89, 6 + i, 5).await;
        paid_up(conn, id, now).await;
        healthy.push(id);
    }
    // Steady for months, then nothing for three weeks.
    let quiet = account(conn, "quiet", 10, "pro").await;
    usage(conn, quiet, now, 21, 89, 6, 5).await;
    paid_up(conn, quiet, now).await;
    // Invoice a month overdue.
    let overdue = account(conn, "overdue", 10, "pro").await;
    usage(conn, overdue, now, 0, 89, 6, 5).await;
    paid_up(conn, overdue, now).await;
    diesel::sql_query(
        "INSERT INTO invoices (account_id, source, invoice_id, amount, due_date, status)
         VALUES ($1, 'billing', 'late-1', 1200.00, ($2::timestamptz AT TIME ZONE 'UTC')::date - 30, 'open')",
    )
    .bind::<BigInt, _>(overdue)
    .bind::<Timestamptz, _>(now)
    .execute(conn)
    .await
    .unwrap();
    // Set to cancel.
    let cancelling = account(conn, "cancelling", 10, "pro").await;
    usage(conn, cancelling, now, 0, 89, 6, 5).await;
    paid_up(conn, cancelling, now).await;
    diesel::sql_query(
        "UPDATE subscriptions SET cancel_at_period_end = true, current_period_end = '2027-06-12T00:00:00Z' WHERE account_id = $1",
    )
    .bind::<BigInt, _>(cancelling)
    .execute(conn)
    .await
    .unwrap();
    // A burst of urgent tickets.
    let urgent = account(conn, "urgent", 10, "pro").await;
    usage(conn, urgent, now, 0, 89, 6, 5).await;
    paid_up(conn, urgent, now).await;
    diesel::sql_query(
        "INSERT INTO support_tickets (account_id, source, ticket_id, priority, status, opened_at)
         SELECT $1, 'desk', 'urgent-' || n, 'urgent', 'open', $2 - interval '3 days' + make_interval(hours => n)
         FROM generate_series(0, 3) n",
    )
    .bind::<BigInt, _>(urgent)
    .bind::<Timestamptz, _>(now)
    .execute(conn)
    .await
    .unwrap();
    // Usage down 75%: 20 events per row before, 5 now.
    let declining = account(conn, "declining", 10, "pro").await;
    usage(conn, declining, now, 30, 89, 6, 20).await;
    usage(conn, declining, now, 0, 29, 6, 5).await;
    paid_up(conn, declining, now).await;
    Fixture {
        healthy,
        quiet,
        overdue,
        cancelling,
        urgent,
        declining,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_with_known_health_score_as_expected_with_reasons() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let now = t0();
    let f = fixture(pool, now).await;
    let summary = rescore_at(pool, RescoreScope::All, now).await.unwrap();
    assert_eq!(summary.accounts_scored, 8);
    assert_eq!(summary.model_version, 1);

    let mut healthy_min: f64 = 100.0;
    for id in &f.healthy {
        let c = current(pool, *id).await;
        assert_eq!(c.tier, "healthy", "steady, paid-up account {id}: {c:?}");
        assert!(!c.stale);
        healthy_min = healthy_min.min(c.score);
    }
    assert!(
        healthy_min >= 90.0,
        "healthy accounts score high: {healthy_min}"
    );

    let quiet = current(pool, f.quiet).await;
    assert_ne!(quiet.tier, "healthy", "{quiet:?}");
    assert!(
        quiet.first_driver().contains("No login in 21 days"),
        "first driver: {:?}",
        quiet.driver_texts()
    );

    let overdue = current(pool, f.overdue).await;
    assert_ne!(overdue.tier, "healthy");
    assert!(
        overdue
            .first_driver()
            .contains("Invoice 30 days past due ($1,200.00)"),
        "first driver: {:?}",
        overdue.driver_texts()
    );

    let cancelling = current(pool, f.cancelling).await;
    assert_ne!(cancelling.tier, "healthy");
    assert!(
        cancelling
            .first_driver()
            .contains("Subscription set to cancel on 2027-06-12"),
        "first driver: {:?}",
        cancelling.driver_texts()
    );

    let urgent = current(pool, f.urgent).await;
    assert!(
        healthy_min - urgent.score >= 5.0,
        "urgent tickets cost clear points: {} vs {healthy_min}",
        urgent.score
    );
    assert!(
        urgent
            .first_driver()
            .starts_with("4 urgent tickets open, oldest 3 days"),
        "{:?}",
        urgent.driver_texts()
    );

    let declining = current(pool, f.declining).await;
    assert!(
        healthy_min - declining.score >= 10.0,
        "a 75% fall costs clear points: {}",
        declining.score
    );
    assert!(
        declining
            .first_driver()
            .contains("Usage down 75% vs the previous 30 days"),
        "{:?}",
        declining.driver_texts()
    );

    // Worst first: every troubled account is listed before every healthy one.
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        account_id: i64,
    }
    let mut conn = pool.get().await.unwrap();
    let order: Vec<Row> =
        diesel::sql_query("SELECT account_id FROM health_current ORDER BY score ASC, account_id")
            .load(&mut conn)
            .await
            .unwrap();
    let order: Vec<i64> = order.into_iter().map(|r| r.account_id).collect();
    let troubled = [f.quiet, f.overdue, f.cancelling, f.urgent, f.declining];
    let last_troubled = troubled
        .iter()
        .map(|id| order.iter().position(|x| x == id).unwrap())
        .max()
        .unwrap();
    let first_healthy = f
        .healthy
        .iter()
        .map(|id| order.iter().position(|x| x == id).unwrap())
        .min()
        .unwrap();
    assert!(last_troubled < first_healthy, "{order:?}");

    // Every stored entry has the contract's keys, and only those that cannot be derived: the read
    // API adds the label from the key.
    for s in &quiet.signals.as_array().unwrap().clone() {
        for k in [
            "key",
            "value",
            "score",
            "weight",
            "contribution",
            "impact",
            "explanation",
        ] {
            assert!(s.get(k).is_some(), "signal entry lacks {k}: {s}");
        }
        for k in ["label", "source", "configured_weight", "details"] {
            assert!(s.get(k).is_none(), "signal entry stores derivable {k}: {s}");
        }
    }
    let read = healthd::accounts::health::parse_signals(&quiet.signals);
    let login = read.iter().find(|s| s.key == "login_recency").unwrap();
    assert_eq!(login.label, "Login recency");
    assert!(!login.missing && login.contribution + login.impact > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_sources_are_left_out_and_said() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let now = t0();
    let mut conn = pool.get().await.unwrap();
    let billing_only = account(&mut conn, "billing-only", 5, "starter").await;
    exec(
        &mut conn,
        &format!(
            "INSERT INTO subscriptions (account_id, source, subscription_id, status) VALUES ({billing_only}, 'b', 's', 'active')"
        ),
    )
    .await;
    let nothing = account(&mut conn, "nothing", 5, "starter").await;
    drop(conn);
    let s = rescore_at(pool, RescoreScope::All, now).await.unwrap();
    assert_eq!(s.accounts_scored, 1);
    assert_eq!(s.accounts_without_data, 1);
    let c = current(pool, billing_only).await;
    assert_eq!(c.score, 100.0, "missing data never counts as zero");
    let login = c.signal("login_recency");
    assert!(login.missing);
    assert_eq!(login.explanation, "No usage data received for this account");
    assert!(c.signal("support").missing);
    assert_eq!(
        count(
            pool,
            &format!("SELECT COUNT(*) AS n FROM health_current WHERE account_id = {nothing}")
        )
        .await,
        0
    );

    // Once a support connector has synced, "no tickets" is data (good news), not missing.
    let mut conn = pool.get().await.unwrap();
    exec(
        &mut conn,
        "INSERT INTO connectors (id, name, plugin) VALUES (1, 'desk', 'csv')",
    )
    .await;
    exec(
        &mut conn,
        &format!(
            "INSERT INTO source_freshness VALUES (1, 'support', '{}')",
            now.to_rfc3339()
        ),
    )
    .await;
    drop(conn);
    rescore_at(pool, RescoreScope::Accounts(vec![billing_only]), now)
        .await
        .unwrap();
    let c = current(pool, billing_only).await;
    assert!(!c.signal("support").missing);
    assert!(
        c.signal("support").explanation.contains("0 tickets opened"),
        "{}",
        c.signal("support").explanation
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn history_on_change_and_daily_with_feed_rows() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let now = t0();
    let mut conn = pool.get().await.unwrap();
    // Billing only: its score does not drift as days pass.
    let flat = account(&mut conn, "flat", 5, "starter").await;
    exec(&mut conn, &format!("INSERT INTO subscriptions (account_id, source, subscription_id, status) VALUES ({flat}, 'b', 's', 'active')")).await;
    let moving = account(&mut conn, "moving", 10, "pro").await;
    usage(&mut conn, moving, now, 0, 59, 5, 5).await;
    paid_up(&mut conn, moving, now).await;
    drop(conn);

    let first = rescore_at(pool, RescoreScope::All, now).await.unwrap();
    assert_eq!(
        first.changed_account_ids.len(),
        2,
        "first scores are changes"
    );
    assert_eq!(first.feed_ids.len(), 2);
    assert_eq!(first.history_rows, 2);

    // An hour later nothing changed: no history, no feed, but the current row is refreshed.
    let again = rescore_at(pool, RescoreScope::All, now + Duration::hours(1))
        .await
        .unwrap();
    assert!(again.changed_account_ids.is_empty());
    assert!(again.feed_ids.is_empty());
    assert_eq!(again.history_rows, 0);
    assert_eq!(
        count(pool, "SELECT COUNT(*) AS n FROM health_scores").await,
        2
    );
    assert_eq!(
        count(
            pool,
            &format!(
                "SELECT COUNT(*) AS n FROM health_current WHERE computed_at = '{}'",
                (now + Duration::hours(1)).to_rfc3339()
            )
        )
        .await,
        2
    );

    // A day later: one history row per account even without change.
    let next_day = rescore_at(
        pool,
        RescoreScope::Accounts(vec![flat]),
        now + Duration::hours(25),
    )
    .await
    .unwrap();
    assert!(next_day.changed_account_ids.is_empty());
    assert_eq!(next_day.history_rows, 1);
    assert_eq!(
        count(
            pool,
            &format!("SELECT COUNT(*) AS n FROM health_scores WHERE account_id = {flat}")
        )
        .await,
        2
    );

    // A change: urgent tickets arrive -> history row, feed row with the previous score, same moment.
    let before = current(pool, moving).await;
    let mut conn = pool.get().await.unwrap();
    let later = now + Duration::hours(2);
    exec(
        &mut conn,
        &format!(
            "INSERT INTO support_tickets (account_id, source, ticket_id, priority, status, opened_at)
             SELECT {moving}, 'desk', 'u' || n, 'urgent', 'open', '{}'::timestamptz - interval '2 days' FROM generate_series(1, 3) n",
            later.to_rfc3339()
        ),
    )
    .await;
    drop(conn);
    let changed = rescore_at(pool, RescoreScope::Accounts(vec![moving]), later)
        .await
        .unwrap();
    assert_eq!(changed.changed_account_ids, vec![moving]);
    assert_eq!(changed.feed_ids.len(), 1);
    let after = current(pool, moving).await;
    assert!(after.score < before.score);
    assert_eq!(after.previous_score, Some(before.score));
    assert!((after.score_change - (after.score - before.score)).abs() < 0.05);
    #[derive(QueryableByName)]
    struct Feed {
        #[diesel(sql_type = Nullable<Double>)]
        previous_score: Option<f64>,
        #[diesel(sql_type = Double)]
        score: f64,
        #[diesel(sql_type = Nullable<Json>)]
        drivers: Option<serde_json::Value>,
        #[diesel(sql_type = Bool)]
        has_history: bool,
    }
    let mut conn = pool.get().await.unwrap();
    let feed: Feed = diesel::sql_query(
        "SELECT f.previous_score, f.score, f.drivers,
                EXISTS (SELECT 1 FROM health_scores h WHERE h.account_id = f.account_id AND h.computed_at = f.changed_at AND h.score = f.score) AS has_history
         FROM score_changes f WHERE f.id = $1",
    )
    .bind::<BigInt, _>(changed.feed_ids[0])
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!(feed.previous_score, Some(before.score));
    assert_eq!(feed.score, after.score);
    assert!(
        feed.has_history,
        "feed row and history row are written together"
    );
    // The feed reader derives the drivers from the history row written with the change.
    let read = healthd::feed::score_changes_after(pool, changed.feed_ids[0] - 1, 1)
        .await
        .unwrap();
    assert_eq!(read[0].id, changed.feed_ids[0]);
    assert!(
        read[0].drivers[0]["explanation"]
            .as_str()
            .unwrap()
            .contains("3 urgent tickets open"),
        "{}",
        read[0].drivers
    );
    assert!(feed.drivers.is_none(), "not stored a second time");

    // healthChange says which signal cost the points.
    let change = healthd::scoring::health_change(pool, moving, now + Duration::minutes(30), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        change.delta,
        ((after.score - before.score) * 10.0).round() / 10.0
    );
    assert!(!change.model_changed);
    assert!(
        change.summary.contains("tickets \u{2212}"),
        "{}",
        change.summary
    );
    assert_eq!(change.signals[0].key, "support");
    assert!(change.signals[0].delta < 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn model_versions_segments_and_model_change_split() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let now = t0();
    let f = fixture(pool, now).await;
    let mut conn = pool.get().await.unwrap();
    let ent = account(&mut conn, "enterprise-1", 200, "enterprise").await;
    usage(&mut conn, ent, now, 0, 89, 30, 5).await;
    paid_up(&mut conn, ent, now).await;
    drop(conn);
    rescore_at(pool, RescoreScope::All, now).await.unwrap();
    assert_eq!(current(pool, f.declining).await.model_version, 1);

    // A new default version with heavier usage trend; versions are never edited.
    let mut cfg = ModelConfig::default();
    cfg.weights.insert("usage_trend".into(), 40.0);
    let v2 = model::create_version(
        pool,
        NewModel {
            name: "trend-heavy".into(),
            segment: None,
            priority: 0,
            config: cfg,
            notes: None,
            created_by: Some("test".into()),
            activate: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(v2.version, 2);
    let all = model::list_models(pool).await.unwrap();
    assert_eq!(
        all.iter()
            .filter(|m| m.active && m.segment.is_none())
            .count(),
        1
    );

    // Segment models: the highest priority match wins.
    let seg_low = model::create_version(
        pool,
        NewModel {
            name: "big".into(),
            segment: Some(Segment {
                min_seats: Some(100),
                ..Default::default()
            }),
            priority: 1,
            config: ModelConfig::default(),
            notes: None,
            created_by: None,
            activate: true,
        },
    )
    .await
    .unwrap();
    let seg_high = model::create_version(
        pool,
        NewModel {
            name: "enterprise".into(),
            segment: Some(Segment {
                plan: Some(vec!["enterprise".into()]),
                ..Default::default()
            }),
            priority: 10,
            config: ModelConfig::default(),
            notes: None,
            created_by: None,
            activate: true,
        },
    )
    .await
    .unwrap();
    let later = now + Duration::hours(3);
    let s = rescore_at(pool, RescoreScope::All, later).await.unwrap();
    assert_eq!(s.model_version, 2);
    assert!(s.model_versions.contains(&seg_high.version));
    assert!(!s.model_versions.contains(&seg_low.version));
    assert_eq!(current(pool, ent).await.model_version, seg_high.version);
    let declining = current(pool, f.declining).await;
    assert_eq!(declining.model_version, 2);

    // Same data, new model: the whole change is model effect.
    let change = healthd::scoring::health_change(pool, f.declining, now, Some(later))
        .await
        .unwrap()
        .unwrap();
    assert!(change.model_changed);
    assert!(
        change.delta < 0.0,
        "heavier trend weight lowers a declining account: {change:?}"
    );
    assert!(
        (change.model_effect - change.delta).abs() < 0.2,
        "{change:?}"
    );
    assert!(change.behaviour_effect.abs() < 0.2, "{change:?}");
    assert!(
        change.summary.contains("model v1 \u{2192} v2"),
        "{}",
        change.summary
    );

    model::deactivate(pool, seg_high.version).await.unwrap();
    rescore_at(
        pool,
        RescoreScope::Accounts(vec![ent]),
        later + Duration::hours(1),
    )
    .await
    .unwrap();
    assert_eq!(current(pool, ent).await.model_version, seg_low.version);
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_sources_mark_the_score_and_lead_the_drivers() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let now = t0();
    let mut conn = pool.get().await.unwrap();
    let id = account(&mut conn, "a", 10, "pro").await;
    usage(&mut conn, id, now, 3, 89, 5, 5).await;
    paid_up(&mut conn, id, now).await;
    exec(&mut conn, "INSERT INTO connectors (id, name, plugin, max_age_hours) VALUES (1, 'product', 'csv', 48), (2, 'stripe', 'csv', 48)").await;
    exec(
        &mut conn,
        &format!(
            "INSERT INTO source_freshness VALUES (1, 'usage', '{}'), (2, 'billing', '{}')",
            (now - Duration::hours(74)).to_rfc3339(),
            (now - Duration::hours(2)).to_rfc3339()
        ),
    )
    .await;
    drop(conn);
    rescore_at(pool, RescoreScope::All, now).await.unwrap();
    let c = current(pool, id).await;
    assert!(c.stale);
    assert_eq!(c.first_driver(), "Usage data is 3 days old");
    let fresh = c.signal("freshness:usage");
    assert!(fresh.stale);
    assert_eq!(fresh.impact, 0.0);
    assert!(c.signals().iter().all(|s| s.key != "freshness:billing"));
}

#[tokio::test(flavor = "multi_thread")]
async fn calibration_finds_the_signals_that_drive_churn() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let now = t0();
    let churned_at = now - Duration::days(10);
    let as_of = churned_at - Duration::days(30);
    let mut conn = pool.get().await.unwrap();
    // 600 accounts. Churn depends on a usage decline and on urgent tickets (by construction); seats
    // use and features vary at random and do not matter.
    exec(
        &mut conn,
        "INSERT INTO accounts (key, name, seats) SELECT 'c' || g, 'c' || g, 10 FROM generate_series(1, 600) g",
    )
    .await;
    let asof = as_of.to_rfc3339();
    exec(
        &mut conn,
        "CREATE TEMP TABLE traits AS
         SELECT id,
                (hashint8(id * 7) & 1023) % 3 = 0 AS declining,
                (hashint8(id * 13) & 1023) % 4 = 0 AS urgent,
                1 + (hashint8(id * 17) & 1023) % 9 AS users,
                (hashint8(id * 19) & 1023) % 2 = 0 AS two_features,
                (hashint8(id * 23) & 1023) % 100 AS dice
         FROM accounts",
    )
    .await;
    // Previous 30 days: steady; last 30 days: down 80% for decliners.
    exec(
        &mut conn,
        &format!(
            "INSERT INTO usage_daily (account_id, day, user_id, event, feature, events)
             SELECT t.id, ('{asof}'::timestamptz AT TIME ZONE 'UTC')::date - d, 'u' || u, e.event,
                    CASE WHEN e.event = 'use' THEN (CASE WHEN t.two_features THEN 'reports' ELSE 'exports' END) ELSE '' END,
                    CASE WHEN d < 30 AND t.declining THEN 2 ELSE 10 END
             FROM traits t, generate_series(1, 59) d, generate_series(1, 9) u,
                  (VALUES ('login'), ('use')) e(event)
             WHERE u <= t.users"
        ),
    )
    .await;
    exec(
        &mut conn,
        &format!(
            "INSERT INTO support_tickets (account_id, source, ticket_id, priority, status, opened_at, closed_at)
             SELECT t.id, 'desk', 'u1', 'urgent', 'closed', '{asof}'::timestamptz - interval '3 days', '{asof}'::timestamptz + interval '5 days'
             FROM traits t WHERE t.urgent"
        ),
    )
    .await;
    exec(
        &mut conn,
        "INSERT INTO subscriptions (account_id, source, subscription_id, status) SELECT id, 'b', 's', 'active' FROM accounts",
    )
    .await;
    exec(
        &mut conn,
        "INSERT INTO connectors (id, name, plugin) VALUES (1, 'desk', 'csv')",
    )
    .await;
    exec(
        &mut conn,
        &format!(
            "INSERT INTO source_freshness VALUES (1, 'support', '{}')",
            (as_of - Duration::days(1)).to_rfc3339()
        ),
    )
    .await;
    exec(
        &mut conn,
        &format!(
            "INSERT INTO churn_outcomes (account_id, churned_at, source)
             SELECT id, '{}', 'crm' FROM traits
             WHERE dice < 5 + (CASE WHEN declining THEN 50 ELSE 0 END) + (CASE WHEN urgent THEN 40 ELSE 0 END)",
            churned_at.to_rfc3339()
        ),
    )
    .await;
    drop(conn);

    let report = healthd::scoring::calibration::calibrate_at(pool, 30, now)
        .await
        .unwrap();
    eprintln!("{report:#?}");
    let top: Vec<&str> = report
        .signals
        .iter()
        .take(2)
        .map(|s| s.key.as_str())
        .collect();
    assert!(
        top.contains(&"usage_trend") && top.contains(&"support"),
        "top signals: {top:?}"
    );
    assert!(
        report.auc_proposed > report.auc_equal,
        "proposed {} vs equal {}",
        report.auc_proposed,
        report.auc_equal
    );
    assert!(report.auc_proposed > 0.7);
    // Known weights beat equal ones; the verdict and interval say how sure that is.
    assert!(
        report.auc_proposed_interval.0 <= report.auc_proposed
            && report.auc_proposed <= report.auc_proposed_interval.1,
        "{report:#?}"
    );
    assert!(report.verdict.starts_with("better than the active model: "));
    let text = healthd::scoring::report::calibration_text(&report);
    assert!(text.contains("0.5 is chance"), "{text}");
    assert!(text.contains(" pts"), "{text}");
    assert!(
        text.contains(&format!(
            "healthd model preview {}",
            report.proposed_version
        )),
        "{text}"
    );
    for zero in &report.zero_weight_signals {
        assert!(text.contains(zero.as_str()), "{text}");
    }
    if !report.zero_weight_signals.is_empty() {
        assert!(text.contains("never appear as drivers"), "{text}");
    }
    assert_eq!(report.train_size + report.test_size, 600);
    assert!(report.test_churned > 0 && report.train_churned > 0);
    let stored = model::get_model(pool, Some(report.proposed_version))
        .await
        .unwrap()
        .unwrap();
    assert!(!stored.active, "the proposal waits for an admin");
    assert_eq!(
        model::get_model(pool, None).await.unwrap().unwrap().version,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn daily_job_runs_once_per_day_across_processes() {
    use healthd::scoring::daily::{run_if_due, DailySettings};
    let db = TestDb::new().await;
    let pool = db.pool();
    let now = t0();
    let mut conn = pool.get().await.unwrap();
    let id = account(&mut conn, "a", 10, "pro").await;
    paid_up(&mut conn, id, now).await;
    drop(conn);
    let settings = DailySettings::default();
    let (a, b) = tokio::join!(
        run_if_due(pool, now, &settings),
        run_if_due(pool, now, &settings)
    );
    let ran = [a.unwrap(), b.unwrap()]
        .into_iter()
        .filter(|r| r.is_some())
        .count();
    assert_eq!(ran, 1, "exactly one process runs the full rescore");
    assert!(run_if_due(pool, now + Duration::hours(5), &settings)
        .await
        .unwrap()
        .is_none());
    let next = run_if_due(pool, now + Duration::hours(25), &settings)
        .await
        .unwrap();
    assert_eq!(next.map(|s| s.accounts_scored), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn small_benchmark_run_keeps_working() {
    let db = TestDb::new().await;
    let report = healthd::bench::scoring::run_scoring_bench(db.pool(), 500, 50_000)
        .await
        .unwrap();
    eprintln!("{report}");
    assert_eq!(report.accounts_scored, 500);
    assert!(report.usage_events >= 40_000, "{report:?}");
    assert!(report.ratio.is_finite() && report.ratio > 0.0);
    assert!(report.peak_rss_kib.is_some());
}

/// The full benchmark (not part of the suite): `HEALTHD_BENCH_ACCOUNTS` (default 100000) and
/// `HEALTHD_BENCH_EVENTS` (default 10000000), against `HEALTHD_BENCH_DATABASE_URL` when set (kept
/// for inspection) or a throwaway test database. Run with
/// `cargo test --release -p healthd --test scoring full_benchmark -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark; run explicitly with --ignored"]
async fn full_benchmark() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let accounts = env("HEALTHD_BENCH_ACCOUNTS", 100_000);
    let events = env("HEALTHD_BENCH_EVENTS", 10_000_000);
    let (_db, pool) = match std::env::var("HEALTHD_BENCH_DATABASE_URL") {
        Ok(url) => (None, healthd::db::connect(&url, 8).await.unwrap()),
        Err(_) => {
            let db = TestDb::new().await;
            let pool = db.pool().clone();
            (Some(db), pool)
        }
    };
    let report = healthd::bench::scoring::run_scoring_bench(&pool, accounts, events)
        .await
        .unwrap();
    println!("{report}");
}

async fn gql(
    schema: &healthd::graphql::HealthdSchema,
    role: healthd::auth::Role,
    query: &str,
) -> async_graphql::Response {
    let viewer = healthd::auth::Viewer {
        token_id: 1,
        name: format!("{}-token", role.as_str()),
        role,
    };
    schema
        .execute(async_graphql::Request::new(query).data(viewer))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn graphql_models_recompute_and_calibration_errors() {
    use healthd::auth::Role;
    let db = TestDb::new().await;
    let pool = db.pool();
    let now = t0();
    fixture(pool, now).await;
    let state = healthd::app::AppState::with_plugins(
        pool.clone(),
        db.url(),
        healthd::config::Config::default(),
        Default::default(),
    );
    let schema = healthd::graphql::build_schema(Some(state));

    let r = gql(&schema, Role::Viewer, "{ scoringModel { version active isDefault weights { key weight } tiers { healthy atRisk } } }").await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let v = r.data.into_json().unwrap();
    assert_eq!(v["scoringModel"]["version"], 1);
    assert_eq!(v["scoringModel"]["tiers"]["healthy"], 70.0);
    let weights = v["scoringModel"]["weights"].as_array().unwrap();
    let w = |k: &str| {
        weights.iter().find(|w| w["key"] == k).unwrap()["weight"]
            .as_f64()
            .unwrap()
    };
    assert!(
        w("login_recency") > w("breadth")
            && w("usage_trend") > w("breadth")
            && w("billing") > w("breadth")
    );

    // Viewers read; only admins change models or recompute.
    let r = gql(
        &schema,
        Role::Viewer,
        "mutation { recomputeScores { accountsScored } }",
    )
    .await;
    assert!(r.errors[0].message.contains("admin"), "{:?}", r.errors);
    let r = gql(
        &schema,
        Role::Admin,
        "mutation { recomputeScores { accountsScored changedAccounts modelVersion } }",
    )
    .await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        r.data.into_json().unwrap()["recomputeScores"]["accountsScored"],
        8
    );

    let r = gql(
        &schema,
        Role::Admin,
        r#"mutation { updateScoringModel(input: { weights: [{ key: "billing", weight: 35 }], notes: "billing matters more" }) { version active weights { key weight } } }"#,
    )
    .await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let v = r.data.into_json().unwrap();
    assert_eq!(v["updateScoringModel"]["version"], 2);
    assert_eq!(v["updateScoringModel"]["active"], false);
    let r = gql(
        &schema,
        Role::Admin,
        "mutation { activateScoringModel(version: 2) { version active } }",
    )
    .await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let r = gql(
        &schema,
        Role::Viewer,
        "{ scoringModels { version active } scoringModel { version } }",
    )
    .await;
    let v = r.data.into_json().unwrap();
    assert_eq!(v["scoringModel"]["version"], 2);
    assert_eq!(v["scoringModels"].as_array().unwrap().len(), 2);

    let r = gql(
        &schema,
        Role::Admin,
        r#"mutation { updateScoringModel(input: { weights: [{ key: "nonsense", weight: 5 }] }) { version } }"#,
    )
    .await;
    assert!(
        r.errors[0].message.contains("unknown signal"),
        "{:?}",
        r.errors
    );
    let r = gql(
        &schema,
        Role::Admin,
        "mutation { calibrateScoringModel { aucProposed } }",
    )
    .await;
    assert!(
        r.errors[0].message.contains("no churn outcomes"),
        "{:?}",
        r.errors
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn current_scores_never_outlive_their_accounts() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let now = t0();
    let mut conn = pool.get().await.unwrap();
    let gone = account(&mut conn, "gone", 5, "pro").await;
    let kept = account(&mut conn, "kept", 5, "pro").await;
    for id in [gone, kept] {
        usage(&mut conn, id, now, 0, 20, 2, 3).await;
    }
    drop(conn);
    rescore_at(pool, RescoreScope::All, now).await.unwrap();
    let in_current =
        |id: i64| format!("SELECT COUNT(*) AS n FROM health_current WHERE account_id = {id}");
    assert_eq!(count(pool, &in_current(gone)).await, 1);

    // Deleting the account deletes its current score (a trigger: health_current has no foreign key);
    // a rescore of the id writes nothing for it, and a full rescore sweeps what a rescore running
    // during the delete may have left.
    let mut conn = pool.get().await.unwrap();
    exec(
        &mut conn,
        &format!("DELETE FROM accounts WHERE id = {gone}"),
    )
    .await;
    assert_eq!(count(pool, &in_current(gone)).await, 0, "deleted with it");
    // What a rescore writing during the delete could leave: a row for an id no account has.
    let stray = gone + 1_000_000;
    exec(
        &mut conn,
        &format!(
            "INSERT INTO health_current (account_id, computed_at, score, tier, model_version) \
             VALUES ({stray}, now(), 50, 'at_risk', 1)"
        ),
    )
    .await;
    drop(conn);
    rescore_at(
        pool,
        RescoreScope::Accounts(vec![gone, kept]),
        now + Duration::minutes(5),
    )
    .await
    .unwrap();
    rescore_at(pool, RescoreScope::All, now + Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(count(pool, &in_current(gone)).await, 0);
    assert_eq!(count(pool, &in_current(stray)).await, 0, "swept");
    assert_eq!(count(pool, &in_current(kept)).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn many_batches_rescore_through_a_pool_of_two() {
    let db = TestDb::new().await;
    let now = t0();
    // Three batches' worth of accounts with billing data only (one is overdue in each hundred).
    let mut conn = db.pool().get().await.unwrap();
    for sql in [
        "INSERT INTO accounts (key, name, seats) SELECT 'b-' || g, 'B ' || g, 5 FROM generate_series(1, 6000) g",
        "INSERT INTO subscriptions (account_id, source, subscription_id, status) SELECT id, 'b', 's' || id, 'active' FROM accounts",
        "INSERT INTO invoices (account_id, source, invoice_id, amount, due_date, status)
         SELECT id, 'b', 'i' || id, 100, current_date - 40, 'open' FROM accounts WHERE id % 100 = 0",
    ] {
        exec(&mut conn, sql).await;
    }
    drop(conn);
    // The smallest pool healthd accepts: the loader keeps one connection, the writers share the other.
    let pool = healthd::db::connect(db.url(), 2).await.unwrap();
    let s = rescore_at(&pool, RescoreScope::All, now).await.unwrap();
    assert_eq!(s.accounts_scored, 6000);
    assert_eq!(s.changed_account_ids.len(), 6000);
    assert_eq!(s.feed_ids.len(), 6000);
    assert_eq!(s.history_rows, 6000);
    assert!(
        s.feed_ids.windows(2).all(|w| w[0] < w[1]),
        "feed ids are unique"
    );
    assert_eq!(
        count(&pool, "SELECT COUNT(*) AS n FROM health_current").await,
        6000
    );
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) AS n FROM health_current WHERE tier <> 'healthy'"
        )
        .await,
        60,
        "the overdue accounts, and only those"
    );
    // Steady state an hour later: nothing changed, nothing but computed_at written.
    let again = rescore_at(&pool, RescoreScope::All, now + Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(again.accounts_scored, 6000);
    assert!(again.changed_account_ids.is_empty() && again.history_rows == 0);
    assert_eq!(
        count(&pool, "SELECT COUNT(*) AS n FROM health_scores").await,
        6000
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_breakdown_under_the_same_score_is_current_without_a_history_row() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let now = t0();
    let mut conn = pool.get().await.unwrap();
    let id = account(&mut conn, "steady", 10, "pro").await;
    usage(&mut conn, id, now, 0, 59, 5, 5).await;
    paid_up(&mut conn, id, now).await;
    drop(conn);
    rescore_at(pool, RescoreScope::All, now).await.unwrap();
    let before = current(pool, id).await;
    assert_eq!(before.signal("usage_trend").score, 1.0);

    // More use today: the trend's number moves, its score (saturated) and the total do not.
    let mut conn = pool.get().await.unwrap();
    exec(
        &mut conn,
        &format!(
            "UPDATE usage_daily SET events = events + 100 WHERE account_id = {id} AND day = '{}'",
            now.date_naive()
        ),
    )
    .await;
    drop(conn);
    let later = rescore_at(pool, RescoreScope::All, now + Duration::hours(1))
        .await
        .unwrap();
    assert!(later.changed_account_ids.is_empty());
    assert_eq!(
        later.history_rows, 0,
        "history follows score and tier, not every number"
    );
    let after = current(pool, id).await;
    assert_eq!(after.score, before.score);
    let trend = after.signal("usage_trend");
    assert!(
        trend.value > 0.0 && trend.explanation.starts_with("Usage up"),
        "the current breakdown is the new one: {}",
        trend.explanation
    );
    let held = "SELECT COUNT(*) AS n FROM health_current WHERE signals IS NOT NULL";
    assert_eq!(count(pool, held).await, 1, "held by the current row");

    // The daily history row takes the restated breakdown over.
    let next_day = rescore_at(
        pool,
        RescoreScope::Accounts(vec![id]),
        now + Duration::hours(24) + Duration::minutes(30),
    )
    .await
    .unwrap();
    assert_eq!(next_day.history_rows, 1);
    assert_eq!(count(pool, held).await, 0);
    let today = current(pool, id).await;
    assert!(today
        .signal("usage_trend")
        .explanation
        .starts_with("Usage up"));
    assert_eq!(
        count(
            pool,
            &format!("SELECT COUNT(*) AS n FROM health_scores WHERE account_id = {id}")
        )
        .await,
        2
    );
}

/// `healthd` with the test database and nothing else from the environment.
fn healthd_cli(db: &TestDb) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_healthd"));
    cmd.env_remove("HEALTHD_CONFIG")
        .env_remove("HEALTHD_DATABASE_URL")
        .env("DATABASE_URL", db.url())
        .env("HEALTHD_LOG", "warn");
    cmd
}

fn run_ok(mut cmd: std::process::Command, args: &[&str]) -> String {
    let out = cmd.args(args).output().expect("run healthd");
    assert!(
        out.status.success(),
        "healthd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn model_preview_lists_the_accounts_a_candidate_demotes_and_writes_nothing() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let now = t0();
    let f = fixture(pool, now).await;
    rescore_at(pool, RescoreScope::All, now).await.unwrap();
    let before = current(pool, f.declining).await;
    let history = count(pool, "SELECT count(*) AS n FROM health_scores").await;

    // Nearly all weight on the usage trend: the declining account must fall.
    let mut cfg = ModelConfig::default();
    for w in cfg.weights.values_mut() {
        *w = 1.0;
    }
    cfg.weights.insert("usage_trend".into(), 94.0);
    let candidate = model::create_version(
        pool,
        NewModel {
            name: "trend only".into(),
            segment: None,
            priority: 0,
            config: cfg,
            notes: None,
            created_by: Some("test".into()),
            activate: false,
        },
    )
    .await
    .unwrap();

    let p = healthd::scoring::preview::preview(pool, candidate.version, now)
        .await
        .unwrap();
    assert_eq!(p.accounts_scored, 8);
    assert!(!p.candidate_active);
    let declining = p
        .movers
        .iter()
        .find(|m| m.key == "declining")
        .unwrap_or_else(|| panic!("declining is a mover: {p:#?}"));
    assert!(
        (declining.before_score - before.score).abs() < 0.05,
        "{p:#?}"
    );
    assert!(
        declining.after_score < declining.before_score - 10.0,
        "{p:#?}"
    );
    assert_ne!(declining.after_tier, declining.before_tier, "{p:#?}");
    assert!(p.accounts_changed_tier >= 1);
    assert!(
        declining.after_drivers[0].to_lowercase().contains("usage"),
        "{:?}",
        declining.after_drivers
    );
    assert!(p.backtest.is_none(), "no churn outcomes in this store");
    // Nothing written: same current score, same history, still inactive.
    assert_eq!(current(pool, f.declining).await.score, before.score);
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM health_scores").await,
        history
    );
    assert!(
        !model::get_model(pool, Some(candidate.version))
            .await
            .unwrap()
            .unwrap()
            .active
    );

    // The same through the command line, then activation with and without a rescore.
    let v = candidate.version.to_string();
    let text = run_ok(healthd_cli(&db), &["model", "preview", &v]);
    assert!(text.contains("would change tier"), "{text}");
    assert!(text.contains("declining (declining)"), "{text}");
    assert!(
        text.contains(&format!("healthd model activate {v} --rescore")),
        "{text}"
    );
    let list = run_ok(healthd_cli(&db), &["model", "list"]);
    assert!(list.contains(&format!("v{v:<4} inactive")), "{list}");
    let shown = run_ok(healthd_cli(&db), &["model", "show", &v]);
    assert!(
        shown.contains("usage_trend") && shown.contains("pts"),
        "{shown}"
    );
    let activated = run_ok(healthd_cli(&db), &["model", "activate", &v]);
    assert!(
        activated.contains("takes effect at the next rescore"),
        "{activated}"
    );
    assert_eq!(current(pool, f.declining).await.score, before.score);
    let rescored = run_ok(healthd_cli(&db), &["model", "activate", &v, "--rescore"]);
    assert!(rescored.contains("rescored 8 accounts"), "{rescored}");
    assert_eq!(
        current(pool, f.declining).await.model_version,
        candidate.version
    );
    let missing = healthd_cli(&db)
        .args(["model", "show", "999"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("999 does not exist"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}
