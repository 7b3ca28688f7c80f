//! Subscriptions end to end: the real `healthd` binary (two processes on one database), real
//! WebSocket clients speaking graphql-transport-ws and the legacy graphql-ws protocol, replay with
//! `after`, and a small run of the subscription benchmark.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use futures_util::{SinkExt, StreamExt};
use healthd::testing::TestDb;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(15);

#[path = "support/process.rs"]
mod process;

fn healthd(db_url: &str) -> Command {
    let mut cmd = process::healthd();
    cmd.env("HEALTHD_DATABASE_URL", db_url)
        .env("HEALTHD_BACKGROUND_JOBS", "false");
    cmd
}

fn token(db_url: &str, role: &str) -> String {
    process::create_token(healthd(db_url), role, &format!("{role}-sub-test"))
}

struct Server {
    child: Child,
    /// `http://127.0.0.1:port`
    base: String,
}

impl Server {
    fn start(db_url: &str) -> Server {
        let (child, base) = process::spawn_serve(healthd(db_url), Duration::from_secs(60));
        Server { child, base }
    }

    fn ws(&self, path: &str) -> String {
        format!("{}{path}", self.base.replacen("http://", "ws://", 1))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    /// graphql-transport-ws (the `graphql-ws` npm library).
    TransportWs,
    /// The legacy `graphql-ws` subprotocol of subscriptions-transport-ws.
    LegacyWs,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Client {
    socket: Socket,
    protocol: Protocol,
}

impl Client {
    /// Connects and sends `connection_init` with the token; returns the server's answer type.
    async fn connect(url: &str, protocol: Protocol, token: Option<&str>) -> (Client, String) {
        let mut request = url.into_client_request().unwrap();
        let name = match protocol {
            Protocol::TransportWs => "graphql-transport-ws",
            Protocol::LegacyWs => "graphql-ws",
        };
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", name.parse().unwrap());
        let (socket, response) = tokio_tungstenite::connect_async(request)
            .await
            .expect("websocket connect");
        assert_eq!(
            response.headers().get("sec-websocket-protocol").unwrap(),
            name
        );
        let mut client = Client { socket, protocol };
        let payload = match token {
            Some(t) => json!({"authorization": format!("Bearer {t}")}),
            None => json!({}),
        };
        client
            .send(json!({"type": "connection_init", "payload": payload}))
            .await;
        let answer = loop {
            match client.next_json().await {
                Some(v) if v["type"] == "ka" || v["type"] == "ping" => continue,
                Some(v) => break v["type"].as_str().unwrap_or_default().to_string(),
                None => break "closed".to_string(),
            }
        };
        (client, answer)
    }

    async fn send(&mut self, value: Value) {
        self.socket
            .send(Message::text(value.to_string()))
            .await
            .unwrap();
    }

    async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        let kind = match self.protocol {
            Protocol::TransportWs => "subscribe",
            Protocol::LegacyWs => "start",
        };
        self.send(
            json!({"id": id, "type": kind, "payload": {"query": query, "variables": variables}}),
        )
        .await;
    }

    async fn next_json(&mut self) -> Option<Value> {
        loop {
            let message = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .ok()??
                .ok()?;
            match message {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(&text).unwrap();
                    if value["type"] == "ping" {
                        self.send(json!({"type": "pong"})).await;
                        continue;
                    }
                    return Some(value);
                }
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// The next event's `data` (skipping keep-alives); panics on errors or a timeout.
    async fn next_event(&mut self) -> Value {
        loop {
            let v = self.next_json().await.expect("no event in time");
            match v["type"].as_str() {
                Some("next") | Some("data") => {
                    assert!(v["payload"]["errors"].is_null(), "subscription error: {v}");
                    return v["payload"]["data"].clone();
                }
                Some("ka") => continue,
                _ => panic!("unexpected message: {v}"),
            }
        }
    }

    /// True when nothing arrives within `quiet`.
    async fn silent_for(&mut self, quiet: Duration) -> bool {
        match tokio::time::timeout(quiet, self.socket.next()).await {
            Err(_) => true,
            Ok(Some(Ok(Message::Text(text)))) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["type"] == "ka" {
                    return true;
                }
                eprintln!("unexpected message: {v}");
                false
            }
            Ok(_) => false,
        }
    }
}

#[derive(diesel::QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

async fn account(pool: &healthd::db::DbPool, key: &str) -> i64 {
    let mut conn = pool.get().await.unwrap();
    let row: Id = diesel::sql_query(
        "INSERT INTO accounts (key, name) VALUES ($1, $1 || ' Ltd') RETURNING id",
    )
    .bind::<Text, _>(key)
    .get_result(&mut conn)
    .await
    .unwrap();
    row.id
}

/// A score change as scoring commits it (the insert trigger notifies every process).
async fn change(
    pool: &healthd::db::DbPool,
    account_id: i64,
    previous: f64,
    score: f64,
    tier: &str,
) -> i64 {
    let mut conn = pool.get().await.unwrap();
    let row: Id = diesel::sql_query(
        "INSERT INTO score_changes (account_id, previous_score, score, previous_tier, tier, drivers) \
         VALUES ($1, $2, $3, 'healthy', $4, $5) RETURNING id",
    )
    .bind::<BigInt, _>(account_id)
    .bind::<diesel::sql_types::Double, _>(previous)
    .bind::<diesel::sql_types::Double, _>(score)
    .bind::<Text, _>(tier)
    .bind::<diesel::sql_types::Jsonb, _>(json!([{"key": "billing", "label": "Billing", "value": 30, "score": 0.1,
        "weight": 20, "contribution": 2, "impact": 18, "explanation": "Invoice 30 days past due ($1,200.00)", "missing": false}]))
    .get_result(&mut conn)
    .await
    .unwrap();
    row.id
}

const SCORE_CHANGED: &str = "subscription($after: ID, $filter: ScoreChangeFilter) { scoreChanged(after: $after, filter: $filter) { id account { key name } previousScore score previousTier tier drivers { explanation impact } changedAt } }";

/// Subscriptions start asynchronously after `subscribe`: give the server a moment before
/// committing changes a live-only subscriber must see.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(700)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn score_changes_reach_subscribers_of_both_processes_and_replay_after_reconnect() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let acme = account(pool, "acme").await;
    let other = account(pool, "other").await;
    let viewer = token(db.url(), "viewer");
    let a = Server::start(db.url());
    let b = Server::start(db.url());

    // Unauthenticated connections are refused.
    let (_, answer) = Client::connect(&a.ws("/graphql/ws"), Protocol::TransportWs, None).await;
    assert_ne!(answer, "connection_ack");
    let (_, answer) =
        Client::connect(&a.ws("/graphql/ws"), Protocol::TransportWs, Some("wrong")).await;
    assert_ne!(answer, "connection_ack");

    // graphql-transport-ws on process A at /graphql/ws; the legacy protocol on process B by
    // upgrade on /graphql; a filtered subscriber that must not see acme's changes.
    let (mut on_a, answer) =
        Client::connect(&a.ws("/graphql/ws"), Protocol::TransportWs, Some(&viewer)).await;
    assert_eq!(answer, "connection_ack");
    let (mut on_b, answer) =
        Client::connect(&b.ws("/graphql"), Protocol::LegacyWs, Some(&viewer)).await;
    assert_eq!(answer, "connection_ack");
    let (mut filtered, _) =
        Client::connect(&a.ws("/graphql/ws"), Protocol::TransportWs, Some(&viewer)).await;
    let (mut drops, _) =
        Client::connect(&b.ws("/graphql/ws"), Protocol::TransportWs, Some(&viewer)).await;
    on_a.subscribe("1", SCORE_CHANGED, json!({})).await;
    on_b.subscribe("1", SCORE_CHANGED, json!({})).await;
    filtered
        .subscribe(
            "1",
            SCORE_CHANGED,
            json!({"filter": {"accountKeys": ["other"]}}),
        )
        .await;
    drops
        .subscribe(
            "1",
            SCORE_CHANGED,
            json!({"filter": {"minDrop": 10, "tiers": ["AT_RISK", "CRITICAL"]}}),
        )
        .await;
    settle().await;

    let first = change(pool, acme, 82.0, 64.0, "at_risk").await;
    for client in [&mut on_a, &mut on_b, &mut drops] {
        let event = client.next_event().await;
        let sc = &event["scoreChanged"];
        assert_eq!(sc["id"], first.to_string());
        assert_eq!(sc["account"]["key"], "acme");
        assert_eq!(sc["account"]["name"], "acme Ltd");
        assert_eq!(sc["previousScore"], 82.0);
        assert_eq!(sc["score"], 64.0);
        assert_eq!(sc["previousTier"], "HEALTHY");
        assert_eq!(sc["tier"], "AT_RISK");
        assert_eq!(
            sc["drivers"][0]["explanation"],
            "Invoice 30 days past due ($1,200.00)"
        );
        assert!(sc["changedAt"].is_string());
    }
    // A small drop passes the key filter but not minDrop.
    let small = change(pool, other, 70.0, 66.0, "at_risk").await;
    assert_eq!(
        filtered.next_event().await["scoreChanged"]["id"],
        small.to_string()
    );
    assert_eq!(
        on_a.next_event().await["scoreChanged"]["id"],
        small.to_string()
    );
    assert_eq!(
        on_b.next_event().await["scoreChanged"]["id"],
        small.to_string()
    );
    assert!(
        drops.silent_for(Duration::from_millis(800)).await,
        "minDrop filter let a 4-point drop through"
    );

    // A BI tool disconnects, misses three changes, and resumes with `after`.
    drop(on_a);
    let missed = [
        change(pool, acme, 64.0, 60.0, "at_risk").await,
        change(pool, other, 66.0, 61.0, "at_risk").await,
        change(pool, acme, 60.0, 35.0, "critical").await,
    ];
    let (mut resumed, _) =
        Client::connect(&a.ws("/graphql/ws"), Protocol::TransportWs, Some(&viewer)).await;
    resumed
        .subscribe("7", SCORE_CHANGED, json!({"after": small.to_string()}))
        .await;
    for id in missed {
        assert_eq!(
            resumed.next_event().await["scoreChanged"]["id"],
            id.to_string()
        );
    }
    // ...then continues live, with nothing twice.
    let live = change(pool, acme, 35.0, 30.0, "critical").await;
    assert_eq!(
        resumed.next_event().await["scoreChanged"]["id"],
        live.to_string()
    );
    assert!(
        resumed.silent_for(Duration::from_millis(800)).await,
        "a change was delivered twice"
    );
    // The legacy subscriber on process B saw all of them, in order.
    for id in [missed[0], missed[1], missed[2], live] {
        assert_eq!(
            on_b.next_event().await["scoreChanged"]["id"],
            id.to_string()
        );
    }
    // The filtered subscriber only ever saw `other`.
    assert_eq!(
        filtered.next_event().await["scoreChanged"]["account"]["key"],
        "other"
    );
    assert!(filtered.silent_for(Duration::from_millis(500)).await);

    // The same feed pages over HTTP, oldest first.
    let http = reqwest::Client::new();
    let page: Value = http
        .post(format!("{}/graphql", a.base))
        .bearer_auth(&viewer)
        .json(&json!({"query": "{ scoreChanges(after: \"0\", first: 4) { nodes { id account { key } } edges { cursor } pageInfo { hasNextPage endCursor } } }"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conn = &page["data"]["scoreChanges"];
    assert_eq!(conn["nodes"][0]["id"], first.to_string());
    assert_eq!(conn["pageInfo"]["hasNextPage"], true);
    let rest: Value = http
        .post(format!("{}/graphql", b.base))
        .bearer_auth(&viewer)
        .json(&json!({"query": "query($a: ID) { scoreChanges(after: $a, first: 10) { nodes { id } pageInfo { hasNextPage } } }", "variables": {"a": conn["pageInfo"]["endCursor"]}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        rest["data"]["scoreChanges"]["nodes"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        rest["data"]["scoreChanges"]["pageInfo"]["hasNextPage"],
        false
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn raised_alerts_are_pushed_with_their_drivers() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let acme = account(pool, "acme").await;
    let viewer = token(db.url(), "viewer");
    let server = Server::start(db.url());
    let (mut client, answer) = Client::connect(
        &server.ws("/graphql/ws"),
        Protocol::TransportWs,
        Some(&viewer),
    )
    .await;
    assert_eq!(answer, "connection_ack");
    let (mut legacy, _) =
        Client::connect(&server.ws("/graphql"), Protocol::LegacyWs, Some(&viewer)).await;
    let query = "subscription($f: AlertFilter, $after: ID) { alertRaised(filter: $f, after: $after) { id rule severity status message drivers { explanation } account { key } } }";
    client
        .subscribe("a", query, json!({"f": {"accountKeys": ["acme"]}}))
        .await;
    legacy
        .subscribe("a", query, json!({"f": {"severities": ["CRITICAL"]}}))
        .await;
    settle().await;

    // What scoring does for an account that fell past due, then the alert evaluation it triggers.
    {
        let mut conn = pool.get().await.unwrap();
        diesel::sql_query(format!(
            "WITH h AS (INSERT INTO health_scores (account_id, computed_at, score, tier, model_version, signals) VALUES \
             ({acme}, now(), 55, 'at_risk', 1, '[{{\"key\":\"billing\",\"impact\":20,\"explanation\":\"Invoice 30 days past due ($1,200.00)\"}}]')) \
             INSERT INTO health_current (account_id, computed_at, score, tier, model_version, history_at) VALUES \
             ({acme}, now(), 55, 'at_risk', 1, now())"
        ))
        .execute(&mut conn)
        .await
        .unwrap();
        diesel::sql_query(format!(
            "INSERT INTO invoices (account_id, source, invoice_id, amount, due_date, status) \
             VALUES ({acme}, 'billing', 'INV-9', 1200, current_date - 30, 'open')"
        ))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let summary =
        healthd::alerts::evaluate(pool, &healthd::alerts::AlertScope::Accounts(vec![acme]))
            .await
            .unwrap();
    assert_eq!(summary.raised, 1);
    for c in [&mut client, &mut legacy] {
        let alert = c.next_event().await["alertRaised"].clone();
        assert_eq!(alert["rule"], "invoice_past_due");
        assert_eq!(alert["severity"], "CRITICAL");
        assert_eq!(alert["status"], "OPEN");
        assert_eq!(alert["account"]["key"], "acme");
        assert_eq!(
            alert["drivers"][0]["explanation"],
            "Invoice 30 days past due ($1,200.00)"
        );
        assert!(alert["message"]
            .as_str()
            .unwrap()
            .starts_with("1 invoice past due, oldest 30 days ($1,200.00)"));
    }
    // A late subscriber replays it with `after: 0`.
    let (mut late, _) = Client::connect(
        &server.ws("/graphql/ws"),
        Protocol::TransportWs,
        Some(&viewer),
    )
    .await;
    late.subscribe("b", query, json!({"after": "0"})).await;
    assert_eq!(
        late.next_event().await["alertRaised"]["rule"],
        "invoice_past_due"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn small_subscription_benchmark_delivers_everything_once() {
    let db = TestDb::new().await;
    let viewer = token(db.url(), "viewer");
    let server = Server::start(db.url());
    let mut opts = healthd::bench::subscriptions::SubscriptionBenchOptions::new(
        &server.base,
        &viewer,
        db.url(),
        50,
        20,
    );
    opts.server_pid = Some(server.child.id());
    opts.timeout = Duration::from_secs(60);
    let report = healthd::bench::subscriptions::run_subscription_bench(&opts)
        .await
        .unwrap();
    println!("{report}");
    assert!(report.complete(), "{report}");
    assert_eq!(report.delivered, 50 * 20);
    assert!(report.server_rss_kib.is_some());
    // Generous on a shared CI machine; the benchmark itself reports the real figure.
    assert!(report.p99 < Duration::from_secs(2), "{report}");
}

/// The full benchmark (not part of the suite): `HEALTHD_BENCH_SUBSCRIBERS=5000
/// HEALTHD_BENCH_CHANGES=100 cargo test --release -p healthd --test subscriptions -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn subscription_benchmark() {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let db = TestDb::new().await;
    let viewer = token(db.url(), "viewer");
    // HEALTHD_BENCH_READ_BUFFER=<bytes>: serve from this process with that WebSocket read buffer
    // instead of the binary (to measure the effect of the buffer size on the same handler).
    let read_buffer = std::env::var("HEALTHD_BENCH_READ_BUFFER")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let (server, base, pid) = match read_buffer {
        None => {
            let server = Server::start(db.url());
            let base = server.base.clone();
            let pid = server.child.id();
            (Some(server), base, pid)
        }
        Some(size) => (None, in_process_server(&db, size).await, std::process::id()),
    };
    let mut opts = healthd::bench::subscriptions::SubscriptionBenchOptions::new(
        &base,
        &viewer,
        db.url(),
        env("HEALTHD_BENCH_SUBSCRIBERS", 5000),
        env("HEALTHD_BENCH_CHANGES", 100),
    );
    opts.server_pid = Some(pid);
    opts.interval = Duration::from_millis(env("HEALTHD_BENCH_INTERVAL_MS", 200) as u64);
    let report = healthd::bench::subscriptions::run_subscription_bench(&opts)
        .await
        .unwrap();
    println!("{report}");
    drop(server);
    assert!(report.complete(), "{report}");
}

/// The subscription endpoint as `healthd serve` routes it (same schema and protocols), with the
/// given WebSocket read buffer size; returns its base URL.
async fn in_process_server(db: &TestDb, read_buffer: usize) -> String {
    use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
    use axum::extract::{State, WebSocketUpgrade};
    let state = healthd::app::AppState::new(
        db.pool().clone(),
        db.url(),
        healthd::config::Config::default(),
    );
    let schema = healthd::graphql::build_schema(Some(state));
    async fn handler(
        State((schema, read_buffer)): State<(healthd::graphql::HealthdSchema, usize)>,
        protocol: GraphQLProtocol,
        upgrade: WebSocketUpgrade,
    ) -> axum::response::Response {
        upgrade
            .read_buffer_size(read_buffer)
            .protocols(async_graphql::http::ALL_WEBSOCKET_PROTOCOLS)
            .on_upgrade(move |socket| async move {
                GraphQLWebSocket::new(socket, schema, protocol)
                    .on_connection_init(|_| async {
                        let mut data = async_graphql::Data::default();
                        data.insert(healthd::auth::Viewer {
                            token_id: 0,
                            name: "bench".into(),
                            role: healthd::auth::Role::Viewer,
                        });
                        Ok(data)
                    })
                    .serve()
                    .await
            })
    }
    let app = axum::Router::new()
        .route("/graphql/ws", axum::routing::get(handler))
        .with_state((schema, read_buffer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// The npm `graphql-ws` client (what browser apps and the issue's checks use) against the real
/// server: replay with `after`, then a live change. Skipped when node or npm is unavailable.
#[tokio::test(flavor = "multi_thread")]
async fn the_npm_graphql_ws_client_replays_and_receives_live_changes() {
    let dir = healthd::testing::target_dir().join("npm-graphql-ws");
    let ready = dir.join("node_modules/graphql-ws/package.json").exists()
        || (std::fs::create_dir_all(&dir).is_ok()
            && Command::new("npm")
                .args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--silent",
                    "graphql-ws@6",
                    "ws@8",
                ])
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()));
    if !ready || Command::new("node").arg("--version").output().is_err() {
        eprintln!("skipping: node or npm (graphql-ws) unavailable");
        return;
    }
    let script = dir.join("subscribe.mjs");
    std::fs::write(
        &script,
        r#"
import { createClient } from 'graphql-ws';
import WebSocket from 'ws';
const [url, token, after, want] = process.argv.slice(2);
const client = createClient({
  url, webSocketImpl: WebSocket, retryAttempts: 0,
  connectionParams: { authorization: `Bearer ${token}` },
  on: { connected: () => console.log('connected') },
});
let seen = 0;
client.subscribe(
  { query: 'subscription($after: ID) { scoreChanged(after: $after) { id score tier account { key } } }', variables: { after } },
  {
    next: (msg) => { console.log(JSON.stringify(msg)); if (++seen >= Number(want)) { client.dispose(); process.exit(0); } },
    error: (err) => { console.error(JSON.stringify(err)); process.exit(2); },
    complete: () => process.exit(3),
  },
);
setTimeout(() => { console.error('timeout'); process.exit(4); }, 20000);
"#,
    )
    .unwrap();

    let db = TestDb::new().await;
    let pool = db.pool();
    let acme = account(pool, "acme").await;
    let viewer = token(db.url(), "viewer");
    let server = Server::start(db.url());
    let missed = change(pool, acme, 90.0, 70.0, "healthy").await;
    let mut node = Command::new("node")
        .arg(&script)
        .args([&server.ws("/graphql/ws"), &viewer, "0", "2"])
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = node.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next = |rx: &std::sync::mpsc::Receiver<String>| {
        rx.recv_timeout(WAIT)
            .expect("no output from the graphql-ws client")
    };
    assert_eq!(next(&rx), "connected");
    let replayed: Value = serde_json::from_str(&next(&rx)).unwrap();
    assert_eq!(replayed["data"]["scoreChanged"]["id"], missed.to_string());
    let live = change(pool, acme, 70.0, 38.0, "critical").await;
    let event: Value = serde_json::from_str(&next(&rx)).unwrap();
    assert_eq!(event["data"]["scoreChanged"]["id"], live.to_string());
    assert_eq!(event["data"]["scoreChanged"]["tier"], "CRITICAL");
    assert!(node.wait().unwrap().success());
}
