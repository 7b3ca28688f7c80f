//! DataLoader batching: a page of 50 accounts with every nested field costs the same number of SQL
//! statements as a page of 5. Statements are counted with diesel's instrumentation, which is
//! process-global, so this test has its own binary.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_graphql::Request;
use diesel::connection::{set_default_instrumentation, Instrumentation, InstrumentationEvent};
use healthd::app::AppState;
use healthd::auth::{Role, Viewer};
use healthd::config::Config;
use healthd::graphql::build_schema;
use healthd::testing::TestDb;

static STATEMENTS: AtomicUsize = AtomicUsize::new(0);

fn counting() -> Option<Box<dyn Instrumentation>> {
    Some(Box::new(|event: InstrumentationEvent<'_>| {
        if let InstrumentationEvent::StartQuery { query, .. } = event {
            // Neither the pool's liveness check on checkout (`SELECT $1`) nor the session set-up of
            // a newly opened connection is a statement of ours.
            let sql = query.to_string();
            let ours = !(sql.starts_with("SELECT $1 ") || sql.starts_with("SET "));
            if ours {
                STATEMENTS.fetch_add(1, Ordering::SeqCst);
            }
        }
    }))
}

const QUERY: &str = "query($n: Int) { accounts(first: $n) { totalCount nodes {
    key name mrr
    health { score tier change change7d change30d signals { key } drivers { key impact } }
    healthHistory(days: 30) { score change change7d }
    billing { status overdueAmount invoices(first: 5) { id amount overdue } }
    supportTickets(first: 3) { id status }
    urgent: supportTickets(status: [OPEN, NEW]) { id }
    usageTimeline(days: 14, bucket: WEEK) { start events features { feature count } }
    featureAdoption { feature usersLast30Days }
} } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_50_costs_the_statements_of_a_page_of_5() {
    // Before any connection exists, so every connection of the test pool counts.
    set_default_instrumentation(counting).expect("instrumentation");
    let db = TestDb::new().await;
    {
        use diesel_async::RunQueryDsl;
        let mut conn = db.pool().get().await.unwrap();
        for sql in [
            "INSERT INTO accounts (id, key, name, mrr) \
             SELECT i, 'acct-' || lpad(i::text, 3, '0'), 'Account ' || i, 100 * i FROM generate_series(1, 60) i",
            "INSERT INTO health_scores (account_id, computed_at, score, tier, model_version, signals) \
             SELECT i, now() - make_interval(days => d), 40 + (i + d) % 50, 'at_risk', 1, \
                    '[{\"key\": \"login_recency\", \"impact\": 5, \"weight\": 25, \"contribution\": 20}]' \
             FROM generate_series(1, 60) i, generate_series(0, 40, 5) d",
            "INSERT INTO health_current (account_id, computed_at, score, tier, model_version, history_at, previous_score, score_change) \
             SELECT i, now(), 40 + i % 50, 'at_risk', 1, \
                    (SELECT max(computed_at) FROM health_scores hs WHERE hs.account_id = i), 45, (i % 50) - 5 \
             FROM generate_series(1, 60) i",
            "INSERT INTO subscriptions (account_id, source, subscription_id, status, mrr, current_period_end) \
             SELECT i, 'stripe', 's' || i, 'active', 100, now() + interval '20 days' FROM generate_series(1, 60) i",
            "INSERT INTO invoices (account_id, source, invoice_id, amount, due_date, status) \
             SELECT i, 'stripe', 'in' || i || '-' || m, 99.5, current_date - 30 * m, CASE WHEN m = 1 THEN 'open' ELSE 'paid' END \
             FROM generate_series(1, 60) i, generate_series(0, 6) m",
            "INSERT INTO support_tickets (account_id, source, ticket_id, priority, status, opened_at) \
             SELECT i, 'zd', 't' || i || '-' || n, 'normal', (ARRAY['new','open','solved'])[1 + n % 3], now() - make_interval(days => n) \
             FROM generate_series(1, 60) i, generate_series(1, 5) n",
            "INSERT INTO usage_daily (account_id, day, user_id, event, feature, events) \
             SELECT i, current_date - d, 'u' || (d % 3), 'report_run', 'reports', 2 \
             FROM generate_series(1, 60) i, generate_series(0, 20) d",
        ] {
            diesel::sql_query(sql).execute(&mut conn).await.expect("seed");
        }
    }
    let schema = build_schema(Some(AppState::new(
        db.pool().clone(),
        db.url(),
        Config::default(),
    )));

    // Lists prefetch with one batch per key type, so the count does not depend on timing: every
    // run must give it, for every page size (a few runs each, to catch a split batch).
    let mut counts = Vec::new();
    for n in [5, 50, 5, 50, 5, 50] {
        let request = Request::new(QUERY)
            .variables(async_graphql::Variables::from_json(
                serde_json::json!({ "n": n }),
            ))
            .data(Viewer {
                token_id: 1,
                name: "test".into(),
                role: Role::Viewer,
            });
        let request = healthd::graphql::loaders::attach(request, db.pool());
        STATEMENTS.store(0, Ordering::SeqCst);
        let response = schema.execute(request).await;
        let statements = STATEMENTS.load(Ordering::SeqCst);
        assert!(response.errors.is_empty(), "{:?}", response.errors);
        let data = response.data.into_json().unwrap();
        let nodes = data["accounts"]["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), n);
        assert!(nodes.iter().all(|a| a["health"]["change7d"].is_number()));
        assert!(nodes
            .iter()
            .all(|a| a["healthHistory"][1]["change7d"].is_number()));
        assert!(nodes
            .iter()
            .all(|a| a["billing"]["invoices"].as_array().unwrap().len() == 5));
        counts.push(statements);
    }
    assert!(
        counts.iter().all(|c| *c == counts[0]),
        "statements for pages of 5 and 50 accounts: {counts:?}"
    );
    // page + count + one per key type: health, history, tickets (both argument sets), billing,
    // invoices, timeline, adoption, then the 7/30-day score lookups.
    assert_eq!(counts[0], 10, "statements: {counts:?}");
}
