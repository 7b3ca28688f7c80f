//! Reading alerts and the task workflow (acknowledge, resolve, snooze, assign, feedback).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Jsonb, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use super::AlertError;
use crate::db::{DbError, DbPool};

/// An alert with its account's key and name.
#[derive(Debug, Clone, QueryableByName)]
pub struct AlertRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = BigInt)]
    pub account_id: i64,
    #[diesel(sql_type = Text)]
    pub account_key: String,
    #[diesel(sql_type = Text)]
    pub account_name: String,
    #[diesel(sql_type = Text)]
    pub rule: String,
    #[diesel(sql_type = Text)]
    pub severity: String,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Text)]
    pub message: String,
    #[diesel(sql_type = Jsonb)]
    pub drivers: serde_json::Value,
    #[diesel(sql_type = Jsonb)]
    pub details: serde_json::Value,
    #[diesel(sql_type = Nullable<Text>)]
    pub owner: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub assignee: Option<String>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub due_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub snoozed_until: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    pub feedback: Option<String>,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    pub updated_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub acknowledged_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub resolved_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    pub resolved_by: Option<String>,
}

const SELECT: &str = "SELECT al.id, al.account_id, a.key AS account_key, a.name AS account_name, al.rule, \
    al.severity, al.status, al.message, al.drivers, al.details, al.owner, al.assignee, al.due_at, \
    al.snoozed_until, al.feedback, al.created_at, al.updated_at, al.acknowledged_at, al.resolved_at, \
    al.resolved_by FROM alerts al JOIN accounts a ON a.id = al.account_id";

/// Task states; stored lower-case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertStatus {
    Open,
    Acknowledged,
    Resolved,
    Snoozed,
}

impl AlertStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Open => "open",
            AlertStatus::Acknowledged => "acknowledged",
            AlertStatus::Resolved => "resolved",
            AlertStatus::Snoozed => "snoozed",
        }
    }

    pub fn parse(s: &str) -> Option<AlertStatus> {
        match s {
            "open" => Some(AlertStatus::Open),
            "acknowledged" => Some(AlertStatus::Acknowledged),
            "resolved" => Some(AlertStatus::Resolved),
            "snoozed" => Some(AlertStatus::Snoozed),
            _ => None,
        }
    }
}

/// Which alerts a list or a subscriber wants. `None` means "any".
#[derive(Debug, Clone, Default)]
pub struct AlertFilterSpec {
    pub account_keys: Option<HashSet<String>>,
    pub statuses: Option<HashSet<AlertStatus>>,
    pub rules: Option<HashSet<String>>,
    /// Lower-case severities.
    pub severities: Option<HashSet<String>>,
    pub assignee: Option<String>,
    pub owner: Option<String>,
}

impl AlertFilterSpec {
    pub fn matches(&self, row: &AlertRow) -> bool {
        self.account_keys
            .as_ref()
            .is_none_or(|k| k.contains(&row.account_key))
            && self
                .statuses
                .as_ref()
                .is_none_or(|s| AlertStatus::parse(&row.status).is_some_and(|st| s.contains(&st)))
            && self.rules.as_ref().is_none_or(|r| r.contains(&row.rule))
            && self
                .severities
                .as_ref()
                .is_none_or(|s| s.contains(&row.severity))
            && self
                .assignee
                .as_ref()
                .is_none_or(|a| row.assignee.as_ref() == Some(a))
            && self
                .owner
                .as_ref()
                .is_none_or(|o| row.owner.as_ref() == Some(o))
    }

    fn sql_arrays(&self) -> [Option<Vec<String>>; 4] {
        let to_vec =
            |s: &Option<HashSet<String>>| s.as_ref().map(|s| s.iter().cloned().collect::<Vec<_>>());
        [
            to_vec(&self.account_keys),
            self.statuses
                .as_ref()
                .map(|s| s.iter().map(|st| st.as_str().to_string()).collect()),
            to_vec(&self.rules),
            to_vec(&self.severities),
        ]
    }
}

const FILTER_WHERE: &str = "($1::text[] IS NULL OR a.key = ANY($1)) AND ($2::text[] IS NULL OR al.status = ANY($2)) \
    AND ($3::text[] IS NULL OR al.rule = ANY($3)) AND ($4::text[] IS NULL OR al.severity = ANY($4)) \
    AND ($5::text IS NULL OR al.assignee = $5) AND ($6::text IS NULL OR al.owner = $6)";

/// Alerts raised after `after`, oldest first (the feed order).
pub async fn alerts_after(pool: &DbPool, after: i64, limit: i64) -> Result<Vec<AlertRow>, DbError> {
    let mut conn = pool.get().await?;
    Ok(
        diesel::sql_query(format!("{SELECT} WHERE al.id > $1 ORDER BY al.id LIMIT $2"))
            .bind::<BigInt, _>(after)
            .bind::<BigInt, _>(limit)
            .load(&mut conn)
            .await?,
    )
}

/// The newest alert id (0 when there is none).
pub async fn latest_alert_id(pool: &DbPool) -> Result<i64, DbError> {
    #[derive(QueryableByName)]
    struct Latest {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let mut conn = pool.get().await?;
    let latest: Latest = diesel::sql_query("SELECT coalesce(max(id), 0)::bigint AS id FROM alerts")
        .get_result(&mut conn)
        .await?;
    Ok(latest.id)
}

/// One page of alerts, newest first: rows with `id < before` (the cursor), whether more follow,
/// and the total matching the filter.
pub async fn list_alerts(
    pool: &DbPool,
    filter: &AlertFilterSpec,
    before: Option<i64>,
    first: i64,
) -> Result<(Vec<AlertRow>, bool, i64), DbError> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let [keys, statuses, rules, severities] = filter.sql_arrays();
    let mut conn = pool.get().await?;
    let mut rows: Vec<AlertRow> = diesel::sql_query(format!(
        "{SELECT} WHERE {FILTER_WHERE} AND ($7::bigint IS NULL OR al.id < $7) ORDER BY al.id DESC LIMIT $8"
    ))
    .bind::<Nullable<Array<Text>>, _>(keys.clone())
    .bind::<Nullable<Array<Text>>, _>(statuses.clone())
    .bind::<Nullable<Array<Text>>, _>(rules.clone())
    .bind::<Nullable<Array<Text>>, _>(severities.clone())
    .bind::<Nullable<Text>, _>(filter.assignee.clone())
    .bind::<Nullable<Text>, _>(filter.owner.clone())
    .bind::<Nullable<BigInt>, _>(before)
    .bind::<BigInt, _>(first + 1)
    .load(&mut conn)
    .await?;
    let has_next = rows.len() as i64 > first;
    rows.truncate(first.max(0) as usize);
    let total: Count = diesel::sql_query(format!(
        "SELECT count(*)::bigint AS n FROM alerts al JOIN accounts a ON a.id = al.account_id WHERE {FILTER_WHERE}"
    ))
    .bind::<Nullable<Array<Text>>, _>(keys)
    .bind::<Nullable<Array<Text>>, _>(statuses)
    .bind::<Nullable<Array<Text>>, _>(rules)
    .bind::<Nullable<Array<Text>>, _>(severities)
    .bind::<Nullable<Text>, _>(filter.assignee.clone())
    .bind::<Nullable<Text>, _>(filter.owner.clone())
    .get_result(&mut conn)
    .await?;
    Ok((rows, has_next, total.n))
}

pub async fn get_alert(pool: &DbPool, id: i64) -> Result<Option<AlertRow>, DbError> {
    let mut conn = pool.get().await?;
    let mut rows: Vec<AlertRow> = diesel::sql_query(format!("{SELECT} WHERE al.id = $1"))
        .bind::<BigInt, _>(id)
        .load(&mut conn)
        .await?;
    Ok(rows.pop())
}

/// The alerts of many accounts at once (for `Account.alerts`), newest first per account.
/// Resolved alerts are included only when `include_resolved`.
pub async fn alerts_for_accounts(
    pool: &DbPool,
    account_ids: &[i64],
    include_resolved: bool,
) -> Result<HashMap<i64, Vec<AlertRow>>, DbError> {
    let mut conn = pool.get().await?;
    let rows: Vec<AlertRow> = diesel::sql_query(format!(
        "{SELECT} WHERE al.account_id = ANY($1) AND ($2 OR al.status <> 'resolved') ORDER BY al.account_id, al.id DESC"
    ))
    .bind::<Array<BigInt>, _>(account_ids)
    .bind::<Bool, _>(include_resolved)
    .load(&mut conn)
    .await?;
    let mut map: HashMap<i64, Vec<AlertRow>> = HashMap::new();
    for row in rows {
        map.entry(row.account_id).or_default().push(row);
    }
    Ok(map)
}

/// Runs a status change guarded by the states it is allowed from; tells "no such alert" apart
/// from "not allowed now".
async fn transition(
    pool: &DbPool,
    id: i64,
    action: &'static str,
    sql: &str,
    bind_text: Option<String>,
    bind_time: Option<DateTime<Utc>>,
) -> Result<AlertRow, AlertError> {
    #[derive(QueryableByName)]
    struct Changed {
        #[diesel(sql_type = BigInt)]
        #[allow(dead_code)]
        id: i64,
    }
    let mut conn = pool.get().await.map_err(DbError::from)?;
    let changed: Vec<Changed> = diesel::sql_query(sql)
        .bind::<BigInt, _>(id)
        .bind::<Nullable<Text>, _>(bind_text)
        .bind::<Nullable<Timestamptz>, _>(bind_time)
        .load(&mut conn)
        .await?;
    drop(conn);
    let row = get_alert(pool, id).await?.ok_or(AlertError::NotFound(id))?;
    if changed.is_empty() {
        return Err(AlertError::InvalidTransition {
            id,
            from: row.status.clone(),
            action,
        });
    }
    Ok(row)
}

/// open/snoozed -> acknowledged (acknowledging twice is harmless).
pub async fn acknowledge(pool: &DbPool, id: i64, by: &str) -> Result<AlertRow, AlertError> {
    transition(
        pool,
        id,
        "acknowledged",
        "UPDATE alerts SET status = 'acknowledged', acknowledged_at = coalesce(acknowledged_at, now()), \
         snoozed_until = NULL, assignee = coalesce(assignee, $2), updated_at = now() \
         WHERE id = $1 AND status IN ('open', 'snoozed', 'acknowledged') RETURNING id",
        Some(by.to_string()),
        None,
    )
    .await
}

/// Any unresolved state -> resolved.
pub async fn resolve(pool: &DbPool, id: i64, by: &str) -> Result<AlertRow, AlertError> {
    transition(
        pool,
        id,
        "resolved",
        "UPDATE alerts SET status = 'resolved', resolved_at = now(), resolved_by = $2, snoozed_until = NULL, \
         updated_at = now() WHERE id = $1 AND status <> 'resolved' RETURNING id",
        Some(by.to_string()),
        None,
    )
    .await
}

/// Any unresolved state -> snoozed until `until` (in the future); it reopens then.
pub async fn snooze(pool: &DbPool, id: i64, until: DateTime<Utc>) -> Result<AlertRow, AlertError> {
    if until <= Utc::now() {
        return Err(AlertError::InvalidInput(format!(
            "snooze until {until} is not in the future"
        )));
    }
    transition(
        pool,
        id,
        "snoozed",
        "UPDATE alerts SET status = 'snoozed', snoozed_until = $3, updated_at = now() \
         WHERE id = $1 AND status <> 'resolved' RETURNING id",
        None,
        Some(until),
    )
    .await
}

/// Sets (or clears, with `None`) the assignee and the due date of an unresolved alert.
pub async fn assign(
    pool: &DbPool,
    id: i64,
    assignee: Option<String>,
    due_at: Option<DateTime<Utc>>,
) -> Result<AlertRow, AlertError> {
    transition(
        pool,
        id,
        "assigned",
        "UPDATE alerts SET assignee = $2, due_at = $3, updated_at = now() \
         WHERE id = $1 AND status <> 'resolved' RETURNING id",
        assignee,
        due_at,
    )
    .await
}

/// Records whether the alert was useful or a false alarm (any state; may be changed later).
pub async fn feedback(
    pool: &DbPool,
    id: i64,
    useful: bool,
    by: &str,
) -> Result<AlertRow, AlertError> {
    let mut conn = pool.get().await.map_err(DbError::from)?;
    let n = diesel::sql_query(
        "UPDATE alerts SET feedback = $2, feedback_by = $3, feedback_at = now(), updated_at = now() WHERE id = $1",
    )
    .bind::<BigInt, _>(id)
    .bind::<Text, _>(if useful { "useful" } else { "false_alarm" })
    .bind::<Text, _>(by)
    .execute(&mut conn)
    .await?;
    drop(conn);
    if n == 0 {
        return Err(AlertError::NotFound(id));
    }
    get_alert(pool, id).await?.ok_or(AlertError::NotFound(id))
}

/// Per-rule counts: how many alerts, how many unresolved, and the feedback they got.
#[derive(Debug, Clone, Default, QueryableByName)]
pub struct RuleStats {
    #[diesel(sql_type = Text)]
    pub rule: String,
    #[diesel(sql_type = BigInt)]
    pub total: i64,
    #[diesel(sql_type = BigInt)]
    pub unresolved: i64,
    #[diesel(sql_type = BigInt)]
    pub useful: i64,
    #[diesel(sql_type = BigInt)]
    pub false_alarms: i64,
}

impl RuleStats {
    /// Share of rated alerts that were useful; `None` before any feedback.
    pub fn precision(&self) -> Option<f64> {
        let rated = self.useful + self.false_alarms;
        (rated > 0).then(|| self.useful as f64 / rated as f64)
    }
}

pub async fn rule_stats(pool: &DbPool) -> Result<HashMap<String, RuleStats>, DbError> {
    let mut conn = pool.get().await?;
    let rows: Vec<RuleStats> = diesel::sql_query(
        "SELECT rule, count(*)::bigint AS total, count(*) FILTER (WHERE status <> 'resolved')::bigint AS unresolved, \
         count(*) FILTER (WHERE feedback = 'useful')::bigint AS useful, \
         count(*) FILTER (WHERE feedback = 'false_alarm')::bigint AS false_alarms \
         FROM alerts GROUP BY rule",
    )
    .load(&mut conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.rule.clone(), r)).collect())
}
