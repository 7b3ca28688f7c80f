//! The delivery worker: claims due outbox rows, sends them signed, records the outcome.

use std::time::{Duration, Instant};

use diesel::sql_types::{Array, BigInt, Bool, Double, Integer, Jsonb, Nullable, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, RunQueryDsl};
use futures_util::StreamExt;
use rand::Rng;
use serde_json::Value;

use super::{signature, store, WebhookError};
use crate::app::AppState;
use crate::db::{DbError, DbPool};

/// Retry and pacing settings, from `[alerts.delivery]`:
/// `retry_base_secs` (10), `retry_max_secs` (3600), `max_attempts` (20), `timeout_secs` (10),
/// `poll_ms` (1000), `batch` (50), `concurrency` (8).
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Delay before the second attempt; doubles with each failure (with jitter) up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// After this many failed attempts a delivery is marked `failed` and no longer retried.
    pub max_attempts: i32,
    /// Per-request timeout.
    pub timeout: Duration,
    /// How often the outbox is checked when no event woke the worker.
    pub poll: Duration,
    /// Rows claimed per round.
    pub batch: i64,
    /// Requests in flight at once.
    pub concurrency: usize,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            retry_base: Duration::from_secs(10),
            retry_max: Duration::from_secs(3600),
            max_attempts: 20,
            timeout: Duration::from_secs(10),
            poll: Duration::from_millis(1000),
            batch: 50,
            concurrency: 8,
        }
    }
}

impl DeliverySettings {
    /// Reads `delivery` from the `[alerts]` section; missing keys keep their defaults.
    pub fn from_alerts_config(section: &Value) -> Result<DeliverySettings, WebhookError> {
        let mut s = DeliverySettings::default();
        let Some(delivery) = section.get("delivery") else {
            return Ok(s);
        };
        let obj = delivery.as_object().ok_or_else(|| {
            WebhookError::InvalidInput("[alerts.delivery] must be a table".into())
        })?;
        for (name, value) in obj {
            let n = value
                .as_f64()
                .filter(|n| n.is_finite() && *n > 0.0)
                .ok_or_else(|| {
                    WebhookError::InvalidInput(format!(
                        "[alerts.delivery] `{name}` must be a positive number"
                    ))
                })?;
            match name.as_str() {
                "retry_base_secs" => s.retry_base = Duration::from_secs_f64(n),
                "retry_max_secs" => s.retry_max = Duration::from_secs_f64(n),
                "max_attempts" => s.max_attempts = n as i32,
                "timeout_secs" => s.timeout = Duration::from_secs_f64(n),
                "poll_ms" => s.poll = Duration::from_secs_f64(n / 1000.0),
                "batch" => s.batch = n as i64,
                "concurrency" => s.concurrency = n as usize,
                other => {
                    return Err(WebhookError::InvalidInput(format!(
                        "[alerts.delivery]: unknown setting `{other}` (known: retry_base_secs, retry_max_secs, max_attempts, timeout_secs, poll_ms, batch, concurrency)"
                    )))
                }
            }
        }
        Ok(s)
    }

    /// Delay after failed attempt number `attempt` (1-based): exponential, capped, with jitter
    /// (between half and all of it) so receivers coming back are not hit by a synchronized wave.
    pub fn backoff(&self, attempt: i32) -> Duration {
        let exp = self.retry_base.as_secs_f64() * 2f64.powi((attempt - 1).clamp(0, 30));
        let capped = exp.min(self.retry_max.as_secs_f64());
        let jitter: f64 = rand::rng().random_range(0.5..=1.0);
        Duration::from_secs_f64(capped * jitter)
    }

    /// How long a claimed row stays invisible to other workers: longer than any request takes.
    fn lease(&self) -> Duration {
        self.timeout + Duration::from_secs(30)
    }
}

#[derive(Debug, QueryableByName)]
struct Claimed {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    event_type: String,
    #[diesel(sql_type = Jsonb)]
    payload: Value,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Text)]
    url: String,
    #[diesel(sql_type = Text)]
    secret: String,
    #[diesel(sql_type = Text)]
    format: String,
}

struct Outcome {
    id: i64,
    attempt: i32,
    ok: bool,
    status: Option<i32>,
    error: Option<String>,
    duration_ms: i32,
    retry_secs: f64,
}

/// The HTTP client deliveries use.
pub fn http_client(settings: &DeliverySettings) -> Result<reqwest::Client, WebhookError> {
    reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("healthd/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| WebhookError::Client(e.to_string()))
}

/// The request body for a receiver's format: the event itself, or a Slack message.
pub fn render_body(format: &str, event_type: &str, payload: &Value) -> Vec<u8> {
    let value = if format == "slack" {
        serde_json::json!({ "text": slack_text(event_type, payload) })
    } else {
        payload.clone()
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

fn slack_text(event_type: &str, p: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let account = format!("{} ({})", s(&p["account"]["name"]), s(&p["account"]["key"]));
    if event_type == "alert.raised" {
        let owner = p["owner"]
            .as_str()
            .map(|o| format!(" · owner {o}"))
            .unwrap_or_default();
        format!(
            "[{}] {account}: {}{owner}",
            s(&p["severity"]),
            s(&p["message"])
        )
    } else {
        let score = |v: &Value| {
            v.as_f64()
                .map(|n| format!("{n:.0}"))
                .unwrap_or_else(|| "-".into())
        };
        let why = p["drivers"]
            .as_array()
            .and_then(|d| d.iter().next())
            .and_then(|d| d["explanation"].as_str())
            .map(|e| format!(" — {e}"))
            .unwrap_or_default();
        format!(
            "{account}: health score {} → {} ({} → {}){why}",
            score(&p["previousScore"]),
            score(&p["score"]),
            p["previousTier"].as_str().unwrap_or("-"),
            s(&p["tier"])
        )
    }
}

/// One round: claims up to `batch` due deliveries, sends them, records the outcomes.
/// Returns how many were attempted.
pub async fn deliver_due(
    pool: &DbPool,
    client: &reqwest::Client,
    settings: &DeliverySettings,
) -> Result<usize, WebhookError> {
    let mut conn = pool.get().await.map_err(DbError::from)?;
    let claimed: Vec<Claimed> = diesel::sql_query(
        "WITH due AS ( \
             SELECT d.id FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id AND w.enabled \
             WHERE d.status = 'pending' AND d.next_attempt_at <= now() \
             ORDER BY d.next_attempt_at, d.id LIMIT $1 FOR UPDATE OF d SKIP LOCKED) \
         UPDATE webhook_deliveries d SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => $2) \
         FROM due, webhooks w WHERE d.id = due.id AND w.id = d.webhook_id \
         RETURNING d.id, d.event_type, d.payload, d.attempts, w.url, w.secret, w.format",
    )
    .bind::<BigInt, _>(settings.batch)
    .bind::<Double, _>(settings.lease().as_secs_f64())
    .load(&mut conn)
    .await?;
    drop(conn);
    if claimed.is_empty() {
        return Ok(0);
    }
    let count = claimed.len();
    let outcomes: Vec<Outcome> = futures_util::stream::iter(claimed)
        .map(|c| send(client, settings, c))
        .buffer_unordered(settings.concurrency.max(1))
        .collect()
        .await;
    record(pool, settings, &outcomes).await?;
    for o in &outcomes {
        let outcome = if o.ok { "delivered" } else { "failed" };
        metrics::counter!("healthd_webhook_deliveries_total", "outcome" => outcome).increment(1);
    }
    Ok(count)
}

async fn send(client: &reqwest::Client, settings: &DeliverySettings, c: Claimed) -> Outcome {
    let body = render_body(&c.format, &c.event_type, &c.payload);
    let timestamp = chrono::Utc::now().timestamp();
    let started = Instant::now();
    let result = client
        .post(&c.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Healthd-Event", &c.event_type)
        .header("X-Healthd-Delivery", c.id.to_string())
        .header("X-Healthd-Timestamp", timestamp.to_string())
        .header(
            "X-Healthd-Signature",
            signature::sign(&c.secret, timestamp, &body),
        )
        .body(body)
        .send()
        .await;
    let duration_ms = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
    let (ok, status, error) = match result {
        Ok(response) if response.status().is_success() => {
            (true, Some(response.status().as_u16() as i32), None)
        }
        Ok(response) => {
            let status = response.status();
            (
                false,
                Some(status.as_u16() as i32),
                Some(format!("receiver answered {status}")),
            )
        }
        Err(e) => (false, None, Some(describe(e))),
    };
    if let Some(error) = &error {
        tracing::debug!(delivery = c.id, attempt = c.attempts, %error, "webhook delivery failed");
    }
    Outcome {
        id: c.id,
        attempt: c.attempts,
        ok,
        status,
        error,
        duration_ms,
        retry_secs: settings.backoff(c.attempts).as_secs_f64(),
    }
}

fn describe(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    // Without the URL: it may carry a token.
    format!("{kind}: {}", e.without_url())
}

/// Writes all outcomes of a round in one transaction (two set-based statements). A row whose
/// attempt number moved on (its lease expired and another worker took it) is left alone, and the
/// log skips deliveries whose receiver was deleted meanwhile.
async fn record(
    pool: &DbPool,
    settings: &DeliverySettings,
    outcomes: &[Outcome],
) -> Result<(), WebhookError> {
    let ids: Vec<i64> = outcomes.iter().map(|o| o.id).collect();
    let attempts: Vec<i32> = outcomes.iter().map(|o| o.attempt).collect();
    let oks: Vec<bool> = outcomes.iter().map(|o| o.ok).collect();
    let statuses: Vec<Option<i32>> = outcomes.iter().map(|o| o.status).collect();
    let errors: Vec<Option<String>> = outcomes.iter().map(|o| o.error.clone()).collect();
    let durations: Vec<i32> = outcomes.iter().map(|o| o.duration_ms).collect();
    let retries: Vec<f64> = outcomes.iter().map(|o| o.retry_secs).collect();
    let max_attempts = settings.max_attempts;
    let mut conn = pool.get().await.map_err(DbError::from)?;
    conn.transaction::<_, diesel::result::Error, _>(async |conn| {
        diesel::sql_query(
            "UPDATE webhook_deliveries d SET \
                 status = CASE WHEN r.ok THEN 'delivered' WHEN d.attempts >= $7 THEN 'failed' ELSE 'pending' END, \
                 delivered_at = CASE WHEN r.ok THEN now() END, \
                 next_attempt_at = CASE WHEN r.ok THEN now() ELSE now() + make_interval(secs => r.retry) END, \
                 last_error = r.error, response_status = r.status \
             FROM unnest($1::bigint[], $2::int[], $3::bool[], $4::int[], $5::text[], $6::float8[]) \
                  AS r(id, attempt, ok, status, error, retry) \
             WHERE d.id = r.id AND d.attempts = r.attempt AND d.status = 'pending'",
        )
        .bind::<Array<BigInt>, _>(&ids)
        .bind::<Array<Integer>, _>(&attempts)
        .bind::<Array<Bool>, _>(&oks)
        .bind::<Array<Nullable<Integer>>, _>(&statuses)
        .bind::<Array<Nullable<Text>>, _>(&errors)
        .bind::<Array<Double>, _>(&retries)
        .bind::<Integer, _>(max_attempts)
        .execute(conn)
        .await?;
        diesel::sql_query(
            "INSERT INTO webhook_delivery_attempts (delivery_id, attempt, response_status, error, duration_ms) \
             SELECT r.* FROM unnest($1::bigint[], $2::int[], $3::int[], $4::text[], $5::int[]) \
                 AS r(delivery_id, attempt, response_status, error, duration_ms) \
             WHERE EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.id = r.delivery_id) \
             ON CONFLICT (delivery_id, attempt) DO NOTHING",
        )
        .bind::<Array<BigInt>, _>(&ids)
        .bind::<Array<Integer>, _>(&attempts)
        .bind::<Array<Nullable<Integer>>, _>(&statuses)
        .bind::<Array<Nullable<Text>>, _>(&errors)
        .bind::<Array<Integer>, _>(&durations)
        .execute(conn)
        .await?;
        Ok(())
    })
    .await?;
    Ok(())
}

/// Background job: delivers the outbox until shutdown. Wakes on new events from the fan-out
/// (promptly) and polls every `poll_ms` (for retries that came due). Also creates the receivers
/// declared in the config file. Safe to run in every process.
pub async fn run_delivery_worker(state: AppState) {
    let settings = match DeliverySettings::from_alerts_config(&state.config.alerts) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "invalid webhook delivery settings; webhook delivery disabled");
            return;
        }
    };
    if let Err(e) = crate::alerts::rules::install_file_config(&state.config.alerts) {
        tracing::error!(error = %e, "invalid [alerts] configuration; using the defaults");
    }
    if let Err(e) = store::sync_config_webhooks(&state.pool, &state.config.webhooks).await {
        tracing::error!(error = %e, "cannot register the webhooks declared in the config file");
    }
    let client = match http_client(&settings) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook delivery disabled");
            return;
        }
    };
    let hub = crate::feed::FeedHub::shared(&state);
    let mut activity = hub.activity();
    loop {
        let delivered = match deliver_due(&state.pool, &client, &settings).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "webhook delivery round failed");
                0
            }
        };
        if delivered as i64 >= settings.batch {
            // More may be due right away.
            if state.shutdown.is_cancelled() {
                return;
            }
            continue;
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = activity.changed() => {}
            _ = tokio::time::sleep(settings.poll) => {}
        }
    }
}
