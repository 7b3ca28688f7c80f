//! GraphQL for alerts (list, task workflow, feedback, rules), the score change feed (paging) and
//! webhooks (admin). Resolvers are thin: the work is in `crate::alerts`, `crate::feed` and
//! `crate::webhooks`.

use std::collections::HashSet;
use std::sync::Arc;

use async_graphql::{Context, Enum, InputObject, Json, Object, SimpleObject, ID};
use chrono::{DateTime, Utc};

use crate::accounts::health::parse_signals;
use crate::alerts::store::{
    self as alert_store, AlertFilterSpec, AlertRow, AlertStatus as StoredStatus,
};
use crate::alerts::{self, rules, AlertError};
use crate::app::AppState;
use crate::auth::{self, Role};
use crate::db::DbPool;
use crate::feed::{ScoreChangeFilterSpec, ScoreChangeRow};
use crate::webhooks::{self, store as webhook_store, WebhookError};

use super::accounts::{Account, HealthTier, PageInfo, SignalScore};
use super::errors::{bad_input, internal, not_found};

const DEFAULT_PAGE: i32 = 50;

fn page_size(ctx: &Context<'_>, first: Option<i32>) -> async_graphql::Result<i64> {
    let first = i64::from(first.unwrap_or(DEFAULT_PAGE));
    let max = ctx
        .data_opt::<AppState>()
        .map(|s| s.config.limits.max_page_size)
        .unwrap_or(500);
    if !(0..=max).contains(&first) {
        return Err(bad_input(format!(
            "`first` must be between 0 and {max}, got {first}"
        )));
    }
    Ok(first)
}

fn parse_id(id: &ID, what: &str) -> async_graphql::Result<i64> {
    id.parse::<i64>()
        .map_err(|_| bad_input(format!("`{}` is not a valid {what} id", id.as_str())))
}

fn alert_error(e: AlertError) -> async_graphql::Error {
    match e {
        AlertError::NotFound(_) => not_found(e.to_string()),
        e if e.is_client_error() => bad_input(e.to_string()),
        e => internal(e),
    }
}

fn webhook_error(e: WebhookError) -> async_graphql::Error {
    match e {
        WebhookError::NotFound(_) => not_found(e.to_string()),
        e if e.is_client_error() => bad_input(e.to_string()),
        e => internal(e),
    }
}

/// This process's `[alerts]` config section.
fn alerts_config<'a>(ctx: &Context<'a>) -> Option<&'a serde_json::Value> {
    ctx.data_opt::<AppState>().map(|s| &s.config.alerts)
}

/// Drivers stored with a score change or an alert, in the stored breakdown form.
fn signals(drivers: &serde_json::Value) -> Vec<SignalScore> {
    parse_signals(drivers)
        .iter()
        .map(SignalScore::from)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Alerts

/// Where an alert is in its life as a task.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(name = "AlertStatus")]
pub enum AlertStatusGql {
    Open,
    Acknowledged,
    Resolved,
    /// Hidden until `snoozedUntil`, then open again.
    Snoozed,
}

impl From<AlertStatusGql> for StoredStatus {
    fn from(s: AlertStatusGql) -> Self {
        match s {
            AlertStatusGql::Open => StoredStatus::Open,
            AlertStatusGql::Acknowledged => StoredStatus::Acknowledged,
            AlertStatusGql::Resolved => StoredStatus::Resolved,
            AlertStatusGql::Snoozed => StoredStatus::Snoozed,
        }
    }
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertSeverity {
    Info,
    Warning,
    Critical,
}

impl AlertSeverity {
    fn as_db(self) -> &'static str {
        match self {
            AlertSeverity::Info => "info",
            AlertSeverity::Warning => "warning",
            AlertSeverity::Critical => "critical",
        }
    }

    fn from_db(s: &str) -> AlertSeverity {
        match s {
            "critical" => AlertSeverity::Critical,
            "info" => AlertSeverity::Info,
            _ => AlertSeverity::Warning,
        }
    }
}

/// Which alerts to list or subscribe to; every given field must match.
#[derive(InputObject, Debug, Clone, Default)]
pub struct AlertFilter {
    pub account_keys: Option<Vec<String>>,
    pub statuses: Option<Vec<AlertStatusGql>>,
    /// Rule keys (`score_drop`, `no_login`...).
    pub rules: Option<Vec<String>>,
    pub severities: Option<Vec<AlertSeverity>>,
    pub assignee: Option<String>,
    /// The account owner when the alert was raised.
    pub owner: Option<String>,
}

impl From<AlertFilter> for AlertFilterSpec {
    fn from(f: AlertFilter) -> Self {
        AlertFilterSpec {
            account_keys: f.account_keys.map(|v| v.into_iter().collect()),
            statuses: f
                .statuses
                .map(|v| v.into_iter().map(StoredStatus::from).collect()),
            rules: f.rules.map(|v| v.into_iter().collect()),
            severities: f.severities.map(|v| {
                v.into_iter()
                    .map(|s| s.as_db().to_string())
                    .collect::<HashSet<_>>()
            }),
            assignee: f.assignee,
            owner: f.owner,
        }
    }
}

/// An alert: something about an account that needs a person, handled as a task.
#[derive(Clone)]
pub struct Alert(pub Arc<AlertRow>);

#[Object]
impl Alert {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }

    async fn account(&self, ctx: &Context<'_>) -> async_graphql::Result<Account> {
        Account::load(ctx, self.0.account_id)
            .await?
            .ok_or_else(|| not_found(format!("account {} no longer exists", self.0.account_id)))
    }

    /// The rule that raised it (see `alertRules`).
    async fn rule(&self) -> &str {
        &self.0.rule
    }

    async fn severity(&self) -> AlertSeverity {
        AlertSeverity::from_db(&self.0.severity)
    }

    async fn status(&self) -> AlertStatusGql {
        match StoredStatus::parse(&self.0.status) {
            Some(StoredStatus::Acknowledged) => AlertStatusGql::Acknowledged,
            Some(StoredStatus::Resolved) => AlertStatusGql::Resolved,
            Some(StoredStatus::Snoozed) => AlertStatusGql::Snoozed,
            _ => AlertStatusGql::Open,
        }
    }

    /// What happened, with the score's main drivers in plain words.
    async fn message(&self) -> &str {
        &self.0.message
    }

    /// The signals that cost the account points when the alert was raised, worst first.
    async fn drivers(&self) -> Vec<SignalScore> {
        signals(&self.0.drivers)
    }

    /// The measurements behind the alert (peak score, tier left, days without login...).
    async fn details(&self) -> Json<serde_json::Value> {
        Json(self.0.details.clone())
    }

    /// The account owner when the alert was raised.
    async fn owner(&self) -> Option<&str> {
        self.0.owner.as_deref()
    }

    async fn assignee(&self) -> Option<&str> {
        self.0.assignee.as_deref()
    }

    async fn due_at(&self) -> Option<DateTime<Utc>> {
        self.0.due_at
    }

    async fn snoozed_until(&self) -> Option<DateTime<Utc>> {
        self.0.snoozed_until
    }

    /// `true` useful, `false` a false alarm, null not rated.
    async fn useful(&self) -> Option<bool> {
        self.0.feedback.as_deref().map(|f| f == "useful")
    }

    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }

    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }

    async fn acknowledged_at(&self) -> Option<DateTime<Utc>> {
        self.0.acknowledged_at
    }

    async fn resolved_at(&self) -> Option<DateTime<Utc>> {
        self.0.resolved_at
    }

    /// `auto` when its condition cleared, else the name of the token that resolved it.
    async fn resolved_by(&self) -> Option<&str> {
        self.0.resolved_by.as_deref()
    }
}

#[derive(SimpleObject, Clone)]
pub struct AlertEdge {
    /// Pass as `after` to continue after this alert.
    pub cursor: String,
    pub node: Alert,
}

/// Alerts, newest first.
#[derive(SimpleObject)]
pub struct AlertConnection {
    pub total_count: i64,
    pub edges: Vec<AlertEdge>,
    pub nodes: Vec<Alert>,
    pub page_info: PageInfo,
}

/// A rule with its effective settings and how useful its alerts have been.
#[derive(SimpleObject)]
pub struct AlertRule {
    pub key: String,
    pub description: String,
    pub enabled: bool,
    pub severity: AlertSeverity,
    /// Hours after a resolution during which the rule does not alert again for that account.
    pub cooldown_hours: i32,
    /// Every tunable number of the rule, by name.
    pub params: Json<serde_json::Value>,
    /// `default`, `config` (the `[alerts]` file section) or `database` (changed with `updateAlertRule`).
    pub source: String,
    pub alert_count: i64,
    pub unresolved_count: i64,
    pub useful_count: i64,
    pub false_alarm_count: i64,
    /// Useful / (useful + false alarms); null before any feedback.
    pub precision: Option<f64>,
}

fn alert_rule(
    rule: &rules::AlertRuleSettings,
    stats: Option<&alert_store::RuleStats>,
) -> AlertRule {
    let stats = stats.cloned().unwrap_or_default();
    AlertRule {
        key: rule.key.clone(),
        description: rule.description.clone(),
        enabled: rule.enabled,
        severity: AlertSeverity::from_db(&rule.severity),
        cooldown_hours: rule.param("cooldown_hours") as i32,
        params: Json(serde_json::json!(rule.params)),
        source: match rule.source {
            rules::RuleSource::Default => "default",
            rules::RuleSource::Config => "config",
            rules::RuleSource::Database => "database",
        }
        .to_string(),
        alert_count: stats.total,
        unresolved_count: stats.unresolved,
        useful_count: stats.useful,
        false_alarm_count: stats.false_alarms,
        precision: stats.precision(),
    }
}

#[derive(InputObject)]
pub struct AlertRuleInput {
    pub enabled: Option<bool>,
    pub severity: Option<AlertSeverity>,
    /// Parameter values by name, e.g. `{"points": 15, "cooldown_hours": 48}`.
    pub params: Option<Json<serde_json::Value>>,
}

/// What `evaluateAlerts` did.
#[derive(SimpleObject)]
pub struct AlertEvaluation {
    pub raised: i64,
    pub resolved: i64,
    pub reopened: i64,
}

// ---------------------------------------------------------------------------------------------
// Score change feed

/// The account a score change is about (what the feed row carries; no extra query).
#[derive(SimpleObject, Clone)]
pub struct ScoreChangeAccount {
    pub id: ID,
    pub key: String,
    pub name: String,
}

/// One entry of the durable change feed: an account's score or tier changed.
#[derive(Clone)]
pub struct ScoreChange(pub Arc<ScoreChangeRow>);

#[Object]
impl ScoreChange {
    /// Increasing; pass as `after` to page or to resume a subscription.
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }

    async fn account(&self) -> ScoreChangeAccount {
        ScoreChangeAccount {
            id: ID(self.0.account_id.to_string()),
            key: self.0.account_key.clone(),
            name: self.0.account_name.clone(),
        }
    }

    async fn previous_score(&self) -> Option<f64> {
        self.0.previous_score
    }

    async fn score(&self) -> f64 {
        self.0.score
    }

    async fn previous_tier(&self) -> Option<HealthTier> {
        self.0
            .previous_tier
            .as_deref()
            .and_then(HealthTier::from_db)
    }

    async fn tier(&self) -> async_graphql::Result<HealthTier> {
        HealthTier::from_db(&self.0.tier)
            .ok_or_else(|| internal(format!("unknown tier `{}`", self.0.tier)))
    }

    /// Points lost (negative when the score rose).
    async fn drop(&self) -> f64 {
        self.0.points_lost()
    }

    /// The signals that cost points in the new score, worst first.
    async fn drivers(&self) -> Vec<SignalScore> {
        signals(&self.0.drivers)
    }

    async fn changed_at(&self) -> DateTime<Utc> {
        self.0.changed_at
    }
}

/// Which score changes to deliver; every given field must match.
#[derive(InputObject, Debug, Clone, Default)]
pub struct ScoreChangeFilter {
    pub account_keys: Option<Vec<String>>,
    /// The new tier.
    pub tiers: Option<Vec<HealthTier>>,
    /// Only changes that lost at least this many points.
    pub min_drop: Option<f64>,
}

impl From<ScoreChangeFilter> for ScoreChangeFilterSpec {
    fn from(f: ScoreChangeFilter) -> Self {
        ScoreChangeFilterSpec {
            account_keys: f.account_keys.map(|v| v.into_iter().collect()),
            tiers: f
                .tiers
                .map(|v| v.into_iter().map(|t| t.as_db().to_string()).collect()),
            min_drop: f.min_drop,
        }
    }
}

#[derive(SimpleObject, Clone)]
pub struct ScoreChangeEdge {
    pub cursor: String,
    pub node: ScoreChange,
}

/// Score changes, oldest first.
#[derive(SimpleObject)]
pub struct ScoreChangeConnection {
    pub edges: Vec<ScoreChangeEdge>,
    pub nodes: Vec<ScoreChange>,
    pub page_info: PageInfo,
}

// ---------------------------------------------------------------------------------------------
// Webhooks

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WebhookFormat {
    /// The event as JSON.
    #[default]
    Json,
    /// `{"text": "..."}`, for a Slack incoming webhook.
    Slack,
}

/// A registered receiver. Its secret is never shown after creation.
pub struct Webhook(webhook_store::WebhookRow);

#[Object]
impl Webhook {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn url(&self) -> &str {
        &self.0.url
    }
    /// `alert.raised`, `score.changed`.
    async fn events(&self) -> &[String] {
        &self.0.events
    }
    /// `accountKeys`, `tiers`, `minDrop` (score changes), `rules`, `severities` (alerts).
    async fn filter(&self) -> Json<serde_json::Value> {
        Json(self.0.filter.clone())
    }
    async fn format(&self) -> WebhookFormat {
        if self.0.format == "slack" {
            WebhookFormat::Slack
        } else {
            WebhookFormat::Json
        }
    }
    async fn enabled(&self) -> bool {
        self.0.enabled
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

#[derive(InputObject)]
pub struct CreateWebhookInput {
    /// Unique.
    pub name: String,
    pub url: String,
    /// Key of the `X-Healthd-Signature` HMAC (at least 8 characters).
    pub secret: String,
    /// Default: all (`alert.raised`, `score.changed`).
    pub events: Option<Vec<String>>,
    pub filter: Option<Json<serde_json::Value>>,
    pub format: Option<WebhookFormat>,
}

/// One outbox entry and how its delivery went.
#[derive(SimpleObject)]
pub struct WebhookDelivery {
    pub id: ID,
    pub event: String,
    /// Id of the alert or score change.
    pub event_id: ID,
    /// PENDING, DELIVERED or FAILED (gave up after the maximum attempts).
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub response_status: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub payload: Json<serde_json::Value>,
}

impl From<webhook_store::WebhookDeliveryRow> for WebhookDelivery {
    fn from(d: webhook_store::WebhookDeliveryRow) -> Self {
        WebhookDelivery {
            id: ID(d.id.to_string()),
            event: d.event_type,
            event_id: ID(d.event_id.to_string()),
            next_attempt_at: (d.status == "pending").then_some(d.next_attempt_at),
            status: d.status.to_ascii_uppercase(),
            attempts: d.attempts,
            last_error: d.last_error,
            response_status: d.response_status,
            created_at: d.created_at,
            delivered_at: d.delivered_at,
            payload: Json(d.payload),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Roots

#[derive(Default)]
pub struct AlertsQuery;

#[Object]
impl AlertsQuery {
    /// Alerts, newest first.
    async fn alerts(
        &self,
        ctx: &Context<'_>,
        filter: Option<AlertFilter>,
        first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<AlertConnection> {
        auth::require(ctx, Role::Viewer)?;
        let first = page_size(ctx, first)?;
        let before = after
            .as_deref()
            .map(|c| {
                c.parse::<i64>()
                    .map_err(|_| bad_input(format!("invalid cursor `{c}`")))
            })
            .transpose()?;
        let spec = AlertFilterSpec::from(filter.unwrap_or_default());
        let (rows, has_next, total) =
            alert_store::list_alerts(ctx.data::<DbPool>()?, &spec, before, first)
                .await
                .map_err(internal)?;
        let nodes: Vec<Alert> = rows.into_iter().map(|r| Alert(Arc::new(r))).collect();
        let edges: Vec<AlertEdge> = nodes
            .iter()
            .map(|n| AlertEdge {
                cursor: n.0.id.to_string(),
                node: n.clone(),
            })
            .collect();
        Ok(AlertConnection {
            total_count: total,
            page_info: PageInfo {
                has_next_page: has_next,
                has_previous_page: before.is_some(),
                start_cursor: edges.first().map(|e| e.cursor.clone()),
                end_cursor: edges.last().map(|e| e.cursor.clone()),
            },
            edges,
            nodes,
        })
    }

    async fn alert(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Alert>> {
        auth::require(ctx, Role::Viewer)?;
        let id = parse_id(&id, "alert")?;
        let row = alert_store::get_alert(ctx.data::<DbPool>()?, id)
            .await
            .map_err(internal)?;
        Ok(row.map(|r| Alert(Arc::new(r))))
    }

    /// Every rule with its effective settings and its precision from feedback.
    async fn alert_rules(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<AlertRule>> {
        auth::require(ctx, Role::Viewer)?;
        let pool = ctx.data::<DbPool>()?;
        let set = rules::load(pool, alerts_config(ctx))
            .await
            .map_err(alert_error)?;
        let stats = alert_store::rule_stats(pool).await.map_err(internal)?;
        Ok(set
            .rules
            .iter()
            .map(|r| alert_rule(r, stats.get(&r.key)))
            .collect())
    }

    /// The durable change feed, oldest first: pass the last `id` (or `endCursor`) as `after`.
    async fn score_changes(
        &self,
        ctx: &Context<'_>,
        after: Option<ID>,
        first: Option<i32>,
    ) -> async_graphql::Result<ScoreChangeConnection> {
        auth::require(ctx, Role::Viewer)?;
        let first = page_size(ctx, first)?;
        let after_id = after
            .as_ref()
            .map(|a| parse_id(a, "score change"))
            .transpose()?;
        let mut rows = crate::feed::score_changes_after(
            ctx.data::<DbPool>()?,
            after_id.unwrap_or(0),
            first + 1,
        )
        .await
        .map_err(internal)?;
        let has_next = rows.len() as i64 > first;
        rows.truncate(first as usize);
        let nodes: Vec<ScoreChange> = rows.into_iter().map(|r| ScoreChange(Arc::new(r))).collect();
        let edges: Vec<ScoreChangeEdge> = nodes
            .iter()
            .map(|n| ScoreChangeEdge {
                cursor: n.0.id.to_string(),
                node: n.clone(),
            })
            .collect();
        Ok(ScoreChangeConnection {
            page_info: PageInfo {
                has_next_page: has_next,
                has_previous_page: after_id.is_some_and(|a| a > 0),
                start_cursor: edges.first().map(|e| e.cursor.clone()),
                end_cursor: edges.last().map(|e| e.cursor.clone()),
            },
            edges,
            nodes,
        })
    }

    /// Registered webhook receivers (admin).
    async fn webhooks(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Webhook>> {
        auth::require(ctx, Role::Admin)?;
        let rows = webhook_store::list_webhooks(ctx.data::<DbPool>()?)
            .await
            .map_err(internal)?;
        Ok(rows.into_iter().map(Webhook).collect())
    }

    /// A receiver's delivery log, newest first (admin).
    async fn webhook_deliveries(
        &self,
        ctx: &Context<'_>,
        webhook_id: ID,
        first: Option<i32>,
    ) -> async_graphql::Result<Vec<WebhookDelivery>> {
        auth::require(ctx, Role::Admin)?;
        let first = page_size(ctx, first)?;
        let id = parse_id(&webhook_id, "webhook")?;
        let rows = webhook_store::list_deliveries(ctx.data::<DbPool>()?, id, first)
            .await
            .map_err(internal)?;
        Ok(rows.into_iter().map(WebhookDelivery::from).collect())
    }
}

#[derive(Default)]
pub struct AlertsMutation;

#[Object]
impl AlertsMutation {
    /// open or snoozed -> acknowledged (editor).
    async fn acknowledge_alert(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Alert> {
        let viewer = auth::require(ctx, Role::Editor)?;
        let id = parse_id(&id, "alert")?;
        let row = alert_store::acknowledge(ctx.data::<DbPool>()?, id, &viewer.name)
            .await
            .map_err(alert_error)?;
        Ok(Alert(Arc::new(row)))
    }

    /// Marks the alert resolved (editor).
    async fn resolve_alert(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Alert> {
        let viewer = auth::require(ctx, Role::Editor)?;
        let id = parse_id(&id, "alert")?;
        let row = alert_store::resolve(ctx.data::<DbPool>()?, id, &viewer.name)
            .await
            .map_err(alert_error)?;
        Ok(Alert(Arc::new(row)))
    }

    /// Hides the alert until `until`; it is open again then (editor).
    async fn snooze_alert(
        &self,
        ctx: &Context<'_>,
        id: ID,
        until: DateTime<Utc>,
    ) -> async_graphql::Result<Alert> {
        auth::require(ctx, Role::Editor)?;
        let id = parse_id(&id, "alert")?;
        let row = alert_store::snooze(ctx.data::<DbPool>()?, id, until)
            .await
            .map_err(alert_error)?;
        Ok(Alert(Arc::new(row)))
    }

    /// Sets the assignee and due date (null clears them) (editor).
    async fn assign_alert(
        &self,
        ctx: &Context<'_>,
        id: ID,
        assignee: Option<String>,
        due_at: Option<DateTime<Utc>>,
    ) -> async_graphql::Result<Alert> {
        auth::require(ctx, Role::Editor)?;
        let id = parse_id(&id, "alert")?;
        let assignee = assignee
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty());
        let row = alert_store::assign(ctx.data::<DbPool>()?, id, assignee, due_at)
            .await
            .map_err(alert_error)?;
        Ok(Alert(Arc::new(row)))
    }

    /// Feedback for the rule's precision: was this alert useful? (editor)
    async fn alert_feedback(
        &self,
        ctx: &Context<'_>,
        id: ID,
        useful: bool,
    ) -> async_graphql::Result<Alert> {
        let viewer = auth::require(ctx, Role::Editor)?;
        let id = parse_id(&id, "alert")?;
        let row = alert_store::feedback(ctx.data::<DbPool>()?, id, useful, &viewer.name)
            .await
            .map_err(alert_error)?;
        Ok(Alert(Arc::new(row)))
    }

    /// Same as `alertFeedback(id, useful: true)`.
    async fn mark_alert_useful(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Alert> {
        self.alert_feedback(ctx, id, true).await
    }

    /// Same as `alertFeedback(id, useful: false)`.
    async fn mark_alert_false_alarm(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<Alert> {
        self.alert_feedback(ctx, id, false).await
    }

    /// Changes a rule's settings; stored, they win over the config file (admin).
    async fn update_alert_rule(
        &self,
        ctx: &Context<'_>,
        key: String,
        input: AlertRuleInput,
    ) -> async_graphql::Result<AlertRule> {
        auth::require(ctx, Role::Admin)?;
        let pool = ctx.data::<DbPool>()?;
        let params = match input.params.map(|j| j.0) {
            None | Some(serde_json::Value::Null) => serde_json::Map::new(),
            Some(serde_json::Value::Object(m)) => m,
            Some(_) => return Err(bad_input("`params` must be an object of numbers")),
        };
        let update = rules::RuleUpdate {
            enabled: input.enabled,
            severity: input.severity.map(|s| s.as_db().to_string()),
            params,
        };
        let rule = rules::update_rule(pool, alerts_config(ctx), &key, &update)
            .await
            .map_err(alert_error)?;
        let stats = alert_store::rule_stats(pool).await.map_err(internal)?;
        Ok(alert_rule(&rule, stats.get(&rule.key)))
    }

    /// Evaluates every rule for every account now (admin; it also runs after scoring and periodically).
    async fn evaluate_alerts(&self, ctx: &Context<'_>) -> async_graphql::Result<AlertEvaluation> {
        auth::require(ctx, Role::Admin)?;
        let s = alerts::evaluate_with(
            ctx.data::<DbPool>()?,
            &alerts::AlertScope::All,
            alerts_config(ctx),
        )
        .await
        .map_err(alert_error)?;
        Ok(AlertEvaluation {
            raised: s.raised,
            resolved: s.resolved,
            reopened: s.reopened,
        })
    }

    /// Registers a webhook receiver (admin).
    async fn create_webhook(
        &self,
        ctx: &Context<'_>,
        input: CreateWebhookInput,
    ) -> async_graphql::Result<Webhook> {
        auth::require(ctx, Role::Admin)?;
        let new = webhooks::NewWebhook {
            name: input.name,
            url: input.url,
            secret: input.secret,
            events: input.events.unwrap_or_default(),
            filter: input.filter.map(|j| j.0).unwrap_or(serde_json::Value::Null),
            format: match input.format.unwrap_or_default() {
                WebhookFormat::Json => "json".into(),
                WebhookFormat::Slack => "slack".into(),
            },
        };
        let row = webhook_store::create_webhook(ctx.data::<DbPool>()?, new)
            .await
            .map_err(webhook_error)?;
        Ok(Webhook(row))
    }

    /// Removes a receiver with its pending deliveries and log (admin). False when it did not exist.
    async fn delete_webhook(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<bool> {
        auth::require(ctx, Role::Admin)?;
        let id = parse_id(&id, "webhook")?;
        webhook_store::delete_webhook(ctx.data::<DbPool>()?, id)
            .await
            .map_err(internal)
    }
}

/// `Account.alerts`: the account's unresolved alerts, newest first (plus resolved ones when asked).
pub async fn account_alerts(
    ctx: &Context<'_>,
    account_id: i64,
    include_resolved: bool,
) -> async_graphql::Result<Vec<Alert>> {
    auth::require(ctx, Role::Viewer)?;
    let loader = super::alerts::alerts_loader(ctx)?;
    let rows = loader
        .load_one((account_id, include_resolved))
        .await
        .map_err(|e| internal(e.as_ref()))?
        .unwrap_or_default();
    Ok(rows.into_iter().map(|r| Alert(Arc::new(r))).collect())
}

/// Batches `Account.alerts` over a page of accounts: one query per distinct `includeResolved`.
pub struct AccountAlertsLoader {
    pool: DbPool,
}

impl async_graphql::dataloader::Loader<(i64, bool)> for AccountAlertsLoader {
    type Value = Vec<AlertRow>;
    type Error = Arc<crate::db::DbError>;

    async fn load(
        &self,
        keys: &[(i64, bool)],
    ) -> Result<std::collections::HashMap<(i64, bool), Vec<AlertRow>>, Self::Error> {
        let mut out = std::collections::HashMap::new();
        for include_resolved in [false, true] {
            let ids: Vec<i64> = keys
                .iter()
                .filter(|k| k.1 == include_resolved)
                .map(|k| k.0)
                .collect();
            if ids.is_empty() {
                continue;
            }
            let map = alert_store::alerts_for_accounts(&self.pool, &ids, include_resolved)
                .await
                .map_err(Arc::new)?;
            for id in ids {
                out.insert(
                    (id, include_resolved),
                    map.get(&id).cloned().unwrap_or_default(),
                );
            }
        }
        Ok(out)
    }
}

pub type AccountAlertsDataLoader = async_graphql::dataloader::DataLoader<AccountAlertsLoader>;

/// A loader to attach to each request (`request.data(new_alerts_loader(pool))`) so
/// `Account.alerts` over a page of accounts is one query.
pub fn new_alerts_loader(pool: &DbPool) -> Arc<AccountAlertsDataLoader> {
    Arc::new(async_graphql::dataloader::DataLoader::new(
        AccountAlertsLoader { pool: pool.clone() },
        tokio::spawn,
    ))
}

/// The request's `Account.alerts` loader; without one attached, a loader per field (correct,
/// not batched).
pub fn alerts_loader(ctx: &Context<'_>) -> async_graphql::Result<Arc<AccountAlertsDataLoader>> {
    if let Some(loader) = ctx.data_opt::<Arc<AccountAlertsDataLoader>>() {
        return Ok(loader.clone());
    }
    Ok(new_alerts_loader(ctx.data::<DbPool>()?))
}
