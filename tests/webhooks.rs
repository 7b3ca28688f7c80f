//! Webhooks against a real PostgreSQL and a real HTTP receiver: the outbox is filled in the same
//! transaction as each alert and score change (filters applied), a receiver that is down for the
//! first attempts gets every alert once it is back, signed, and a restarted worker sends nothing
//! twice once a delivery was acknowledged.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_graphql::{Request, Variables};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use healthd::app::AppState;
use healthd::auth::{Role, Viewer};
use healthd::config::Config;
use healthd::testing::TestDb;
use serde_json::{json, Value};

#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<Received>>>,
    /// Answer 503 to this many more requests.
    failures_left: Arc<Mutex<usize>>,
}

async fn receive(
    State(r): State<Receiver>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    {
        let mut left = r.failures_left.lock().unwrap();
        if *left > 0 {
            *left -= 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    r.received.lock().unwrap().push(Received {
        path: uri.path().to_string(),
        headers,
        body: body.to_vec(),
    });
    StatusCode::NO_CONTENT
}

/// A free port nothing listens on yet.
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn start_receiver(addr: SocketAddr, receiver: Receiver) {
    let app = axum::Router::new()
        .route("/{*path}", axum::routing::post(receive))
        .with_state(receiver);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
}

async fn exec(pool: &healthd::db::DbPool, sql: &str) {
    use diesel_async::SimpleAsyncConnection;
    let mut conn = pool.get().await.unwrap();
    conn.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[derive(diesel::QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count(pool: &healthd::db::DbPool, sql: &str) -> i64 {
    let mut conn = pool.get().await.unwrap();
    let row: N = diesel::sql_query(sql).get_result(&mut conn).await.unwrap();
    row.n
}

async fn admin(schema: &healthd::graphql::HealthdSchema, query: &str, vars: Value) -> Value {
    let viewer = Viewer {
        token_id: 1,
        name: "admin".into(),
        role: Role::Admin,
    };
    let r = schema
        .execute(
            Request::new(query)
                .variables(Variables::from_json(vars))
                .data(viewer),
        )
        .await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    r.data.into_json().unwrap()
}

fn config() -> Config {
    Config {
        alerts: json!({"delivery": {"retry_base_secs": 0.2, "retry_max_secs": 0.5, "poll_ms": 100, "timeout_secs": 2}}),
        ..Config::default()
    }
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_that_was_down_gets_each_alert_once_signed() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let addr = free_port();
    let state = AppState::new(pool.clone(), db.url(), config());
    let schema = healthd::graphql::build_schema(Some(state.clone()));
    let create = "mutation($i: CreateWebhookInput!) { createWebhook(input: $i) { id name url events filter format } }";
    let hook = admin(
        &schema,
        create,
        json!({"i": {"name": "crm", "url": format!("http://{addr}/hooks/crm"),
        "secret": "s3cret-key", "events": ["alert.raised"]}}),
    )
    .await;
    let hook_id = hook["createWebhook"]["id"].as_str().unwrap().to_string();
    assert_eq!(hook["createWebhook"]["events"], json!(["alert.raised"]));
    admin(&schema, create, json!({"i": {"name": "slack", "url": format!("http://{addr}/hooks/slack"),
        "secret": "slack-secret", "events": ["alert.raised"], "format": "SLACK", "filter": {"severities": ["critical"]}}})).await;
    // Bad input is refused with a clear message.
    let viewer = Viewer {
        token_id: 1,
        name: "admin".into(),
        role: Role::Admin,
    };
    let bad = async_graphql::Schema::execute(
        &schema,
        Request::new(create)
            .variables(Variables::from_json(
                json!({"i": {"name": "x", "url": "ftp://nope", "secret": "12345678"}}),
            ))
            .data(viewer),
    )
    .await;
    assert!(
        bad.errors[0].message.contains("http or https"),
        "{:?}",
        bad.errors
    );

    // An account in trouble: two alerts (critical invoice, warning login).
    exec(pool, "INSERT INTO accounts (key, name, owner) VALUES ('acme', 'Acme Inc', 'dana'); \
        INSERT INTO invoices (account_id, source, invoice_id, amount, due_date, status) \
            SELECT id, 'billing', 'INV-1', 1200, current_date - 30, 'open' FROM accounts WHERE key = 'acme'; \
        INSERT INTO usage_daily (account_id, day, user_id, event, events) \
            SELECT id, current_date - 20, 'u', 'login', 1 FROM accounts WHERE key = 'acme'").await;
    let raised = healthd::alerts::evaluate_with(
        pool,
        &healthd::alerts::AlertScope::All,
        Some(&state.config.alerts),
    )
    .await
    .unwrap();
    assert_eq!(raised.raised, 2);
    // Outbox rows were written with the alerts: 2 for crm, 1 (critical only) for slack.
    assert_eq!(
        count(pool, "SELECT count(*)::bigint AS n FROM webhook_deliveries").await,
        3
    );

    // The receiver is down: the worker tries, fails, backs off.
    let worker = tokio::spawn(healthd::webhooks::run_delivery_worker(state.clone()));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let failed_attempts = count(pool, "SELECT count(*)::bigint AS n FROM webhook_delivery_attempts WHERE error LIKE 'cannot connect%'").await;
    assert!(
        failed_attempts >= 3,
        "only {failed_attempts} attempts while down"
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*)::bigint AS n FROM webhook_deliveries WHERE status = 'pending'"
        )
        .await,
        3
    );

    // It comes back, first answering 503 once, then accepting.
    let receiver = Receiver::default();
    *receiver.failures_left.lock().unwrap() = 1;
    start_receiver(addr, receiver.clone()).await;
    let got = receiver.received.clone();
    wait_for("3 deliveries", Duration::from_secs(15), || {
        got.lock().unwrap().len() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A restart of the worker (new process state) sends none of them again.
    state.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .expect("worker stops on shutdown");
    assert_eq!(
        count(
            pool,
            "SELECT count(*)::bigint AS n FROM webhook_deliveries WHERE status = 'delivered'"
        )
        .await,
        3
    );
    let restarted = AppState::new(pool.clone(), db.url(), config());
    let worker = tokio::spawn(healthd::webhooks::run_delivery_worker(restarted.clone()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    restarted.shutdown.cancel();
    let _ = worker.await;

    let received = got.lock().unwrap().clone();
    assert_eq!(
        received.len(),
        3,
        "each delivery exactly once: {:?}",
        received.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    let mut delivery_ids: Vec<String> = received
        .iter()
        .map(|r| {
            r.headers["x-healthd-delivery"]
                .to_str()
                .unwrap()
                .to_string()
        })
        .collect();
    delivery_ids.sort();
    delivery_ids.dedup();
    assert_eq!(delivery_ids.len(), 3);
    let now = chrono::Utc::now().timestamp();
    let crm: Vec<&Received> = received.iter().filter(|r| r.path == "/hooks/crm").collect();
    assert_eq!(crm.len(), 2);
    for r in &crm {
        let signature = r.headers["x-healthd-signature"].to_str().unwrap();
        let timestamp = r.headers["x-healthd-timestamp"].to_str().unwrap();
        assert!(signature.starts_with(&format!("t={timestamp},v1=")));
        assert!(
            healthd::webhooks::verify("s3cret-key", signature, &r.body, now, 300),
            "signature does not verify"
        );
        assert!(!healthd::webhooks::verify(
            "wrong-secret",
            signature,
            &r.body,
            now,
            300
        ));
        assert_eq!(r.headers["x-healthd-event"], "alert.raised");
        assert_eq!(r.headers["content-type"], "application/json");
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["event"], "alert.raised");
        assert_eq!(body["account"]["key"], "acme");
        assert_eq!(body["owner"], "dana");
        assert!(body["message"].is_string());
    }
    let slack = received
        .iter()
        .find(|r| r.path == "/hooks/slack")
        .expect("slack delivery");
    assert!(healthd::webhooks::verify(
        "slack-secret",
        slack.headers["x-healthd-signature"].to_str().unwrap(),
        &slack.body,
        now,
        300
    ));
    let text: Value = serde_json::from_slice(&slack.body).unwrap();
    assert!(
        text["text"].as_str().unwrap().starts_with(
            "[CRITICAL] Acme Inc (acme): 1 invoice past due, oldest 30 days ($1,200.00)"
        ),
        "{text}"
    );

    // The delivery log shows attempts and outcome.
    let log = admin(&schema, "query($id: ID!) { webhookDeliveries(webhookId: $id, first: 10) { event status attempts lastError responseStatus deliveredAt } }",
        json!({"id": hook_id})).await;
    let entries = log["webhookDeliveries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for e in entries {
        assert_eq!(e["status"], "DELIVERED");
        assert!(e["attempts"].as_i64().unwrap() >= 2, "{e}");
        assert_eq!(e["responseStatus"], 204);
        assert!(e["deliveredAt"].is_string());
    }
    let listed = admin(&schema, "{ webhooks { name format } }", json!({})).await;
    assert_eq!(listed["webhooks"].as_array().unwrap().len(), 2);
    let deleted = admin(
        &schema,
        "mutation($id: ID!) { deleteWebhook(id: $id) }",
        json!({"id": hook_id}),
    )
    .await;
    assert_eq!(deleted["deleteWebhook"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn score_changes_fill_the_outbox_of_matching_receivers_only() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let state = AppState::new(pool.clone(), db.url(), config());
    let schema = healthd::graphql::build_schema(Some(state.clone()));
    let create = "mutation($i: CreateWebhookInput!) { createWebhook(input: $i) { id filter } }";
    let big = admin(
        &schema,
        create,
        json!({"i": {"name": "bi-drops", "url": "http://127.0.0.1:9/x", "secret": "12345678",
        "events": ["score.changed"], "filter": {"minDrop": 10, "tiers": ["at_risk", "CRITICAL"]}}}),
    )
    .await;
    assert_eq!(
        big["createWebhook"]["filter"],
        json!({"minDrop": 10.0, "tiers": ["AT_RISK", "CRITICAL"]})
    );
    admin(
        &schema,
        create,
        json!({"i": {"name": "acme-only", "url": "http://127.0.0.1:9/y", "secret": "12345678",
        "events": ["score.changed"], "filter": {"accountKeys": ["acme"]}}}),
    )
    .await;
    admin(
        &schema,
        create,
        json!({"i": {"name": "alerts-only", "url": "http://127.0.0.1:9/z", "secret": "12345678",
        "events": ["alert.raised"]}}),
    )
    .await;
    // acme's change is written as the rescore writes it: drivers left to the history row of the
    // same moment; beta's rows carry stored drivers, as earlier versions wrote them.
    exec(pool, "INSERT INTO accounts (key, name) VALUES ('acme', 'Acme'), ('beta', 'Beta'); \
        INSERT INTO health_scores (account_id, computed_at, score, tier, model_version, signals) \
        SELECT id, now(), 62, 'at_risk', 1, '[{\"key\": \"breadth\", \"value\": 5, \"score\": 1, \"weight\": 10, \"contribution\": 10, \"impact\": 0, \"explanation\": \"5 of 5 seats active\"}, \
            {\"key\": \"billing\", \"value\": 30, \"score\": 0.1, \"weight\": 20, \"contribution\": 2, \"impact\": 18, \"explanation\": \"Invoice 30 days past due ($1,200.00)\"}]' \
        FROM accounts WHERE key = 'acme'; \
        INSERT INTO score_changes (account_id, previous_score, score, previous_tier, tier, drivers) \
        SELECT id, 80, 62, 'healthy', 'at_risk', NULL::jsonb FROM accounts WHERE key = 'acme' \
        UNION ALL SELECT id, 70, 68, 'healthy', 'at_risk', '[]' FROM accounts WHERE key = 'beta' \
        UNION ALL SELECT id, 90, 75, 'healthy', 'healthy', '[]' FROM accounts WHERE key = 'beta'").await;
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        name: String,
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = pool.get().await.unwrap();
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT w.name, count(d.id)::bigint AS n FROM webhooks w LEFT JOIN webhook_deliveries d ON d.webhook_id = w.id GROUP BY w.name ORDER BY w.name",
    )
    .load(&mut conn)
    .await
    .unwrap();
    let counts: Vec<(String, i64)> = rows.into_iter().map(|r| (r.name, r.n)).collect();
    // bi-drops: only acme's 18-point drop into AT_RISK; acme-only: acme's change; alerts-only: none.
    assert_eq!(
        counts,
        vec![
            ("acme-only".into(), 1),
            ("alerts-only".into(), 0),
            ("bi-drops".into(), 1)
        ]
    );
    let payload: Vec<Row> = diesel::sql_query(
        "SELECT payload ->> 'tier' AS name, (payload ->> 'score')::bigint AS n FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id WHERE w.name = 'bi-drops'",
    )
    .load(&mut conn)
    .await
    .unwrap();
    assert_eq!((payload[0].name.as_str(), payload[0].n), ("AT_RISK", 62));
    let drivers: Vec<Row> = diesel::sql_query(
        "SELECT payload -> 'drivers' -> 0 ->> 'explanation' AS name, jsonb_array_length(payload -> 'drivers')::bigint AS n \
         FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id WHERE w.name = 'bi-drops'",
    )
    .load(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        (drivers[0].name.as_str(), drivers[0].n),
        ("Invoice 30 days past due ($1,200.00)", 1),
        "only the entries that cost points"
    );
}
