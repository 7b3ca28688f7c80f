//! Subscription latency and fan-out benchmark: connects N `scoreChanged` subscribers over
//! WebSocket (graphql-transport-ws) to a running healthd, commits score changes the way scoring
//! does (a `score_changes` row per change; the insert trigger sends the NOTIFY at commit), and
//! reports commit-to-message latency percentiles, delivery completeness and the server's memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use diesel::sql_types::{BigInt, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// The account every benchmark change is about (created if missing).
const BENCH_ACCOUNT: &str = "bench-subscriptions";

#[derive(Debug, Clone)]
pub struct SubscriptionBenchOptions {
    /// The server's base URL (`http://127.0.0.1:8080`); subscribers connect to `/graphql/ws`.
    pub url: String,
    /// A viewer token.
    pub token: String,
    /// The server's database (the benchmark commits changes there, as scoring would).
    pub database_url: String,
    pub subscribers: usize,
    pub changes: usize,
    /// Pause between committed changes.
    pub interval: Duration,
    /// The server's process id, for its memory; found by command line when `None`.
    pub server_pid: Option<u32>,
    /// How long to wait for connections and for deliveries.
    pub timeout: Duration,
}

impl SubscriptionBenchOptions {
    pub fn new(
        url: &str,
        token: &str,
        database_url: &str,
        subscribers: usize,
        changes: usize,
    ) -> Self {
        SubscriptionBenchOptions {
            url: url.to_string(),
            token: token.to_string(),
            database_url: database_url.to_string(),
            subscribers,
            changes,
            interval: Duration::from_millis(20),
            server_pid: None,
            timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SubscriptionBenchReport {
    pub subscribers: usize,
    pub changes: usize,
    pub connect_time: Duration,
    /// subscribers × changes
    pub expected: u64,
    /// Distinct (subscriber, change) pairs received.
    pub delivered: u64,
    /// Messages received more than once.
    pub duplicates: u64,
    /// Changes a subscriber received out of id order.
    pub out_of_order: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// The server's resident memory (VmRSS) after the run, in KiB.
    pub server_rss_kib: Option<u64>,
    /// The server's resident memory before subscribers connected, in KiB.
    pub server_rss_before_kib: Option<u64>,
    /// CPU time the server used per committed change while the changes flowed (all cores).
    pub server_cpu_per_change: Option<Duration>,
    /// CPU time this benchmark client used per committed change (it shares the machine).
    pub client_cpu_per_change: Option<Duration>,
}

impl SubscriptionBenchReport {
    /// Everything delivered, nothing twice, in order.
    pub fn complete(&self) -> bool {
        self.delivered == self.expected && self.duplicates == 0 && self.out_of_order == 0
    }
}

impl std::fmt::Display for SubscriptionBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        writeln!(
            f,
            "subscribers:   {} (connected in {:.1} s)",
            self.subscribers,
            self.connect_time.as_secs_f64()
        )?;
        writeln!(f, "changes:       {}", self.changes)?;
        writeln!(
            f,
            "delivered:     {} of {} ({} duplicates, {} out of order)",
            self.delivered, self.expected, self.duplicates, self.out_of_order
        )?;
        writeln!(
            f,
            "latency:       p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (commit to message)",
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )?;
        if let (Some(server), Some(client)) =
            (self.server_cpu_per_change, self.client_cpu_per_change)
        {
            writeln!(
                f,
                "cpu:           server {:.1} ms, client {:.1} ms per change ({} messages each)",
                ms(server),
                ms(client),
                self.subscribers
            )?;
        }
        match (self.server_rss_before_kib, self.server_rss_kib) {
            (Some(before), Some(after)) => write!(
                f,
                "server memory: {:.1} MiB RSS ({:.1} MiB before subscribers connected)",
                after as f64 / 1024.0,
                before as f64 / 1024.0
            ),
            _ => write!(f, "server memory: unknown (server process not found)"),
        }
    }
}

/// Runs the benchmark against a running server. Fails only when it cannot run; an incomplete
/// delivery is reported (see [`SubscriptionBenchReport::complete`]).
pub async fn run_subscription_bench(
    opts: &SubscriptionBenchOptions,
) -> anyhow::Result<SubscriptionBenchReport> {
    if opts.subscribers == 0 || opts.changes == 0 {
        bail!("subscribers and changes must be at least 1");
    }
    let ws_url = websocket_url(&opts.url)?;
    let mut conn = AsyncPgConnection::establish(&opts.database_url)
        .await
        .context("cannot connect to the database")?;
    let account_id = bench_account(&mut conn).await?;
    let start_after = latest_id(&mut conn).await?;
    let pid = opts.server_pid.or_else(find_server_pid);
    let rss_before = pid.and_then(vm_rss_kib);

    // Connect every subscriber; each resumes after the current end of the feed, so none misses
    // the warm-up change however long its subscription takes to start.
    let expected_per_subscriber = opts.changes + 1;
    let warm = Arc::new(AtomicUsize::new(0));
    let complete = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let connect_started = Instant::now();
    let mut tasks = Vec::with_capacity(opts.subscribers);
    let mut connected = futures_util::stream::iter(0..opts.subscribers)
        .map(|_| connect_subscriber(ws_url.clone(), opts.token.clone(), start_after))
        .buffer_unordered(64);
    while let Some(socket) = connected.next().await {
        let socket = socket?;
        tasks.push(tokio::spawn(collect(
            socket,
            expected_per_subscriber,
            warm.clone(),
            complete.clone(),
            stop.clone(),
        )));
    }
    let connect_time = connect_started.elapsed();

    // Warm-up: wait until every subscriber has the first change.
    let warm_id = commit_change(&mut conn, account_id, 0).await?.0;
    wait_until(
        || AtomicUsize::load(&warm, Ordering::Relaxed) >= opts.subscribers,
        opts.timeout,
    )
    .await;

    let cpu_before = (pid.and_then(cpu_time), cpu_time(std::process::id()));
    let mut committed_at: HashMap<i64, Instant> = HashMap::with_capacity(opts.changes);
    for n in 1..=opts.changes {
        let (id, at) = commit_change(&mut conn, account_id, n).await?;
        committed_at.insert(id, at);
        tokio::time::sleep(opts.interval).await;
    }
    wait_until(
        || AtomicUsize::load(&complete, Ordering::Relaxed) >= opts.subscribers,
        opts.timeout,
    )
    .await;
    let per_change = |before: Option<Duration>, after: Option<Duration>| match (before, after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b) / opts.changes as u32),
        _ => None,
    };
    let server_cpu_per_change = per_change(cpu_before.0, pid.and_then(cpu_time));
    let client_cpu_per_change = per_change(cpu_before.1, cpu_time(std::process::id()));
    // Anything sent twice would arrive right behind the originals.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();

    let mut latencies = Vec::with_capacity(opts.subscribers * opts.changes);
    let (mut delivered, mut duplicates, mut out_of_order) = (0u64, 0u64, 0u64);
    for task in tasks {
        let received = task.await.context("subscriber task failed")?;
        let mut seen = std::collections::HashSet::new();
        let mut last = 0;
        for (id, at) in received {
            if id < last {
                out_of_order += 1;
            }
            last = last.max(id);
            if !seen.insert(id) {
                duplicates += 1;
                continue;
            }
            if let Some(committed) = committed_at.get(&id) {
                delivered += 1;
                latencies.push(at.saturating_duration_since(*committed));
            } else if id != warm_id {
                duplicates += 1;
            }
        }
    }
    latencies.sort();
    let pct = |p: f64| -> Duration {
        if latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[i]
    };
    Ok(SubscriptionBenchReport {
        subscribers: opts.subscribers,
        changes: opts.changes,
        connect_time,
        expected: (opts.subscribers * opts.changes) as u64,
        delivered,
        duplicates,
        out_of_order,
        p50: pct(0.50),
        p99: pct(0.99),
        max: latencies.last().copied().unwrap_or_default(),
        server_rss_kib: pid.and_then(vm_rss_kib),
        server_rss_before_kib: rss_before,
        server_cpu_per_change,
        client_cpu_per_change,
    })
}

fn websocket_url(base: &str) -> anyhow::Result<String> {
    let base = base.trim_end_matches('/').trim_end_matches("/graphql");
    let rest = base
        .strip_prefix("http://")
        .map(|r| format!("ws://{r}"))
        .or_else(|| base.strip_prefix("https://").map(|r| format!("wss://{r}")))
        .or_else(|| {
            (base.starts_with("ws://") || base.starts_with("wss://")).then(|| base.to_string())
        })
        .with_context(|| format!("unsupported server URL `{base}` (expected http://host:port)"))?;
    Ok(format!("{rest}/graphql/ws"))
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

async fn bench_account(conn: &mut AsyncPgConnection) -> anyhow::Result<i64> {
    let row: Id = diesel::sql_query(
        "INSERT INTO accounts (key, name) VALUES ($1, 'Subscription benchmark') \
         ON CONFLICT (key) DO UPDATE SET updated_at = now() RETURNING id",
    )
    .bind::<Text, _>(BENCH_ACCOUNT)
    .get_result(conn)
    .await?;
    Ok(row.id)
}

async fn latest_id(conn: &mut AsyncPgConnection) -> anyhow::Result<i64> {
    let row: Id = diesel::sql_query("SELECT coalesce(max(id), 0)::bigint AS id FROM score_changes")
        .get_result(conn)
        .await?;
    Ok(row.id)
}

/// One committed change (autocommit); returns its id and when the commit returned.
async fn commit_change(
    conn: &mut AsyncPgConnection,
    account_id: i64,
    n: usize,
) -> anyhow::Result<(i64, Instant)> {
    let score = 50.0 + (n % 40) as f64;
    let row: Id = diesel::sql_query(
        "INSERT INTO score_changes (account_id, previous_score, score, previous_tier, tier, drivers) \
         VALUES ($1, $2 + 1, $2, 'at_risk', 'at_risk', '[]') RETURNING id",
    )
    .bind::<BigInt, _>(account_id)
    .bind::<diesel::sql_types::Double, _>(score)
    .get_result(conn)
    .await?;
    Ok((row.id, Instant::now()))
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects, authenticates and subscribes (graphql-transport-ws).
async fn connect_subscriber(url: String, token: String, after: i64) -> anyhow::Result<Socket> {
    let mut request = url.as_str().into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
    // A small read buffer: tungstenite zero-fills the whole buffer (128 KiB by default) on every
    // read, which with thousands of sockets costs more than everything else the client does.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 * 1024);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let init = serde_json::json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}});
    socket.send(Message::text(init.to_string())).await?;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .context("no connection_ack within 30 s")?
            .context("connection closed before connection_ack")??;
        if let Message::Text(text) = message {
            let value: serde_json::Value = serde_json::from_str(&text)?;
            match value["type"].as_str() {
                Some("connection_ack") => break,
                Some("ping") => socket.send(Message::text(r#"{"type":"pong"}"#)).await?,
                _ => bail!("unexpected message before connection_ack: {text}"),
            }
        }
    }
    let subscribe = serde_json::json!({
        "id": "1",
        "type": "subscribe",
        "payload": {
            "query": "subscription($after: ID, $keys: [String!]) { scoreChanged(after: $after, filter: {accountKeys: $keys}) { id } }",
            "variables": {"after": after.to_string(), "keys": [BENCH_ACCOUNT]}
        }
    });
    socket.send(Message::text(subscribe.to_string())).await?;
    Ok(socket)
}

/// Reads `next` messages until stopped; returns (change id, arrival) in arrival order.
async fn collect(
    mut socket: Socket,
    expected: usize,
    warm: Arc<AtomicUsize>,
    complete: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> Vec<(i64, Instant)> {
    let mut received = Vec::with_capacity(expected);
    let mut distinct = std::collections::HashSet::new();
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            m = socket.next() => m,
        };
        let at = Instant::now();
        let Some(Ok(message)) = message else { break };
        let Message::Text(text) = message else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        match value["type"].as_str() {
            Some("next") => {
                let Some(id) = value["payload"]["data"]["scoreChanged"]["id"]
                    .as_str()
                    .and_then(|s| s.parse::<i64>().ok())
                else {
                    tracing::warn!(message = %text, "subscription error");
                    continue;
                };
                received.push((id, at));
                if distinct.insert(id) {
                    if distinct.len() == 1 {
                        warm.fetch_add(1, Ordering::Relaxed);
                    }
                    if distinct.len() == expected {
                        complete.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Some("ping") => {
                let _ = socket.send(Message::text(r#"{"type":"pong"}"#)).await;
            }
            _ => {}
        }
    }
    let _ = socket.close(None).await;
    received
}

async fn wait_until(done: impl Fn() -> bool, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// VmRSS of a process, in KiB (Linux).
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User plus system CPU time of a process so far (Linux, from `/proc/<pid>/stat`).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // Clock ticks; 100 per second on Linux.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// The only running `healthd serve` process other than this one, if exactly one.
fn find_server_pid() -> Option<u32> {
    let me = std::process::id();
    let mut found = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_healthd = matches!(args.as_slice(), [first, ..] if first.ends_with(b"healthd"));
        if is_healthd && args.iter().any(|a| *a == b"serve") {
            if found.is_some() {
                return None;
            }
            found = Some(pid);
        }
    }
    found
}
