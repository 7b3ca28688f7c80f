//! `healthChange`: how many points each signal added or cost between two moments, and how much of
//! the change came from a new model rather than from the customer's behaviour.
//!
//! Method: the stored history rows at (or just before) both moments give the total change and the
//! per-signal change of contributions. When the two rows were made by different model versions, the
//! account's inputs as of the `from` row are re-scored with both models (the same pure engine):
//! `model effect = score(from inputs, to model) − score(from inputs, from model)`; the rest of the
//! change is behaviour. Per signal likewise.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Double, Integer, Json, Timestamptz};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use super::breakdown;
use super::engine::score_account;
use super::model;
use super::run::run_context;
use super::signals::SignalKey;
use super::{inputs, ScoringError};
use crate::accounts::health::parse_signals;
use crate::db::DbPool;

/// The change of an account's score between two moments.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthChange {
    pub account_id: i64,
    /// The moments asked for (`to` defaults to now).
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The stored scores compared: the latest at or before each moment (for `from`, the first score
    /// ever when the account had none yet).
    pub from_computed_at: DateTime<Utc>,
    pub to_computed_at: DateTime<Utc>,
    pub score_from: f64,
    pub score_to: f64,
    pub delta: f64,
    /// "−14: usage −9, tickets −5".
    pub summary: String,
    pub model_changed: bool,
    pub model_version_from: i32,
    pub model_version_to: i32,
    /// Points due to the change of model (0 when the model did not change).
    pub model_effect: f64,
    /// Points due to the customer's data.
    pub behaviour_effect: f64,
    /// Per signal, largest change first.
    pub signals: Vec<SignalDelta>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SignalDelta {
    pub key: String,
    pub label: String,
    /// Contribution at `to` minus contribution at `from`.
    pub delta: f64,
    pub model_delta: f64,
    pub behaviour_delta: f64,
    pub contribution_from: f64,
    pub contribution_to: f64,
    pub explanation_from: Option<String>,
    pub explanation_to: Option<String>,
}

/// The `from` inputs re-scored: (score under the `from` model, under the `to` model, per-signal
/// contributions under each).
type Recomputed = (f64, f64, BTreeMap<String, (f64, f64)>);

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Timestamptz)]
    computed_at: DateTime<Utc>,
    #[diesel(sql_type = Double)]
    score: f64,
    #[diesel(sql_type = Integer)]
    model_version: i32,
    #[diesel(sql_type = Json)]
    signals: serde_json::Value,
}

fn fmt_points(x: f64) -> String {
    let r = x.round() as i64;
    match r.cmp(&0) {
        std::cmp::Ordering::Less => format!("\u{2212}{}", -r),
        std::cmp::Ordering::Greater => format!("+{r}"),
        std::cmp::Ordering::Equal => "0".into(),
    }
}

fn short_name(key: &str, label: &str) -> String {
    if let Some(k) = SignalKey::parse(key) {
        return k.short().into();
    }
    if key.starts_with(breakdown::OVERRIDE_PREFIX) {
        return "cap".into();
    }
    label.to_lowercase()
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The change of `account_id`'s score between `from` and `to` (now when `None`). `Ok(None)` when the
/// account has never been scored (or not by `to`).
pub async fn health_change(
    pool: &DbPool,
    account_id: i64,
    from: DateTime<Utc>,
    to: Option<DateTime<Utc>>,
) -> Result<Option<HealthChange>, ScoringError> {
    let to_moment = to.unwrap_or_else(Utc::now);
    let mut conn = pool.get().await?;
    let at_or_before = "SELECT computed_at, score, model_version, signals FROM health_scores
                        WHERE account_id = $1 AND computed_at <= $2 ORDER BY computed_at DESC LIMIT 1";
    let mut from_row: Option<Row> = diesel::sql_query(at_or_before)
        .bind::<BigInt, _>(account_id)
        .bind::<Timestamptz, _>(from)
        .load(&mut conn)
        .await?
        .into_iter()
        .next();
    if from_row.is_none() {
        from_row = diesel::sql_query(
            "SELECT computed_at, score, model_version, signals FROM health_scores
             WHERE account_id = $1 AND computed_at <= $2 ORDER BY computed_at ASC LIMIT 1",
        )
        .bind::<BigInt, _>(account_id)
        .bind::<Timestamptz, _>(to_moment)
        .load(&mut conn)
        .await?
        .into_iter()
        .next();
    }
    let to_row: Option<Row> = if to.is_none() {
        diesel::sql_query(
            "SELECT computed_at, score, model_version, coalesce(signals, '[]'::json) AS signals
             FROM current_health_scores WHERE account_id = $1",
        )
        .bind::<BigInt, _>(account_id)
        .load(&mut conn)
        .await?
        .into_iter()
        .next()
    } else {
        diesel::sql_query(at_or_before)
            .bind::<BigInt, _>(account_id)
            .bind::<Timestamptz, _>(to_moment)
            .load(&mut conn)
            .await?
            .into_iter()
            .next()
    };
    let (Some(from_row), Some(to_row)) = (from_row, to_row) else {
        return Ok(None);
    };

    let sig_from = parse_signals(&from_row.signals);
    let sig_to = parse_signals(&to_row.signals);
    let delta = round1(to_row.score - from_row.score);
    let model_changed = from_row.model_version != to_row.model_version;

    // Per-signal contributions under each model for the `from` inputs (only when the model changed).
    let mut recomputed: Option<Recomputed> = None;
    if model_changed {
        let m_from = model::get_model(pool, Some(from_row.model_version)).await?;
        let m_to = model::get_model(pool, Some(to_row.model_version)).await?;
        if let (Some(m_from), Some(m_to)) = (m_from, m_to) {
            let run = run_context(&mut conn, from_row.computed_at, false, false).await?;
            let support = inputs::support_synced(&mut conn, from_row.computed_at).await?;
            let loaded = inputs::load_inputs(
                &mut conn,
                &[account_id],
                &[from_row.computed_at],
                support,
                m_from.config.csat_window_days,
            )
            .await?;
            if let Some(inp) = loaded.as_slice().first() {
                let a = score_account(inp, from_row.computed_at, &m_from, &run.engine);
                let b = score_account(inp, from_row.computed_at, &m_to, &run.engine);
                if let (Some(a), Some(b)) = (a, b) {
                    let mut per: BTreeMap<String, (f64, f64)> = BTreeMap::new();
                    for s in &a.signals {
                        per.entry(s.key.clone()).or_default().0 = s.contribution;
                    }
                    for s in &b.signals {
                        per.entry(s.key.clone()).or_default().1 = s.contribution;
                    }
                    recomputed = Some((a.score, b.score, per));
                }
            }
        }
    }
    let model_effect = recomputed.as_ref().map_or(0.0, |(a, b, _)| round1(b - a));
    let behaviour_effect = round1(delta - model_effect);

    let mut keys: Vec<String> = Vec::new();
    for s in sig_from.iter().chain(sig_to.iter()) {
        if !s.key.starts_with(breakdown::FRESHNESS_PREFIX) && !keys.contains(&s.key) {
            keys.push(s.key.clone());
        }
    }
    let mut signals: Vec<SignalDelta> = keys
        .into_iter()
        .map(|key| {
            let f = sig_from.iter().find(|s| s.key == key);
            let t = sig_to.iter().find(|s| s.key == key);
            let cf = f.map_or(0.0, |s| s.contribution);
            let ct = t.map_or(0.0, |s| s.contribution);
            let d = round1(ct - cf);
            let model_delta = recomputed
                .as_ref()
                .and_then(|(_, _, per)| per.get(&key))
                .map_or(0.0, |(a, b)| round1(b - a));
            SignalDelta {
                label: t.or(f).map(|s| s.label.clone()).unwrap_or_default(),
                key,
                delta: d,
                model_delta,
                behaviour_delta: round1(d - model_delta),
                contribution_from: cf,
                contribution_to: ct,
                explanation_from: f.map(|s| s.explanation.clone()),
                explanation_to: t.map(|s| s.explanation.clone()),
            }
        })
        .collect();
    signals.sort_by(|a, b| {
        b.delta
            .abs()
            .partial_cmp(&a.delta.abs())
            .unwrap_or(std::cmp::Ordering::Equal)
    });

    let parts = |pick: &dyn Fn(&SignalDelta) -> f64| -> String {
        signals
            .iter()
            .filter(|s| pick(s).abs() >= 0.5)
            .take(4)
            .map(|s| format!("{} {}", short_name(&s.key, &s.label), fmt_points(pick(s))))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let summary = if model_changed {
        let behaviour = parts(&|s| s.behaviour_delta);
        format!(
            "{}: model v{} \u{2192} v{} {}; behaviour {}{}",
            fmt_points(delta),
            from_row.model_version,
            to_row.model_version,
            fmt_points(model_effect),
            fmt_points(behaviour_effect),
            if behaviour.is_empty() {
                String::new()
            } else {
                format!(" ({behaviour})")
            }
        )
    } else {
        let p = parts(&|s| s.delta);
        if p.is_empty() {
            format!("{}: no signal moved by a point or more", fmt_points(delta))
        } else {
            format!("{}: {p}", fmt_points(delta))
        }
    };

    Ok(Some(HealthChange {
        account_id,
        from,
        to: to_moment,
        from_computed_at: from_row.computed_at,
        to_computed_at: to_row.computed_at,
        score_from: from_row.score,
        score_to: to_row.score,
        delta,
        summary,
        model_changed,
        model_version_from: from_row.model_version,
        model_version_to: to_row.model_version,
        model_effect,
        behaviour_effect,
        signals,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_use_a_real_minus_sign() {
        assert_eq!(fmt_points(-14.2), "\u{2212}14");
        assert_eq!(fmt_points(3.6), "+4");
        assert_eq!(fmt_points(0.2), "0");
    }
}
