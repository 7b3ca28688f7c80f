//! The account read API against a real, migrated PostgreSQL: pagination with every order and
//! filter, search, billing math, usage buckets, adoption, health with history and changes, and
//! authentication.

use std::collections::HashSet;

use async_graphql::{Request, Variables};
use chrono::{Datelike, Duration, NaiveDate, Utc};
use healthd::app::AppState;
use healthd::auth::{Role, Viewer};
use healthd::config::Config;
use healthd::graphql::{build_schema, HealthdSchema};
use healthd::testing::TestDb;
use serde_json::{json, Value};

struct Api {
    db: TestDb,
    schema: HealthdSchema,
}

impl Api {
    async fn new() -> Api {
        let db = TestDb::new().await;
        let schema = build_schema(Some(AppState::new(
            db.pool().clone(),
            db.url(),
            Config::default(),
        )));
        Api { db, schema }
    }

    async fn sql(&self, sql: &str) {
        use diesel_async::RunQueryDsl;
        let mut conn = self.db.pool().get().await.expect("connection");
        diesel::sql_query(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("seed failed: {e}\n{sql}"));
    }

    async fn raw(&self, query: &str, vars: Value, viewer: bool) -> async_graphql::Response {
        let mut request = Request::new(query).variables(Variables::from_json(vars));
        if viewer {
            request = request.data(Viewer {
                token_id: 1,
                name: "test".into(),
                role: Role::Viewer,
            });
        }
        let request = healthd::graphql::loaders::attach(request, self.db.pool());
        self.schema.execute(request).await
    }

    /// Runs a query as a viewer and returns `data`, failing on any error.
    async fn query(&self, query: &str, vars: Value) -> Value {
        let response = self.raw(query, vars, true).await;
        assert!(
            response.errors.is_empty(),
            "errors: {:?}\nquery: {query}",
            response.errors
        );
        response.data.into_json().expect("json")
    }

    /// Runs a query as a viewer and returns the error codes.
    async fn error_codes(&self, query: &str, vars: Value) -> Vec<String> {
        let response = self.raw(query, vars.clone(), true).await;
        assert!(
            !response.errors.is_empty(),
            "expected an error for {query} {vars}"
        );
        response.errors.iter().map(code).collect()
    }
}

fn code(e: &async_graphql::ServerError) -> String {
    e.extensions
        .as_ref()
        .and_then(|x| x.get("code"))
        .map(|v| v.to_string().trim_matches('"').to_string())
        .unwrap_or_default()
}

fn today() -> NaiveDate {
    Utc::now().date_naive()
}

fn signals_json(login_impact: f64, missing_billing: bool) -> String {
    json!([
        {"key": "login_recency", "label": "Login recency", "value": 21.0, "score": 0.2, "weight": 25.0,
         "contribution": 25.0 - login_impact, "impact": login_impact, "explanation": "No login in 21 days",
         "missing": false, "source": "usage", "configured_weight": 25.0, "details": {"days": 21}},
        {"key": "usage_trend", "label": "Usage trend", "value": -75.0, "score": 0.1, "weight": 20.0,
         "contribution": 2.0, "impact": 18.0, "explanation": "Usage down 75% vs the previous 30 days",
         "missing": false},
        {"key": "breadth", "label": "Breadth", "value": 9.0, "score": 1.0, "weight": 15.0,
         "contribution": 15.0, "impact": 0.0, "explanation": "9 of 10 seats active", "missing": false},
        {"key": "billing", "label": "Billing", "value": 0.0, "score": 0.0, "weight": 0.0,
         "contribution": 0.0, "impact": 0.0, "explanation": "No billing data received for this account",
         "missing": missing_billing}
    ])
    .to_string()
}

// -------------------------------------------------------------------------------------------------
// Pagination

/// What the list tests know about each seeded account, to compute expected orders independently.
#[derive(Debug, Clone)]
struct Seeded {
    id: i64,
    key: String,
    name: String,
    domain: Option<String>,
    owner: Option<String>,
    renewal: Option<NaiveDate>,
    score: Option<f64>,
    change: Option<f64>,
    tier: Option<&'static str>,
}

async fn seed_list(api: &Api) -> Vec<Seeded> {
    let t = today();
    let mut all = Vec::new();
    let mut values = Vec::new();
    let mut health = Vec::new();
    for i in 1..=23i64 {
        let key = format!("acct-{i:02}");
        // Names collide case-insensitively (ties broken by id) and do not follow key order.
        let name = format!(
            "{} {:02}",
            if i % 2 == 0 { "alpha" } else { "Alpha" },
            (i * 7) % 20
        );
        let domain = (i % 3 != 0).then(|| format!("d{i}.example.com"));
        let owner = Some(if i % 3 == 0 { "alice" } else { "bob" }.to_string());
        let renewal = (i % 4 != 0).then(|| t + Duration::days((i * 3) % 40));
        let scored = i % 5 != 0;
        let score = scored.then(|| [10.0, 35.0, 60.0, 85.0][(i % 4) as usize]);
        let tier = score.map(|s| {
            if s >= 70.0 {
                "healthy"
            } else if s >= 40.0 {
                "at_risk"
            } else {
                "critical"
            }
        });
        let change = scored.then(|| ((i % 3) - 1) as f64 * 5.0);
        values.push(format!(
            "({i}, '{key}', '{name}', {}, {}, {}, 'pro', 10, 100.00)",
            domain
                .as_ref()
                .map(|d| format!("'{d}'"))
                .unwrap_or("NULL".into()),
            owner
                .as_ref()
                .map(|o| format!("'{o}'"))
                .unwrap_or("NULL".into()),
            renewal.map(|d| format!("'{d}'")).unwrap_or("NULL".into()),
        ));
        if let (Some(s), Some(tier), Some(c)) = (score, tier, change) {
            health.push(format!(
                "({i}, now(), {s}, '{tier}', false, 1, NULL, {}, {c})",
                s - c
            ));
        }
        all.push(Seeded {
            id: i,
            key,
            name,
            domain,
            owner,
            renewal,
            score,
            change,
            tier,
        });
    }
    api.sql(&format!(
        "INSERT INTO accounts (id, key, name, domain, owner, renewal_date, plan, seats, mrr) VALUES {}",
        values.join(", ")
    ))
    .await;
    api.sql(&format!(
        "INSERT INTO health_current (account_id, computed_at, score, tier, stale, model_version, history_at, \
         previous_score, score_change) VALUES {}",
        health.join(", ")
    ))
    .await;
    all
}

fn expected(all: &[Seeded], order: &str, filter: &Value) -> Vec<String> {
    let t = today();
    let mut rows: Vec<&Seeded> = all
        .iter()
        .filter(|a| {
            if let Some(tiers) = filter.get("tiers").and_then(|v| v.as_array()) {
                let tiers: Vec<String> = tiers
                    .iter()
                    .map(|v| v.as_str().unwrap().to_lowercase())
                    .collect();
                if !tiers.is_empty() && !a.tier.is_some_and(|x| tiers.iter().any(|t| t == x)) {
                    return false;
                }
            }
            if let Some(owner) = filter.get("owner").and_then(|v| v.as_str()) {
                if a.owner.as_deref() != Some(owner) {
                    return false;
                }
            }
            if let Some(s) = filter.get("search").and_then(|v| v.as_str()) {
                let s = s.to_lowercase();
                let hit = a.name.to_lowercase().contains(&s)
                    || a.key.to_lowercase().contains(&s)
                    || a.domain
                        .as_ref()
                        .is_some_and(|d| d.to_lowercase().contains(&s));
                if !hit {
                    return false;
                }
            }
            if let Some(days) = filter.get("renewalWithinDays").and_then(|v| v.as_i64()) {
                if !a
                    .renewal
                    .is_some_and(|r| r >= t && r <= t + Duration::days(days))
                {
                    return false;
                }
            }
            true
        })
        .collect();
    // Rows with the sort value first (by value, then id), then the rest by key.
    let f = |x: Option<f64>| x.unwrap_or(f64::NAN);
    rows.sort_by(|a, b| match order {
        "SCORE_ASC" => a
            .score
            .is_none()
            .cmp(&b.score.is_none())
            .then(f(a.score).total_cmp(&f(b.score)))
            .then(if a.score.is_some() {
                a.id.cmp(&b.id)
            } else {
                a.key.cmp(&b.key)
            }),
        "SCORE_DESC" => a
            .score
            .is_none()
            .cmp(&b.score.is_none())
            .then(f(b.score).total_cmp(&f(a.score)))
            .then(if a.score.is_some() {
                b.id.cmp(&a.id)
            } else {
                a.key.cmp(&b.key)
            }),
        "SCORE_CHANGE" => a
            .change
            .is_none()
            .cmp(&b.change.is_none())
            .then(f(a.change).total_cmp(&f(b.change)))
            .then(if a.change.is_some() {
                a.id.cmp(&b.id)
            } else {
                a.key.cmp(&b.key)
            }),
        "NAME" => a
            .name
            .to_lowercase()
            .cmp(&b.name.to_lowercase())
            .then(a.id.cmp(&b.id)),
        "RENEWAL_DATE" => a
            .renewal
            .is_none()
            .cmp(&b.renewal.is_none())
            .then(a.renewal.cmp(&b.renewal))
            .then(if a.renewal.is_some() {
                a.id.cmp(&b.id)
            } else {
                a.key.cmp(&b.key)
            }),
        _ => unreachable!(),
    });
    rows.into_iter().map(|a| a.key.clone()).collect()
}

const PAGE_QUERY: &str =
    "query($first: Int, $after: String, $filter: AccountFilter, $order: AccountOrder) {
  accounts(first: $first, after: $after, filter: $filter, orderBy: $order) {
    totalCount
    edges { cursor node { key } }
    nodes { key }
    pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
  }
}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_walk_every_order_and_filter_without_gaps_or_duplicates() {
    let api = Api::new().await;
    let all = seed_list(&api).await;
    let filters = [
        json!({}),
        json!({"tiers": ["CRITICAL", "AT_RISK"]}),
        json!({"tiers": []}),
        json!({"owner": "alice"}),
        json!({"search": "ACCT-1"}),
        json!({"renewalWithinDays": 20}),
        json!({"owner": "bob", "search": "alpha 1"}),
    ];
    for order in [
        "SCORE_ASC",
        "SCORE_DESC",
        "SCORE_CHANGE",
        "NAME",
        "RENEWAL_DATE",
    ] {
        for filter in &filters {
            let want = expected(&all, order, filter);
            let mut got = Vec::new();
            let mut after: Option<String> = None;
            let mut pages = 0;
            loop {
                let data = api
                    .query(
                        PAGE_QUERY,
                        json!({"first": 4, "after": after, "filter": filter, "order": order}),
                    )
                    .await;
                let conn = &data["accounts"];
                assert_eq!(conn["totalCount"], json!(want.len()), "{order} {filter}");
                let keys: Vec<String> = conn["edges"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["node"]["key"].as_str().unwrap().to_string())
                    .collect();
                let nodes: Vec<String> = conn["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| n["key"].as_str().unwrap().to_string())
                    .collect();
                assert_eq!(keys, nodes);
                let info = &conn["pageInfo"];
                assert_eq!(info["hasPreviousPage"], json!(after.is_some()));
                let edges = conn["edges"].as_array().unwrap();
                if let Some(last) = edges.last() {
                    assert_eq!(info["endCursor"], last["cursor"]);
                    assert_eq!(info["startCursor"], edges[0]["cursor"]);
                } else {
                    assert!(info["endCursor"].is_null());
                }
                got.extend(keys);
                pages += 1;
                assert!(pages < 20, "runaway pagination for {order} {filter}");
                if info["hasNextPage"] == json!(true) {
                    assert_eq!(edges.len(), 4);
                    after = info["endCursor"].as_str().map(String::from);
                } else {
                    break;
                }
            }
            assert_eq!(got, want, "order {order}, filter {filter}");
            let unique: HashSet<&String> = got.iter().collect();
            assert_eq!(unique.len(), got.len());
        }
    }

    // Cursors are opaque but checked.
    let data = api
        .query(PAGE_QUERY, json!({"first": 2, "order": "NAME"}))
        .await;
    let cursor = data["accounts"]["pageInfo"]["endCursor"]
        .as_str()
        .unwrap()
        .to_string();
    for vars in [
        json!({"after": "not-a-cursor"}),
        json!({"after": cursor, "order": "SCORE_ASC"}),
        json!({"first": -1}),
        json!({"first": 501}),
        json!({"filter": {"renewalWithinDays": -3}}),
    ] {
        assert_eq!(api.error_codes(PAGE_QUERY, vars).await, ["BAD_USER_INPUT"]);
    }

    // The default order is SCORE_ASC, the default page 20; totalCount alone needs no page.
    let data = api.query("{ accounts { nodes { key } } }", json!({})).await;
    let keys: Vec<&str> = data["accounts"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, expected(&all, "SCORE_ASC", &json!({}))[..20].to_vec());
    let data = api
        .query("{ accounts(first: 5) { totalCount } }", json!({}))
        .await;
    assert_eq!(data["accounts"]["totalCount"], json!(23));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_matches_name_key_or_domain_case_insensitively() {
    let api = Api::new().await;
    api.sql(
        "INSERT INTO accounts (key, name, domain) VALUES \
         ('globex', 'Globex Corporation', 'globex.example'), \
         ('initech', 'Initrode', 'initech.example'), \
         ('hooli-x', 'Hooli XYZ', 'HOOLI.com'), \
         ('pct', '100% Fun', NULL), \
         ('under', 'Under_score', NULL)",
    )
    .await;
    let search = |s: &'static str| {
        let api = &api;
        async move {
            let data = api
                .query(
                    "query($s: String) { accounts(filter: {search: $s}, orderBy: NAME) { totalCount nodes { key } } }",
                    json!({ "s": s }),
                )
                .await;
            let keys: Vec<String> = data["accounts"]["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["key"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(data["accounts"]["totalCount"], json!(keys.len()));
            keys
        }
    };
    assert_eq!(search("gLoBeX CORP").await, ["globex"]);
    assert_eq!(search("INITECH").await, ["initech"]);
    assert_eq!(search("hooli.COM").await, ["hooli-x"]);
    assert_eq!(search("init").await, ["initech"]); // name Initrode and key initech: one account
    assert_eq!(search("%").await, ["pct"]); // wildcards are literal
    assert_eq!(search("_").await, ["under"]);
    assert_eq!(search("  ").await.len(), 5); // blank search does not filter
    assert!(search("nothing-like-this").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_window_and_tiers_filter() {
    let api = Api::new().await;
    api.sql(&format!(
        "INSERT INTO accounts (id, key, name, renewal_date) VALUES \
         (1, 'past', 'Past', '{}'), (2, 'today', 'Today', '{}'), (3, 'soon', 'Soon', '{}'), \
         (4, 'edge', 'Edge', '{}'), (5, 'later', 'Later', '{}'), (6, 'never', 'Never', NULL)",
        today() - Duration::days(1),
        today(),
        today() + Duration::days(10),
        today() + Duration::days(30),
        today() + Duration::days(31),
    ))
    .await;
    api.sql(
        "INSERT INTO health_current (account_id, computed_at, score, tier, model_version) VALUES \
         (2, now(), 80, 'healthy', 1), (3, now(), 30, 'critical', 1), (4, now(), 50, 'at_risk', 1)",
    )
    .await;
    let keys = |data: &Value| -> Vec<String> {
        data["accounts"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["key"].as_str().unwrap().to_string())
            .collect()
    };
    let q = "query($f: AccountFilter, $o: AccountOrder) { accounts(filter: $f, orderBy: $o) { totalCount nodes { key } } }";
    let data = api
        .query(
            q,
            json!({"f": {"renewalWithinDays": 30}, "o": "RENEWAL_DATE"}),
        )
        .await;
    assert_eq!(keys(&data), ["today", "soon", "edge"]);
    let data = api.query(q, json!({"f": {"renewalWithinDays": 0}})).await;
    assert_eq!(keys(&data), ["today"]);
    let data = api
        .query(q, json!({"f": {"tiers": ["CRITICAL", "AT_RISK"]}}))
        .await;
    assert_eq!(keys(&data), ["soon", "edge"]);
    assert_eq!(data["accounts"]["totalCount"], json!(2));
    let data = api
        .query(q, json!({"f": {"tiers": ["HEALTHY"]}, "o": "NAME"}))
        .await;
    assert_eq!(keys(&data), ["today"]);
    // Worst first, never scored last by key.
    let data = api.query(q, json!({})).await;
    assert_eq!(
        keys(&data),
        ["soon", "edge", "today", "later", "never", "past"]
    );
}

// -------------------------------------------------------------------------------------------------
// Account details

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_summarises_subscriptions_and_overdue_invoices() {
    let api = Api::new().await;
    let t = today();
    api.sql(
        "INSERT INTO accounts (id, key, name, mrr) VALUES (1, 'owing', 'Owing', 1200.5), (2, 'none', 'None', NULL), \
         (3, 'gone', 'Gone', 0)",
    )
    .await;
    api.sql(
        "INSERT INTO subscriptions (account_id, source, subscription_id, status, mrr, current_period_end, cancel_at_period_end) VALUES \
         (1, 'stripe', 'old', 'canceled', 300.00, now() + interval '300 days', false), \
         (1, 'stripe', 'main', 'past_due', 1000.00, now() + interval '20 days', true), \
         (1, 'stripe', 'addon', 'active', 200.50, now() + interval '10 days', false), \
         (3, 'stripe', 'x', 'canceled', 99.00, now() - interval '5 days', false)",
    )
    .await;
    api.sql(&format!(
        "INSERT INTO invoices (account_id, source, invoice_id, amount, due_date, paid_at, status) VALUES \
         (1, 'stripe', 'in-1', 100.00, '{d10}', NULL, 'open'), \
         (1, 'stripe', 'in-2', 50.50, '{d40}', NULL, 'uncollectible'), \
         (1, 'stripe', 'in-3', 70.00, '{d50}', now(), 'paid'), \
         (1, 'stripe', 'in-4', 80.00, '{future}', NULL, 'open'), \
         (1, 'stripe', 'in-5', 90.00, '{d5}', now(), 'open'), \
         (1, 'stripe', 'in-6', 60.00, '{d60}', NULL, 'void'), \
         (1, 'stripe', 'in-7', 10.00, '{today}', NULL, 'open')",
        d10 = t - Duration::days(10),
        d40 = t - Duration::days(40),
        d50 = t - Duration::days(50),
        d5 = t - Duration::days(5),
        d60 = t - Duration::days(60),
        future = t + Duration::days(7),
        today = t,
    ))
    .await;
    let q = "query($k: String!) { account(key: $k) { mrr billing {
        status mrr currentPeriodEnd cancelAtPeriodEnd overdueAmount overdueInvoiceCount daysOldestOverdue
        invoices(first: 4) { id amount status overdue daysOverdue dueDate } } } }";
    let data = api.query(q, json!({"k": "owing"})).await;
    let account = &data["account"];
    assert_eq!(account["mrr"], json!("1200.50"));
    let b = &account["billing"];
    assert_eq!(
        b["status"],
        json!("PAST_DUE"),
        "a live subscription before a canceled one, latest period end"
    );
    assert_eq!(b["cancelAtPeriodEnd"], json!(true));
    assert_eq!(b["mrr"], json!("1200.50"), "live subscriptions only");
    assert_eq!(b["overdueAmount"], json!("150.50"));
    assert_eq!(b["overdueInvoiceCount"], json!(2));
    assert_eq!(b["daysOldestOverdue"], json!(40));
    let invoices = b["invoices"].as_array().unwrap();
    let ids: Vec<&str> = invoices.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["in-4", "in-7", "in-5", "in-1"],
        "latest due date first"
    );
    assert_eq!(invoices[3]["overdue"], json!(true));
    assert_eq!(invoices[3]["daysOverdue"], json!(10));
    assert_eq!(invoices[3]["amount"], json!("100.00"));
    assert_eq!(
        invoices[1]["overdue"],
        json!(false),
        "due today is not overdue yet"
    );
    assert_eq!(invoices[2]["overdue"], json!(false), "paid");

    let data = api.query(q, json!({"k": "none"})).await;
    assert!(data["account"]["billing"].is_null());
    assert!(data["account"]["mrr"].is_null());
    let data = api.query(q, json!({"k": "gone"})).await;
    let b = &data["account"]["billing"];
    assert_eq!(b["status"], json!("CANCELED"));
    assert_eq!(b["mrr"], json!("0.00"));
    assert_eq!(b["overdueAmount"], json!("0.00"));
    assert_eq!(b["overdueInvoiceCount"], json!(0));
    assert!(b["daysOldestOverdue"].is_null());
    assert_eq!(b["invoices"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_timeline_fills_days_and_monday_weeks_from_the_rollup() {
    let api = Api::new().await;
    let t = today();
    let d = |n: i64| t - Duration::days(n);
    api.sql("INSERT INTO accounts (id, key, name) VALUES (1, 'busy', 'Busy'), (2, 'idle', 'Idle')")
        .await;
    api.sql(&format!(
        "INSERT INTO usage_daily (account_id, day, user_id, event, feature, events) VALUES \
         (1, '{d0}', 'u1', 'login', '', 2), \
         (1, '{d0}', 'u2', 'page_view', '', 5), \
         (1, '{d0}', '', 'report_run', 'reports', 3), \
         (1, '{d0}', 'u1', 'export', 'exports', 4), \
         (1, '{d1}', 'u1', 'page_view', '', 1), \
         (1, '{d8}', 'u3', 'report_run', 'reports', 6), \
         (1, '{d20}', 'u1', 'login', '', 1), \
         (1, '{d40}', 'u9', 'report_run', 'reports', 1), \
         (1, '{d400}', 'u9', 'export', 'exports', 1)",
        d0 = d(0),
        d1 = d(1),
        d8 = d(8),
        d20 = d(20),
        d40 = d(40),
        d400 = d(400),
    ))
    .await;
    let q = "query($k: String!, $days: Int, $b: UsageBucketSize) { account(key: $k) {
        usageTimeline(days: $days, bucket: $b) { start activeUsers logins pageViews events features { feature count } } } }";

    let data = api.query(q, json!({"k": "busy", "days": 3})).await;
    let buckets = data["account"]["usageTimeline"].as_array().unwrap().clone();
    assert_eq!(buckets.len(), 3);
    assert_eq!(
        buckets[0],
        json!({"start": d(2).to_string(), "activeUsers": 0, "logins": 0, "pageViews": 0, "events": 0, "features": []})
    );
    assert_eq!(buckets[1]["start"], json!(d(1).to_string()));
    assert_eq!(buckets[1]["pageViews"], json!(1));
    assert_eq!(buckets[1]["activeUsers"], json!(1));
    assert_eq!(
        buckets[2],
        json!({"start": t.to_string(), "activeUsers": 2, "logins": 2, "pageViews": 5, "events": 14,
               "features": [{"feature": "exports", "count": 4}, {"feature": "reports", "count": 3}]})
    );

    // Weeks start on Monday and cover the window; every week is present.
    let data = api
        .query(q, json!({"k": "busy", "days": 21, "b": "WEEK"}))
        .await;
    let buckets = data["account"]["usageTimeline"].as_array().unwrap().clone();
    let first_day = d(20);
    let first_monday =
        first_day - Duration::days(first_day.weekday().num_days_from_monday() as i64);
    let this_monday = t - Duration::days(t.weekday().num_days_from_monday() as i64);
    let weeks = (this_monday - first_monday).num_days() / 7 + 1;
    assert_eq!(buckets.len() as i64, weeks);
    for (i, b) in buckets.iter().enumerate() {
        let start = NaiveDate::parse_from_str(b["start"].as_str().unwrap(), "%Y-%m-%d").unwrap();
        assert_eq!(start.weekday(), chrono::Weekday::Mon);
        assert_eq!(start, first_monday + Duration::days(7 * i as i64));
    }
    let total: i64 = buckets.iter().map(|b| b["events"].as_i64().unwrap()).sum();
    // Monday-aligned weeks may reach back before d(20) but never to d(40).
    assert_eq!(total, 14 + 1 + 6 + 1);
    let week_of = |day: NaiveDate| {
        let m = day - Duration::days(day.weekday().num_days_from_monday() as i64);
        buckets
            .iter()
            .find(|b| b["start"] == json!(m.to_string()))
            .unwrap()
            .clone()
    };
    let this_week = week_of(t);
    if d(1) >= this_monday {
        assert_eq!(this_week["events"], json!(15));
        assert_eq!(this_week["activeUsers"], json!(2));
    } else {
        assert_eq!(this_week["events"], json!(14));
    }
    assert_eq!(
        week_of(d(8))["features"][0],
        json!({"feature": "reports", "count": 6})
    );

    let data = api
        .query(q, json!({"k": "idle", "days": 10, "b": "DAY"}))
        .await;
    let buckets = data["account"]["usageTimeline"].as_array().unwrap();
    assert_eq!(buckets.len(), 10);
    assert!(buckets.iter().all(|b| b["events"] == json!(0)));

    assert_eq!(
        api.error_codes(q, json!({"k": "busy", "days": 0})).await,
        ["BAD_USER_INPUT"]
    );

    // Adoption: per feature, first and last use, users in the last 30 days.
    let data = api
        .query(
            "{ account(key: \"busy\") { featureAdoption { feature firstUsed lastUsed usersLast30Days } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        data["account"]["featureAdoption"],
        json!([
            {"feature": "exports", "firstUsed": d(400).to_string(), "lastUsed": t.to_string(), "usersLast30Days": 1},
            {"feature": "reports", "firstUsed": d(40).to_string(), "lastUsed": t.to_string(), "usersLast30Days": 1},
        ])
    );
    let data = api
        .query(
            "{ account(key: \"idle\") { featureAdoption { feature } } }",
            json!({}),
        )
        .await;
    assert_eq!(data["account"]["featureAdoption"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_history_signals_drivers_and_changes() {
    let api = Api::new().await;
    api.sql(
        "INSERT INTO accounts (id, key, name) VALUES (1, 'scored', 'Scored'), (2, 'new', 'New')",
    )
    .await;
    let signals = signals_json(20.0, true);
    api.sql(&format!(
        "INSERT INTO health_scores (account_id, computed_at, score, tier, stale, model_version, signals) VALUES \
         (1, now() - interval '40 days', 90, 'healthy', false, 1, '{s}'), \
         (1, now() - interval '10 days', 70, 'healthy', false, 1, '{s}'), \
         (1, now() - interval '2 days', 55.5, 'at_risk', false, 2, '{s}'), \
         (1, now(), 42.3, 'at_risk', true, 2, '{s}')",
        s = signals
    ))
    .await;
    // The current score names the history row that holds its breakdown.
    api.sql(
        "INSERT INTO health_current (account_id, computed_at, score, tier, stale, model_version, history_at, previous_score, score_change) \
         SELECT 1, computed_at, 42.3, 'at_risk', true, 2, computed_at, 55.5, -13.2 \
         FROM health_scores WHERE account_id = 1 ORDER BY computed_at DESC LIMIT 1",
    )
    .await;
    let q = "query($k: String!) { account(key: $k) {
        health { score tier stale modelVersion change change7d change30d
                 signals { key label value score weight contribution impact explanation missing }
                 drivers { key impact } }
        healthHistory(days: 30) { score tier computedAt change change7d }
        all: healthHistory(days: 90) { score }
    } }";
    let data = api.query(q, json!({"k": "scored"})).await;
    let h = &data["account"]["health"];
    assert_eq!(h["score"], json!(42.3));
    assert_eq!(h["tier"], json!("AT_RISK"));
    assert_eq!(h["stale"], json!(true));
    assert_eq!(h["modelVersion"], json!(2));
    assert_eq!(h["change"], json!(-13.2));
    assert_eq!(
        h["change7d"],
        json!(-27.7),
        "vs 70 ten days ago (latest at or before now-7d)"
    );
    assert_eq!(h["change30d"], json!(-47.7), "vs 90 forty days ago");
    let signals = h["signals"].as_array().unwrap();
    assert_eq!(signals.len(), 4);
    assert_eq!(
        signals[0],
        json!({"key": "login_recency", "label": "Login recency", "value": 21.0, "score": 0.2, "weight": 25.0,
               "contribution": 5.0, "impact": 20.0, "explanation": "No login in 21 days", "missing": false})
    );
    assert_eq!(signals[3]["missing"], json!(true));
    assert!(signals[3]["value"].is_null() && signals[3]["score"].is_null());
    assert_eq!(
        h["drivers"],
        json!([{"key": "login_recency", "impact": 20.0}, {"key": "usage_trend", "impact": 18.0}])
    );

    let history = data["account"]["healthHistory"].as_array().unwrap();
    let scores: Vec<f64> = history
        .iter()
        .map(|r| r["score"].as_f64().unwrap())
        .collect();
    assert_eq!(scores, [70.0, 55.5, 42.3], "oldest first, last 30 days");
    assert_eq!(
        history[0]["change"],
        json!(-20.0),
        "the row before the window counts"
    );
    assert_eq!(history[1]["change"], json!(-14.5));
    assert_eq!(
        history[0]["change7d"],
        json!(-20.0),
        "10 days ago vs the row at or before 17 days ago"
    );
    assert_eq!(
        history[1]["change7d"],
        json!(-14.5),
        "2 days ago vs the row at or before 9 days ago"
    );
    assert_eq!(data["account"]["all"].as_array().unwrap().len(), 4);

    let data = api.query(q, json!({"k": "new"})).await;
    assert!(data["account"]["health"].is_null());
    assert_eq!(data["account"]["healthHistory"], json!([]));
    let data = api.query(q, json!({"k": "missing"})).await;
    assert!(data["account"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn support_tickets_newest_first_with_status_filter() {
    let api = Api::new().await;
    api.sql("INSERT INTO accounts (id, key, name) VALUES (1, 'help', 'Help')")
        .await;
    api.sql(
        "INSERT INTO support_tickets (account_id, source, ticket_id, subject, priority, status, opened_at, closed_at, csat) VALUES \
         (1, 'zendesk', 't1', 'Old', 'low', 'closed', now() - interval '30 days', now() - interval '29 days', 5), \
         (1, 'zendesk', 't2', 'Broken', 'urgent', 'open', now() - interval '3 days', NULL, NULL), \
         (1, 'zendesk', 't3', 'Question', 'normal', 'pending', now() - interval '1 day', NULL, NULL), \
         (1, 'zendesk', 't4', NULL, 'high', 'new', now() - interval '2 hours', NULL, NULL)",
    )
    .await;
    let q = "query($first: Int, $status: [TicketStatus!]) { account(key: \"help\") {
        supportTickets(first: $first, status: $status) { id source subject priority status openedAt closedAt csat } } }";
    let ids = |data: &Value| -> Vec<String> {
        data["account"]["supportTickets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect()
    };
    let data = api.query(q, json!({})).await;
    assert_eq!(ids(&data), ["t4", "t3", "t2", "t1"]);
    let t1 = &data["account"]["supportTickets"][3];
    assert_eq!(t1["priority"], json!("LOW"));
    assert_eq!(t1["status"], json!("CLOSED"));
    assert_eq!(t1["csat"], json!(5));
    assert!(t1["closedAt"].is_string());
    let data = api.query(q, json!({"first": 2})).await;
    assert_eq!(ids(&data), ["t4", "t3"]);
    let data = api.query(q, json!({"status": ["OPEN", "CLOSED"]})).await;
    assert_eq!(ids(&data), ["t2", "t1"]);
    let data = api.query(q, json!({"status": []})).await;
    assert_eq!(ids(&data).len(), 4);
    assert_eq!(
        api.error_codes(q, json!({"first": -2})).await,
        ["BAD_USER_INPUT"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_requests_are_refused() {
    let api = Api::new().await;
    api.sql("INSERT INTO accounts (key, name) VALUES ('a', 'A')")
        .await;
    for q in [
        "{ accounts(first: 5) { totalCount } }",
        "{ account(key: \"a\") { key } }",
    ] {
        let response = api.raw(q, json!({}), false).await;
        assert_eq!(response.errors.len(), 1, "{q}");
        assert_eq!(code(&response.errors[0]), "UNAUTHENTICATED");
        assert!(!response.errors[0].message.to_lowercase().contains("select"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complexity_limit_bounds_big_queries() {
    let api = Api::new().await;
    // 500 accounts with every list field is far over the default limit; 50 is well under it.
    let heavy = |n: usize| {
        format!(
            "{{ accounts(first: {n}) {{ nodes {{ key health {{ score signals {{ key impact }} drivers {{ key }} }}
                healthHistory {{ score }} supportTickets {{ id status }} billing {{ status invoices {{ id amount }} }}
                usageTimeline {{ start events features {{ feature count }} }} featureAdoption {{ feature }} }} }} }}"
        )
    };
    let response = api.raw(&heavy(500), json!({}), true).await;
    assert!(
        response
            .errors
            .iter()
            .any(|e| e.message.to_lowercase().contains("complex")),
        "{:?}",
        response.errors
    );
    let response = api.raw(&heavy(50), json!({}), true).await;
    assert!(response.errors.is_empty(), "{:?}", response.errors);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_record_their_last_use_to_the_minute() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let (token, secret) = healthd::auth::create_token(pool, "dashboard", Role::Viewer)
        .await
        .unwrap();
    assert!(token.last_used_at.is_none());
    let viewer = healthd::auth::authenticate(pool, &secret).await.unwrap();
    assert_eq!(viewer.map(|v| v.token_id), Some(token.id));
    let used = |tokens: Vec<healthd::auth::ApiToken>| {
        tokens
            .into_iter()
            .find(|t| t.id == token.id)
            .unwrap()
            .last_used_at
    };
    let first = used(healthd::auth::tokens::list_tokens(pool).await.unwrap())
        .expect("the first use is recorded");
    assert!((Utc::now() - first).num_seconds().abs() < 60);
    // Within the minute another request does not write again.
    healthd::auth::authenticate(pool, &secret).await.unwrap();
    assert_eq!(
        used(healthd::auth::tokens::list_tokens(pool).await.unwrap()),
        Some(first)
    );
    // An unknown token records nothing and authenticates no one.
    assert!(healthd::auth::authenticate(pool, "hd_nope")
        .await
        .unwrap()
        .is_none());
}
