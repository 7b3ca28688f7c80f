//! Alert rules against a real PostgreSQL: raising with drivers, one open alert per account and
//! rule, hysteresis and cool-down, snoozes, the editor-only task workflow over GraphQL, feedback
//! and per-rule precision, and rule settings from config and admin changes.

use async_graphql::{Request, Variables};
use diesel::sql_types::{BigInt, Double, Jsonb, Text};
use diesel_async::RunQueryDsl;
use healthd::alerts::{self, AlertScope};
use healthd::app::AppState;
use healthd::auth::{Role, Viewer};
use healthd::config::Config;
use healthd::testing::TestDb;
use serde_json::{json, Value};

async fn exec(pool: &healthd::db::DbPool, sql: &str) {
    use diesel_async::SimpleAsyncConnection;
    let mut conn = pool.get().await.unwrap();
    conn.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[derive(diesel::QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

async fn account(pool: &healthd::db::DbPool, key: &str, owner: &str) -> i64 {
    let mut conn = pool.get().await.unwrap();
    let row: Id = diesel::sql_query(
        "INSERT INTO accounts (key, name, owner) VALUES ($1, $1 || ' Inc', $2) RETURNING id",
    )
    .bind::<Text, _>(key)
    .bind::<Text, _>(owner)
    .get_result(&mut conn)
    .await
    .unwrap();
    row.id
}

fn signals(drivers: &[(&str, f64, &str)]) -> Value {
    Value::Array(
        drivers
            .iter()
            .map(|(key, impact, explanation)| {
                json!({"key": key, "label": key, "value": 1.0, "score": 0.2, "weight": 20.0,
                       "contribution": 20.0 - impact, "impact": impact, "explanation": explanation,
                       "missing": false})
            })
            .collect(),
    )
}

/// What scoring does: the current score, a history row and a feed entry, in one transaction.
async fn set_score(
    pool: &healthd::db::DbPool,
    account_id: i64,
    score: f64,
    tier: &str,
    signals: &Value,
) {
    let mut conn = pool.get().await.unwrap();
    diesel::sql_query(
        "WITH ts AS (SELECT clock_timestamp() AS t), \
         prev AS (SELECT score, tier FROM health_current WHERE account_id = $1), \
         up AS (INSERT INTO health_current (account_id, computed_at, score, tier, model_version, history_at, previous_score, score_change) \
                SELECT $1, ts.t, $2, $3, 1, ts.t, (SELECT score FROM prev), $2 - coalesce((SELECT score FROM prev), $2) FROM ts \
                ON CONFLICT (account_id) DO UPDATE SET computed_at = EXCLUDED.computed_at, score = EXCLUDED.score, \
                tier = EXCLUDED.tier, history_at = EXCLUDED.history_at, previous_score = EXCLUDED.previous_score, \
                score_change = EXCLUDED.score_change), \
         hist AS (INSERT INTO health_scores (account_id, computed_at, score, tier, model_version, signals) \
                  SELECT $1, ts.t, $2, $3, 1, $4 FROM ts) \
         INSERT INTO score_changes (account_id, previous_score, score, previous_tier, tier, drivers) \
         VALUES ($1, (SELECT score FROM prev), $2, (SELECT tier FROM prev), $3, $4)",
    )
    .bind::<BigInt, _>(account_id)
    .bind::<Double, _>(score)
    .bind::<Text, _>(tier)
    .bind::<Jsonb, _>(signals)
    .execute(&mut conn)
    .await
    .unwrap();
}

#[derive(diesel::QueryableByName, Debug)]
struct AlertLine {
    #[diesel(sql_type = Text)]
    rule: String,
    #[diesel(sql_type = Text)]
    status: String,
}

async fn alerts_of(pool: &healthd::db::DbPool, account_id: i64) -> Vec<(String, String)> {
    let mut conn = pool.get().await.unwrap();
    let rows: Vec<AlertLine> =
        diesel::sql_query("SELECT rule, status FROM alerts WHERE account_id = $1 ORDER BY id")
            .bind::<BigInt, _>(account_id)
            .load(&mut conn)
            .await
            .unwrap();
    rows.into_iter().map(|r| (r.rule, r.status)).collect()
}

fn viewer(role: Role) -> Viewer {
    Viewer {
        token_id: 1,
        name: format!("{}-token", role.as_str()),
        role,
    }
}

async fn gql(
    schema: &healthd::graphql::HealthdSchema,
    role: Role,
    query: &str,
    vars: Value,
) -> async_graphql::Response {
    schema
        .execute(
            Request::new(query)
                .variables(Variables::from_json(vars))
                .data(viewer(role)),
        )
        .await
}

fn data(response: async_graphql::Response) -> Value {
    assert!(
        response.errors.is_empty(),
        "GraphQL errors: {:?}",
        response.errors
    );
    response.data.into_json().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn troubled_account_raises_each_rule_once_with_drivers() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let acme = account(pool, "acme", "dana").await;
    let fine = account(pool, "fine", "erin").await;
    exec(
        pool,
        &format!("UPDATE accounts SET renewal_date = current_date + 30 WHERE id = {acme}"),
    )
    .await;
    // Three days ago healthy at 85; today 58 and AT_RISK.
    exec(pool, &format!(
        "INSERT INTO health_current (account_id, computed_at, score, tier, model_version, history_at) \
         VALUES ({acme}, now() - interval '3 days', 85, 'healthy', 1, now() - interval '3 days'), ({fine}, now(), 90, 'healthy', 1, NULL); \
         INSERT INTO health_scores (account_id, computed_at, score, tier, model_version, signals) \
         VALUES ({acme}, now() - interval '3 days', 85, 'healthy', 1, '[]')"
    ))
    .await;
    let drivers = signals(&[
        ("billing", 12.0, "Invoice 30 days past due ($1,200.00)"),
        ("login_recency", 18.0, "No login in 21 days"),
        ("support", 5.0, "1 urgent ticket open, oldest 3 days"),
    ]);
    set_score(pool, acme, 58.0, "at_risk", &drivers).await;
    exec(pool, &format!(
        "INSERT INTO usage_daily (account_id, day, user_id, event, events) VALUES \
           ({acme}, current_date - 40, 'u1', 'login', 3), ({acme}, current_date - 21, 'u1', 'login', 1), \
           ({fine}, current_date - 1, 'u2', 'login', 4); \
         INSERT INTO invoices (account_id, source, invoice_id, amount, due_date, status) VALUES \
           ({acme}, 'billing', 'INV-1', 1200.00, current_date - 30, 'open'), \
           ({fine}, 'billing', 'INV-2', 99.00, current_date + 10, 'open'); \
         INSERT INTO support_tickets (account_id, source, ticket_id, priority, status, opened_at) VALUES \
           ({acme}, 'desk', 'T-1', 'urgent', 'open', now() - interval '3 days'), \
           ({fine}, 'desk', 'T-2', 'urgent', 'open', now() - interval '2 hours')"
    ))
    .await;

    let summary = alerts::evaluate(pool, &AlertScope::All).await.unwrap();
    assert_eq!(
        summary.raised,
        6,
        "every rule fires for acme, none for fine: {:?}",
        alerts_of(pool, acme).await
    );
    assert!(alerts_of(pool, fine).await.is_empty());
    // Evaluating again raises nothing: one unresolved alert per account and rule.
    let again = alerts::evaluate(pool, &AlertScope::Accounts(vec![acme, fine]))
        .await
        .unwrap();
    assert_eq!((again.raised, again.resolved), (0, 0));

    let state = AppState::new(pool.clone(), db.url(), Config::default());
    let schema = healthd::graphql::build_schema(Some(state));
    let list = data(gql(&schema, Role::Viewer,
        "{ alerts(filter: {accountKeys: [\"acme\"]}, first: 10) { totalCount nodes { id rule severity status message owner assignee dueAt createdAt account { key name } drivers { key explanation impact } } pageInfo { hasNextPage } } }",
        json!({})).await);
    let nodes = list["alerts"]["nodes"].as_array().unwrap();
    assert_eq!(list["alerts"]["totalCount"], 6);
    let by_rule = |rule: &str| {
        nodes
            .iter()
            .find(|n| n["rule"] == rule)
            .unwrap_or_else(|| panic!("no {rule} alert"))
            .clone()
    };
    let drop = by_rule("score_drop");
    assert_eq!(drop["message"], "Score fell 27 points in 7 days (85 to 58): No login in 21 days; Invoice 30 days past due ($1,200.00); 1 urgent ticket open, oldest 3 days");
    assert_eq!(drop["drivers"][0]["explanation"], "No login in 21 days");
    assert_eq!(drop["drivers"][0]["impact"], 18.0);
    assert_eq!(drop["owner"], "dana");
    assert_eq!(drop["assignee"], "dana");
    assert_eq!(drop["status"], "OPEN");
    assert_eq!(drop["severity"], "WARNING");
    assert_eq!(drop["account"]["key"], "acme");
    assert!(drop["dueAt"].is_string());
    assert!(by_rule("no_login")["message"]
        .as_str()
        .unwrap()
        .starts_with("No login in 21 days"));
    assert!(by_rule("invoice_past_due")["message"]
        .as_str()
        .unwrap()
        .starts_with("1 invoice past due, oldest 30 days ($1,200.00)"));
    assert_eq!(by_rule("invoice_past_due")["severity"], "CRITICAL");
    assert!(by_rule("urgent_ticket_open")["message"]
        .as_str()
        .unwrap()
        .starts_with("1 urgent ticket open for over 48 hours, oldest 3 days"));
    assert!(by_rule("tier_worsened")["message"]
        .as_str()
        .unwrap()
        .starts_with("Health tier fell from HEALTHY to AT_RISK (score 58)"));
    assert!(by_rule("renewal_at_risk")["message"]
        .as_str()
        .unwrap()
        .starts_with("Renewal in 30 days"));

    // The task workflow: a viewer cannot change alerts, an editor can.
    let id = drop["id"].as_str().unwrap().to_string();
    let ack = "mutation($id: ID!) { acknowledgeAlert(id: $id) { id status } }";
    let denied = gql(&schema, Role::Viewer, ack, json!({"id": id})).await;
    assert_eq!(denied.errors.len(), 1);
    assert!(
        denied.errors[0].message.contains("editor"),
        "{}",
        denied.errors[0].message
    );
    let acked = data(gql(&schema, Role::Editor, ack, json!({"id": id})).await);
    assert_eq!(acked["acknowledgeAlert"]["status"], "ACKNOWLEDGED");
    let assigned = data(gql(&schema, Role::Editor,
        "mutation($id: ID!) { assignAlert(id: $id, assignee: \"sam\", dueAt: \"2030-01-02T03:04:05Z\") { assignee dueAt } }",
        json!({"id": id})).await);
    assert_eq!(assigned["assignAlert"]["assignee"], "sam");
    assert_eq!(
        assigned["assignAlert"]["dueAt"],
        "2030-01-02T03:04:05+00:00"
    );
    let resolved = data(
        gql(
            &schema,
            Role::Editor,
            "mutation($id: ID!) { resolveAlert(id: $id) { status resolvedAt resolvedBy } }",
            json!({"id": id}),
        )
        .await,
    );
    assert_eq!(resolved["resolveAlert"]["status"], "RESOLVED");
    assert_eq!(resolved["resolveAlert"]["resolvedBy"], "editor-token");
    let twice = gql(
        &schema,
        Role::Editor,
        "mutation($id: ID!) { resolveAlert(id: $id) { status } }",
        json!({"id": id}),
    )
    .await;
    assert!(
        twice.errors[0].message.contains("is resolved"),
        "{}",
        twice.errors[0].message
    );
    let missing = gql(&schema, Role::Editor, ack, json!({"id": "999999"})).await;
    assert!(missing.errors[0].message.contains("does not exist"));

    // Snoozed until a date, then open again once it has passed.
    let ticket = by_rule("urgent_ticket_open")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let snoozed = data(gql(&schema, Role::Editor,
        "mutation($id: ID!) { snoozeAlert(id: $id, until: \"2099-01-01T00:00:00Z\") { status snoozedUntil } }",
        json!({"id": ticket})).await);
    assert_eq!(snoozed["snoozeAlert"]["status"], "SNOOZED");
    exec(
        pool,
        &format!(
            "UPDATE alerts SET snoozed_until = now() - interval '1 minute' WHERE id = {ticket}"
        ),
    )
    .await;
    let woke = alerts::evaluate(pool, &AlertScope::Accounts(vec![acme]))
        .await
        .unwrap();
    assert_eq!(woke.reopened, 1);

    // Feedback feeds each rule's precision.
    for (rule, useful) in [
        ("no_login", true),
        ("invoice_past_due", true),
        ("tier_worsened", false),
    ] {
        let q = if useful {
            "mutation($id: ID!) { markAlertUseful(id: $id) { useful } }"
        } else {
            "mutation($id: ID!) { markAlertFalseAlarm(id: $id) { useful } }"
        };
        data(gql(&schema, Role::Editor, q, json!({"id": by_rule(rule)["id"]})).await);
    }
    data(
        gql(
            &schema,
            Role::Editor,
            "mutation($id: ID!) { alertFeedback(id: $id, useful: false) { useful } }",
            json!({"id": by_rule("score_drop")["id"]}),
        )
        .await,
    );
    let rules = data(gql(&schema, Role::Viewer,
        "{ alertRules { key enabled severity cooldownHours precision usefulCount falseAlarmCount alertCount unresolvedCount source } }",
        json!({})).await);
    let rule = |key: &str| {
        rules["alertRules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == key)
            .unwrap()
            .clone()
    };
    assert_eq!(rules["alertRules"].as_array().unwrap().len(), 6);
    assert_eq!(rule("no_login")["precision"], 1.0);
    assert_eq!(rule("tier_worsened")["precision"], 0.0);
    assert_eq!(rule("score_drop")["falseAlarmCount"], 1);
    assert_eq!(rule("score_drop")["unresolvedCount"], 0);
    assert_eq!(rule("renewal_at_risk")["precision"], Value::Null);
    assert_eq!(rule("score_drop")["cooldownHours"], 24);

    // Paging: newest first, cursors continue.
    let page1 = data(
        gql(
            &schema,
            Role::Viewer,
            "{ alerts(first: 4) { nodes { id } pageInfo { hasNextPage endCursor } } }",
            json!({}),
        )
        .await,
    );
    assert_eq!(page1["alerts"]["pageInfo"]["hasNextPage"], true);
    let after = page1["alerts"]["pageInfo"]["endCursor"].clone();
    let page2 = data(gql(&schema, Role::Viewer, "query($a: String) { alerts(first: 4, after: $a) { nodes { id } pageInfo { hasNextPage } } }", json!({"a": after})).await);
    assert_eq!(page2["alerts"]["nodes"].as_array().unwrap().len(), 2);
    let open = data(
        gql(
            &schema,
            Role::Viewer,
            "{ alerts(filter: {statuses: [OPEN], severities: [CRITICAL]}) { totalCount } }",
            json!({}),
        )
        .await,
    );
    assert_eq!(open["alerts"]["totalCount"], 3);

    // Account.alerts: unresolved by default, all with includeResolved.
    let account = data(gql(&schema, Role::Viewer,
        "{ accounts(first: 10) { nodes { key alerts { rule status } all: alerts(includeResolved: true) { rule } } } }",
        json!({})).await);
    let nodes = account["accounts"]["nodes"].as_array().unwrap();
    let acme_node = nodes.iter().find(|n| n["key"] == "acme").unwrap();
    assert_eq!(acme_node["alerts"].as_array().unwrap().len(), 5);
    assert_eq!(acme_node["all"].as_array().unwrap().len(), 6);
    let fine_node = nodes.iter().find(|n| n["key"] == "fine").unwrap();
    assert_eq!(fine_node["alerts"], json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_score_hovering_at_a_threshold_does_not_flap() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let id = account(pool, "hover", "kim").await;
    let no_drivers = json!([]);
    set_score(pool, id, 80.0, "healthy", &no_drivers).await;
    set_score(pool, id, 69.0, "at_risk", &no_drivers).await;
    let first = alerts::evaluate(pool, &AlertScope::Accounts(vec![id]))
        .await
        .unwrap();
    assert_eq!(first.raised, 2, "{:?}", alerts_of(pool, id).await); // score_drop (11 points) and tier_worsened
                                                                    // Hovering around the thresholds: 71 (drop 9, HEALTHY again) and back to 69.
    for score in [71.0, 69.5, 72.0, 69.0, 71.5] {
        let tier = if score >= 70.0 { "healthy" } else { "at_risk" };
        set_score(pool, id, score, tier, &no_drivers).await;
        let s = alerts::evaluate(pool, &AlertScope::Accounts(vec![id]))
            .await
            .unwrap();
        assert_eq!(
            (s.raised, s.resolved),
            (0, 0),
            "at {score}: {:?}",
            alerts_of(pool, id).await
        );
    }
    // Clear by the margin: 74 is within 6 points of the peak (80 - (10 - 3) = 73) and 3 above 70.
    set_score(pool, id, 74.0, "healthy", &no_drivers).await;
    let cleared = alerts::evaluate(pool, &AlertScope::Accounts(vec![id]))
        .await
        .unwrap();
    assert_eq!(cleared.resolved, 2);
    // A new drop within the cool-down raises nothing...
    set_score(pool, id, 60.0, "at_risk", &no_drivers).await;
    let cooling = alerts::evaluate(pool, &AlertScope::Accounts(vec![id]))
        .await
        .unwrap();
    assert_eq!(cooling.raised, 0);
    // ...and once the cool-down has passed it does.
    exec(
        pool,
        "UPDATE alerts SET resolved_at = now() - interval '25 hours'",
    )
    .await;
    let after = alerts::evaluate(pool, &AlertScope::Accounts(vec![id]))
        .await
        .unwrap();
    assert_eq!(after.raised, 2);
    let lines = alerts_of(pool, id).await;
    assert_eq!(lines.iter().filter(|(_, s)| s == "resolved").count(), 2);
    assert_eq!(lines.iter().filter(|(_, s)| s == "open").count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_follow_config_then_admin_changes() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let id = account(pool, "cfg", "lee").await;
    set_score(pool, id, 80.0, "healthy", &json!([])).await;
    set_score(pool, id, 72.0, "healthy", &json!([])).await;
    // Default threshold 10: an 8-point drop raises nothing.
    assert_eq!(
        alerts::evaluate(pool, &AlertScope::All)
            .await
            .unwrap()
            .raised,
        0
    );

    let config = Config {
        alerts: json!({"cooldown_hours": 48, "rules": {"score_drop": {"points": 5, "severity": "critical"}}}),
        ..Config::default()
    };
    let state = AppState::new(pool.clone(), db.url(), config);
    let schema = healthd::graphql::build_schema(Some(state.clone()));
    let rules = data(
        gql(
            &schema,
            Role::Viewer,
            "{ alertRules { key severity cooldownHours params source } }",
            json!({}),
        )
        .await,
    );
    let drop = rules["alertRules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "score_drop")
        .unwrap()
        .clone();
    assert_eq!(drop["severity"], "CRITICAL");
    assert_eq!(drop["cooldownHours"], 48);
    assert_eq!(drop["params"]["points"], 5.0);
    assert_eq!(drop["source"], "config");
    let evaluated = data(
        gql(
            &schema,
            Role::Admin,
            "mutation { evaluateAlerts { raised } }",
            json!({}),
        )
        .await,
    );
    assert_eq!(evaluated["evaluateAlerts"]["raised"], 1);

    // Admins change rules; editors cannot; bad settings are refused with a clear message.
    let update = "mutation($p: JSON) { updateAlertRule(key: \"no_login\", input: {enabled: false, params: $p}) { key enabled params source } }";
    let denied = gql(&schema, Role::Editor, update, json!({"p": {"days": 30}})).await;
    assert!(denied.errors[0].message.contains("admin"));
    let changed = data(gql(&schema, Role::Admin, update, json!({"p": {"days": 30}})).await);
    assert_eq!(changed["updateAlertRule"]["enabled"], false);
    assert_eq!(changed["updateAlertRule"]["params"]["days"], 30.0);
    assert_eq!(changed["updateAlertRule"]["source"], "database");
    let bad = gql(&schema, Role::Admin, update, json!({"p": {"dayz": 3}})).await;
    assert!(
        bad.errors[0].message.contains("unknown setting `dayz`"),
        "{}",
        bad.errors[0].message
    );
    let unknown = gql(
        &schema,
        Role::Admin,
        "mutation { updateAlertRule(key: \"nope\", input: {enabled: true}) { key } }",
        json!({}),
    )
    .await;
    assert!(unknown.errors[0].message.contains("unknown alert rule"));
    let set = healthd::alerts::rules::load(pool, Some(&state.config.alerts))
        .await
        .unwrap();
    assert!(!set.get("no_login").unwrap().enabled);

    // A bad [alerts] section is refused with a message naming the setting.
    let err = healthd::alerts::rules::install_file_config(
        &json!({"rules": {"score_drop": {"points": "ten"}}}),
    )
    .unwrap_err();
    assert!(err.to_string().contains("points"), "{err}");
}

/// Timing of a full evaluation (not part of the suite):
/// `HEALTHD_ALERT_BENCH_ACCOUNTS=100000 cargo test --release -p healthd --test alerts -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn full_evaluation_timing() {
    let n: i64 = std::env::var("HEALTHD_ALERT_BENCH_ACCOUNTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let db = TestDb::new().await;
    let pool = db.pool();
    exec(pool, &format!(
        "INSERT INTO accounts (key, name, owner, renewal_date) \
           SELECT 'acct-' || g, 'Account ' || g, 'owner-' || (g % 20), current_date + (g % 365)::int FROM generate_series(1, {n}) g; \
         INSERT INTO health_current (account_id, computed_at, score, tier, model_version, history_at) \
           SELECT id, now(), 30 + (id % 70), CASE WHEN 30 + (id % 70) >= 70 THEN 'healthy' WHEN 30 + (id % 70) >= 40 THEN 'at_risk' ELSE 'critical' END, 1, now() \
           FROM accounts; \
         INSERT INTO health_scores (account_id, computed_at, score, tier, model_version, signals) \
           SELECT account_id, computed_at, score, tier, 1, \
                  '[{{\"key\":\"login_recency\",\"impact\":12,\"explanation\":\"No login in 9 days\"}}]' FROM health_current; \
         INSERT INTO health_scores (account_id, computed_at, score, tier, model_version, signals) \
           SELECT id, now() - interval '2 days', 80, 'healthy', 1, '[]' FROM accounts; \
         INSERT INTO usage_daily (account_id, day, user_id, event, events) \
           SELECT a.id, current_date - d, 'u1', 'login', 1 FROM accounts a, generate_series(0, 29, 3) d WHERE a.id % 10 <> 0; \
         INSERT INTO usage_daily (account_id, day, user_id, event, events) \
           SELECT a.id, current_date - 40, 'u1', 'page_view', 3 FROM accounts a WHERE a.id % 10 = 0; \
         INSERT INTO invoices (account_id, source, invoice_id, amount, due_date, status) \
           SELECT id, 'b', 'i' || id, 100, current_date - (id % 60)::int, CASE WHEN id % 7 = 0 THEN 'open' ELSE 'paid' END FROM accounts; \
         INSERT INTO support_tickets (account_id, source, ticket_id, priority, status, opened_at) \
           SELECT id, 's', 't' || id, CASE WHEN id % 9 = 0 THEN 'urgent' ELSE 'normal' END, 'open', now() - (id % 5) * interval '1 day' FROM accounts; \
         ANALYZE"
    ))
    .await;
    let started = std::time::Instant::now();
    let first = alerts::evaluate(pool, &AlertScope::All).await.unwrap();
    let first_time = started.elapsed();
    let started = std::time::Instant::now();
    let again = alerts::evaluate(pool, &AlertScope::All).await.unwrap();
    println!(
        "{n} accounts: first evaluation {:.2} s ({} raised), steady state {:.2} s ({} raised)",
        first_time.as_secs_f64(),
        first.raised,
        started.elapsed().as_secs_f64(),
        again.raised
    );
}
