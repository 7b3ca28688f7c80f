//! Receivers and their delivery log.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Integer, Jsonb, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use serde_json::{Map, Value};

use super::{WebhookError, EVENTS};
use crate::db::{DbError, DbPool};

#[derive(Debug, Clone, QueryableByName)]
pub struct WebhookRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub name: String,
    #[diesel(sql_type = Text)]
    pub url: String,
    /// Never shown again after creation.
    #[diesel(sql_type = Text)]
    pub secret: String,
    #[diesel(sql_type = Array<Text>)]
    pub events: Vec<String>,
    #[diesel(sql_type = Jsonb)]
    pub filter: Value,
    #[diesel(sql_type = Text)]
    pub format: String,
    #[diesel(sql_type = Bool)]
    pub enabled: bool,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
}

/// A receiver to register. `filter` keys: `accountKeys` (both events), `tiers` and `minDrop`
/// (score changes), `rules` and `severities` (alerts).
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub name: String,
    pub url: String,
    pub secret: String,
    pub events: Vec<String>,
    pub filter: Value,
    /// `json` (the event as JSON) or `slack` (`{"text": ...}` for a Slack incoming webhook).
    pub format: String,
}

fn string_array(name: &str, value: &Value, allowed: Option<&[&str]>) -> Result<Value, String> {
    let items = value
        .as_array()
        .ok_or_else(|| format!("filter `{name}` must be a list of strings"))?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let s = item
            .as_str()
            .ok_or_else(|| format!("filter `{name}` must be a list of strings"))?;
        let s = match allowed {
            Some(allowed) => {
                let upper = s.to_ascii_uppercase();
                if !allowed.contains(&upper.as_str()) {
                    return Err(format!(
                        "filter `{name}`: `{s}` is not one of {}",
                        allowed.join(", ")
                    ));
                }
                upper
            }
            None => s.to_string(),
        };
        out.push(Value::String(s));
    }
    Ok(Value::Array(out))
}

/// Checks and normalises a filter (nulls dropped, enum values upper-case) so the SQL that
/// matches it in the outbox trigger can trust its shape.
pub fn normalize_filter(filter: &Value) -> Result<Value, WebhookError> {
    let bad = WebhookError::InvalidInput;
    let obj = match filter {
        Value::Null => return Ok(Value::Object(Map::new())),
        Value::Object(obj) => obj,
        _ => return Err(bad("webhook filter must be an object".into())),
    };
    let mut out = Map::new();
    for (name, value) in obj {
        if value.is_null() {
            continue;
        }
        let normalized = match name.as_str() {
            "accountKeys" => string_array(name, value, None),
            "rules" => string_array(name, value, None).map(|v| {
                Value::Array(
                    v.as_array()
                        .into_iter()
                        .flatten()
                        .map(|s| Value::String(s.as_str().unwrap_or_default().to_ascii_lowercase()))
                        .collect(),
                )
            }),
            "tiers" => string_array(name, value, Some(&["HEALTHY", "AT_RISK", "CRITICAL"])),
            "severities" => string_array(name, value, Some(&["INFO", "WARNING", "CRITICAL"])),
            "minDrop" => value
                .as_f64()
                .map(|n| serde_json::json!(n))
                .ok_or_else(|| "filter `minDrop` must be a number".to_string()),
            other => Err(format!(
                "unknown webhook filter key `{other}` (known: accountKeys, tiers, minDrop, rules, severities)"
            )),
        }
        .map_err(bad)?;
        out.insert(name.clone(), normalized);
    }
    Ok(Value::Object(out))
}

impl NewWebhook {
    fn validate(mut self) -> Result<NewWebhook, WebhookError> {
        let bad = WebhookError::InvalidInput;
        self.name = self.name.trim().to_string();
        if self.name.is_empty() {
            return Err(bad("webhook name must not be empty".into()));
        }
        let url = reqwest::Url::parse(self.url.trim())
            .map_err(|e| bad(format!("invalid webhook URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("webhook URL must be http or https".into()));
        }
        self.url = url.to_string();
        if self.secret.len() < 8 {
            return Err(bad("webhook secret must be at least 8 characters".into()));
        }
        if self.events.is_empty() {
            self.events = EVENTS.iter().map(|e| e.to_string()).collect();
        }
        for event in &self.events {
            if !EVENTS.contains(&event.as_str()) {
                return Err(bad(format!(
                    "unknown webhook event `{event}` (known: {})",
                    EVENTS.join(", ")
                )));
            }
        }
        self.events.sort();
        self.events.dedup();
        self.format = self.format.to_ascii_lowercase();
        if !matches!(self.format.as_str(), "json" | "slack") {
            return Err(bad(format!(
                "webhook format must be json or slack, got `{}`",
                self.format
            )));
        }
        self.filter = normalize_filter(&self.filter)?;
        Ok(self)
    }
}

const SELECT: &str =
    "SELECT id, name, url, secret, events, filter, format, enabled, created_at FROM webhooks";

pub async fn create_webhook(pool: &DbPool, new: NewWebhook) -> Result<WebhookRow, WebhookError> {
    let new = new.validate()?;
    let mut conn = pool.get().await.map_err(DbError::from)?;
    let rows: Vec<WebhookRow> = diesel::sql_query(
        "INSERT INTO webhooks (name, url, secret, events, filter, format) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (name) DO NOTHING \
         RETURNING id, name, url, secret, events, filter, format, enabled, created_at",
    )
    .bind::<Text, _>(&new.name)
    .bind::<Text, _>(&new.url)
    .bind::<Text, _>(&new.secret)
    .bind::<Array<Text>, _>(&new.events)
    .bind::<Jsonb, _>(&new.filter)
    .bind::<Text, _>(&new.format)
    .load(&mut conn)
    .await?;
    rows.into_iter()
        .next()
        .ok_or(WebhookError::Duplicate(new.name))
}

/// Creates or updates (by name) the receivers declared in the config file (`[[webhook]]` with
/// `name`, `url`, `secret`, optional `events`, `filter`, `format`, `enabled`).
pub async fn sync_config_webhooks(
    pool: &DbPool,
    declared: &[Value],
) -> Result<usize, WebhookError> {
    let mut count = 0;
    for entry in declared {
        let field = |k: &str| {
            entry
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let new = NewWebhook {
            name: field("name"),
            url: field("url"),
            secret: field("secret"),
            events: entry
                .get("events")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            filter: entry.get("filter").cloned().unwrap_or(Value::Null),
            format: entry
                .get("format")
                .and_then(Value::as_str)
                .unwrap_or("json")
                .to_string(),
        }
        .validate()
        .map_err(|e| WebhookError::InvalidInput(format!("[[webhook]] `{}`: {e}", field("name"))))?;
        let enabled = entry
            .get("enabled")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let mut conn = pool.get().await.map_err(DbError::from)?;
        diesel::sql_query(
            "INSERT INTO webhooks (name, url, secret, events, filter, format, enabled) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url, secret = EXCLUDED.secret, events = EXCLUDED.events, \
             filter = EXCLUDED.filter, format = EXCLUDED.format, enabled = EXCLUDED.enabled",
        )
        .bind::<Text, _>(&new.name)
        .bind::<Text, _>(&new.url)
        .bind::<Text, _>(&new.secret)
        .bind::<Array<Text>, _>(&new.events)
        .bind::<Jsonb, _>(&new.filter)
        .bind::<Text, _>(&new.format)
        .bind::<Bool, _>(enabled)
        .execute(&mut conn)
        .await?;
        count += 1;
    }
    Ok(count)
}

pub async fn list_webhooks(pool: &DbPool) -> Result<Vec<WebhookRow>, DbError> {
    let mut conn = pool.get().await?;
    Ok(diesel::sql_query(format!("{SELECT} ORDER BY name"))
        .load(&mut conn)
        .await?)
}

pub async fn get_webhook(pool: &DbPool, id: i64) -> Result<Option<WebhookRow>, DbError> {
    let mut conn = pool.get().await?;
    let mut rows: Vec<WebhookRow> = diesel::sql_query(format!("{SELECT} WHERE id = $1"))
        .bind::<BigInt, _>(id)
        .load(&mut conn)
        .await?;
    Ok(rows.pop())
}

/// Deletes a receiver and its outbox and log. Returns whether it existed.
pub async fn delete_webhook(pool: &DbPool, id: i64) -> Result<bool, DbError> {
    let mut conn = pool.get().await?;
    let n = diesel::sql_query("DELETE FROM webhooks WHERE id = $1")
        .bind::<BigInt, _>(id)
        .execute(&mut conn)
        .await?;
    Ok(n > 0)
}

/// One outbox entry, as the delivery log shows it.
#[derive(Debug, Clone, QueryableByName)]
pub struct WebhookDeliveryRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = BigInt)]
    pub webhook_id: i64,
    #[diesel(sql_type = Text)]
    pub event_type: String,
    #[diesel(sql_type = BigInt)]
    pub event_id: i64,
    #[diesel(sql_type = Jsonb)]
    pub payload: Value,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    #[diesel(sql_type = Timestamptz)]
    pub next_attempt_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    pub response_status: Option<i32>,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub delivered_at: Option<DateTime<Utc>>,
}

/// A receiver's deliveries, newest first.
pub async fn list_deliveries(
    pool: &DbPool,
    webhook_id: i64,
    first: i64,
) -> Result<Vec<WebhookDeliveryRow>, DbError> {
    let mut conn = pool.get().await?;
    Ok(diesel::sql_query(
        "SELECT id, webhook_id, event_type, event_id, payload, status, attempts, next_attempt_at, last_error, \
         response_status, created_at, delivered_at FROM webhook_deliveries WHERE webhook_id = $1 \
         ORDER BY id DESC LIMIT $2",
    )
    .bind::<BigInt, _>(webhook_id)
    .bind::<BigInt, _>(first)
    .load(&mut conn)
    .await?)
}
