//! Scores as the scoring engine stored them: the current one (`health_current`), history
//! (`health_scores`) and "the score as of a moment" for 7- and 30-day changes. Read only.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Double, Integer, Json, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use serde::Deserialize;

use super::Result;
use crate::db::DbPool;

/// One entry of the stored `signals` array (the contract is in `scoring/mod.rs`). Unknown keys are
/// ignored and absent ones read as null / zero / false, so older and newer rows both read.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct Signal {
    #[serde(deserialize_with = "null_as_default")]
    pub key: String,
    #[serde(deserialize_with = "null_as_default")]
    pub label: String,
    pub value: Option<f64>,
    pub score: Option<f64>,
    #[serde(deserialize_with = "null_as_default")]
    pub weight: f64,
    #[serde(deserialize_with = "null_as_default")]
    pub contribution: f64,
    #[serde(deserialize_with = "null_as_default")]
    pub impact: f64,
    #[serde(deserialize_with = "null_as_default")]
    pub explanation: String,
    #[serde(deserialize_with = "null_as_default")]
    pub missing: bool,
    /// Set on `freshness:<kind>` entries: that kind of data is older than allowed.
    #[serde(deserialize_with = "null_as_default")]
    pub stale: bool,
}

/// An explicit JSON `null` reads like an absent key.
fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Parses a stored `signals` value; entries that are not objects of the expected shape are skipped
/// (and logged) rather than failing the whole score. The label, not stored since it follows from the
/// key, is filled in here.
pub fn parse_signals(value: &serde_json::Value) -> Vec<Signal> {
    let Some(items) = value.as_array() else {
        tracing::warn!("stored signals are not a JSON array; shown as none");
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| match Signal::deserialize(item) {
            Ok(mut s) => {
                if s.label.is_empty() {
                    s.label = crate::scoring::breakdown::label_for(&s.key);
                }
                Some(s)
            }
            Err(e) => {
                tracing::warn!(error = %e, "skipping a stored signal that does not parse");
                None
            }
        })
        .collect()
}

/// The signals that cost points, worst first: stale-data entries before everything else, then
/// entries with `impact > 0` by impact descending (the rule `scoring::engine::drivers` applies).
pub fn drivers(signals: &[Signal]) -> Vec<Signal> {
    let mut d: Vec<Signal> = signals
        .iter()
        .filter(|s| s.stale || s.impact > 0.0)
        .cloned()
        .collect();
    d.sort_by(|a, b| b.stale.cmp(&a.stale).then(b.impact.total_cmp(&a.impact)));
    d
}

/// One stored score with its parsed signals.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthRecord {
    pub account_id: i64,
    pub computed_at: DateTime<Utc>,
    pub score: f64,
    /// As stored: `healthy`, `at_risk` or `critical`.
    pub tier: String,
    pub stale: bool,
    pub model_version: i32,
    pub signals: Arc<Vec<Signal>>,
    /// The score before this one, if any.
    pub previous_score: Option<f64>,
}

#[derive(QueryableByName)]
struct HealthRow {
    #[diesel(sql_type = BigInt)]
    ord: i64,
    #[diesel(sql_type = BigInt)]
    account_id: i64,
    #[diesel(sql_type = Timestamptz)]
    computed_at: DateTime<Utc>,
    #[diesel(sql_type = Double)]
    score: f64,
    #[diesel(sql_type = Text)]
    tier: String,
    #[diesel(sql_type = Bool)]
    stale: bool,
    #[diesel(sql_type = Integer)]
    model_version: i32,
    #[diesel(sql_type = Json)]
    signals: serde_json::Value,
    #[diesel(sql_type = Nullable<Double>)]
    previous_score: Option<f64>,
}

impl HealthRow {
    fn into_record(self) -> (i64, HealthRecord) {
        let signals = Arc::new(parse_signals(&self.signals));
        (
            self.ord,
            HealthRecord {
                account_id: self.account_id,
                computed_at: self.computed_at,
                score: self.score,
                tier: self.tier,
                stale: self.stale,
                model_version: self.model_version,
                signals,
                previous_score: self.previous_score,
            },
        )
    }
}

/// The current score of each account that has one.
pub async fn current(pool: &DbPool, account_ids: &[i64]) -> Result<HashMap<i64, HealthRecord>> {
    if account_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let mut conn = pool.get().await?;
    let rows: Vec<HealthRow> = diesel::sql_query(
        "SELECT 0::bigint AS ord, account_id, computed_at, score, tier, stale, model_version, \
                coalesce(signals, '[]'::json) AS signals, previous_score \
         FROM current_health_scores WHERE account_id = ANY($1)",
    )
    .bind::<Array<BigInt>, _>(account_ids)
    .load(&mut conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let (_, rec) = r.into_record();
            (rec.account_id, rec)
        })
        .collect())
}

/// History since a moment, per `(account_id, since)` key, oldest first. `previous_score` of each row
/// is the row before it, also for the first row of the window.
pub async fn history(
    pool: &DbPool,
    keys: &[(i64, DateTime<Utc>)],
) -> Result<Vec<Vec<HealthRecord>>> {
    let mut out = vec![Vec::new(); keys.len()];
    if keys.is_empty() {
        return Ok(out);
    }
    let ids: Vec<i64> = keys.iter().map(|k| k.0).collect();
    let since: Vec<DateTime<Utc>> = keys.iter().map(|k| k.1).collect();
    let mut conn = pool.get().await?;
    let rows: Vec<HealthRow> = diesel::sql_query(
        "WITH k AS (SELECT * FROM unnest($1::bigint[], $2::timestamptz[]) WITH ORDINALITY AS k(account_id, since, ord)), \
         h AS ( \
           SELECT k.ord, s.account_id, s.computed_at, s.score, s.tier, s.stale, s.model_version, s.signals, \
                  lag(s.score) OVER (PARTITION BY k.ord ORDER BY s.computed_at) AS lag_score \
           FROM k JOIN health_scores s ON s.account_id = k.account_id AND s.computed_at >= k.since) \
         SELECT h.ord, h.account_id, h.computed_at, h.score, h.tier, h.stale, h.model_version, h.signals, \
                COALESCE(h.lag_score, (SELECT p.score FROM health_scores p \
                                       WHERE p.account_id = h.account_id AND p.computed_at < h.computed_at \
                                       ORDER BY p.computed_at DESC LIMIT 1)) AS previous_score \
         FROM h ORDER BY h.ord, h.computed_at",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<Timestamptz>, _>(since)
    .load(&mut conn)
    .await?;
    for row in rows {
        let (ord, rec) = row.into_record();
        if let Some(slot) = usize::try_from(ord - 1).ok().and_then(|i| out.get_mut(i)) {
            slot.push(rec);
        }
    }
    Ok(out)
}

#[derive(QueryableByName)]
struct ScoreAtRow {
    #[diesel(sql_type = BigInt)]
    ord: i64,
    #[diesel(sql_type = Double)]
    score: f64,
}

/// For each `(account_id, at)` key, the score of the latest history row at or before `at`.
pub async fn scores_at(pool: &DbPool, keys: &[(i64, DateTime<Utc>)]) -> Result<Vec<Option<f64>>> {
    let mut out = vec![None; keys.len()];
    if keys.is_empty() {
        return Ok(out);
    }
    let ids: Vec<i64> = keys.iter().map(|k| k.0).collect();
    let at: Vec<DateTime<Utc>> = keys.iter().map(|k| k.1).collect();
    let mut conn = pool.get().await?;
    let rows: Vec<ScoreAtRow> = diesel::sql_query(
        "SELECT k.ord, s.score \
         FROM unnest($1::bigint[], $2::timestamptz[]) WITH ORDINALITY AS k(account_id, at, ord) \
         JOIN LATERAL (SELECT p.score FROM health_scores p \
                       WHERE p.account_id = k.account_id AND p.computed_at <= k.at \
                       ORDER BY p.computed_at DESC LIMIT 1) s ON true",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<Timestamptz>, _>(at)
    .load(&mut conn)
    .await?;
    for row in rows {
        if let Some(slot) = usize::try_from(row.ord - 1)
            .ok()
            .and_then(|i| out.get_mut(i))
        {
            *slot = Some(row.score);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_tolerantly_and_drivers_are_worst_first() {
        let json = serde_json::json!([
            {"key": "login_recency", "label": "Login recency", "value": 21.0, "score": 0.2, "weight": 25.0,
             "contribution": 5.0, "impact": 20.0, "explanation": "No login in 21 days", "missing": false,
             "source": "usage", "details": {"days": 21}},
            {"key": "billing", "label": "Billing", "value": null, "score": null, "weight": 0.0,
             "contribution": 0.0, "impact": 0.0, "explanation": "No billing data", "missing": true},
            {"key": "support", "impact": 4.5, "weight": null, "explanation": null},
            {"key": "freshness:usage", "stale": true, "impact": 0.0, "explanation": "Usage data is 3 days old"},
            "not an object"
        ]);
        let signals = parse_signals(&json);
        assert_eq!(signals.len(), 4);
        assert_eq!(signals[0].value, Some(21.0));
        assert!(signals[1].missing && signals[1].score.is_none());
        assert_eq!(signals[2].label, "Support load", "derived from the key");
        let d: Vec<String> = drivers(&signals).into_iter().map(|s| s.key).collect();
        assert_eq!(d, ["freshness:usage", "login_recency", "support"]);
        assert!(parse_signals(&serde_json::json!({"a": 1})).is_empty());
    }
}
