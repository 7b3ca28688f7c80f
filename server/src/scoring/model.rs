//! Scoring models: weights, curves, thresholds, overrides and segments, versioned in `scoring_models`.
//!
//! A model's `config` column is a [`ModelConfig`] as JSON. Every field has a documented default, so a
//! partial config (say, only `weights`) is complete once read. Versions are immutable: a change creates a
//! new version (see [`create_version`]), so every stored score can name the exact model that made it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Bool, Integer, Jsonb, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};

use super::signals::SignalKey;
use super::ScoringError;
use crate::db::DbPool;

/// A piecewise-linear curve from a raw value to a 0–1 score: points sorted by `x`; values outside the
/// first/last point take the end value. Configured as `[[x, y], ...]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Curve(pub Vec<(f64, f64)>);

impl Curve {
    pub fn new(points: &[(f64, f64)]) -> Curve {
        Curve(points.to_vec())
    }

    /// The score at `x`. An empty curve scores 1 (it asks nothing).
    pub fn eval(&self, x: f64) -> f64 {
        let pts = &self.0;
        let (Some(first), Some(last)) = (pts.as_slice().first(), pts.as_slice().last()) else {
            return 1.0;
        };
        if x.is_nan() {
            return first.1.clamp(0.0, 1.0);
        }
        if x <= first.0 {
            return first.1.clamp(0.0, 1.0);
        }
        if x >= last.0 {
            return last.1.clamp(0.0, 1.0);
        }
        for w in pts.windows(2) {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            if x >= x0 && x <= x1 {
                if x1 - x0 <= f64::EPSILON {
                    return y1.clamp(0.0, 1.0);
                }
                let t = (x - x0) / (x1 - x0);
                return (y0 + t * (y1 - y0)).clamp(0.0, 1.0);
            }
        }
        last.1.clamp(0.0, 1.0)
    }

    fn validate(&self, name: &str) -> Result<(), String> {
        if self.0.is_empty() {
            return Err(format!("curve `{name}` has no points"));
        }
        for w in self.0.windows(2) {
            if w[1].0 < w[0].0 {
                return Err(format!("curve `{name}` points must be sorted by x"));
            }
        }
        if self
            .0
            .iter()
            .any(|(x, y)| !x.is_finite() || !y.is_finite() || *y < 0.0 || *y > 1.0)
        {
            return Err(format!(
                "curve `{name}` needs finite points with y between 0 and 1"
            ));
        }
        Ok(())
    }
}

/// The curves that turn raw values into 0–1 scores. Defaults are chosen so that a steadily used,
/// paid-up account scores near 1 on every signal and each failure mode costs visibly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Curves {
    /// Days since the last login → score. Default: full marks up to 3 days, 0.15 at 21 days, 0 at 30.
    pub login_recency_days: Curve,
    /// Share of seats active in the last 30 days → score.
    pub breadth_seat_ratio: Curve,
    /// Distinct active users in 30 days → score, used when the account's seat count is unknown.
    pub breadth_users: Curve,
    /// Active days in the last 30 → score.
    pub frequency_active_days: Curve,
    /// Usage change in percent, last 30 days vs the 30 before → score.
    pub usage_trend_pct: Curve,
    /// Share of key features used in the last 30 days → score.
    pub feature_adoption_ratio: Curve,
    /// Tickets opened in 30 days per 10 seats → score (volume part of support load).
    pub tickets_per_10_seats: Curve,
    /// Tickets opened in 30 days → score, when seats are unknown.
    pub tickets_30d: Curve,
    /// Open urgent tickets plus half the open high-priority ones → score.
    pub urgent_open: Curve,
    /// Days the oldest open urgent/high ticket has waited → score.
    pub urgent_wait_days: Curve,
    /// Average CSAT (1–5) of recently closed tickets → score.
    pub csat: Curve,
    /// Days the oldest overdue invoice is past due → score.
    pub invoice_days_overdue: Curve,
}

impl Default for Curves {
    fn default() -> Self {
        Curves {
            login_recency_days: Curve::new(&[
                (0.0, 1.0),
                (3.0, 1.0),
                (7.0, 0.8),
                (14.0, 0.4),
                (21.0, 0.15),
                (30.0, 0.0),
            ]),
            breadth_seat_ratio: Curve::new(&[
                (0.0, 0.0),
                (0.1, 0.25),
                (0.3, 0.6),
                (0.5, 0.85),
                (0.7, 1.0),
            ]),
            breadth_users: Curve::new(&[(0.0, 0.0), (1.0, 0.4), (3.0, 0.75), (5.0, 1.0)]),
            frequency_active_days: Curve::new(&[
                (0.0, 0.0),
                (4.0, 0.3),
                (10.0, 0.7),
                (16.0, 0.9),
                (20.0, 1.0),
            ]),
            usage_trend_pct: Curve::new(&[
                (-100.0, 0.0),
                (-75.0, 0.1),
                (-50.0, 0.35),
                (-25.0, 0.7),
                (-10.0, 0.9),
                (0.0, 1.0),
            ]),
            feature_adoption_ratio: Curve::new(&[(0.0, 0.0), (0.2, 0.3), (0.6, 0.85), (0.8, 1.0)]),
            tickets_per_10_seats: Curve::new(&[
                (0.0, 1.0),
                (1.0, 1.0),
                (2.0, 0.8),
                (4.0, 0.4),
                (8.0, 0.0),
            ]),
            tickets_30d: Curve::new(&[
                (0.0, 1.0),
                (2.0, 1.0),
                (5.0, 0.6),
                (10.0, 0.2),
                (20.0, 0.0),
            ]),
            urgent_open: Curve::new(&[(0.0, 1.0), (1.0, 0.6), (2.0, 0.35), (4.0, 0.0)]),
            urgent_wait_days: Curve::new(&[
                (0.0, 1.0),
                (1.0, 0.8),
                (3.0, 0.4),
                (7.0, 0.1),
                (14.0, 0.0),
            ]),
            csat: Curve::new(&[(1.0, 0.0), (2.0, 0.2), (3.0, 0.5), (4.0, 0.85), (5.0, 1.0)]),
            invoice_days_overdue: Curve::new(&[
                (0.0, 1.0),
                (1.0, 0.85),
                (15.0, 0.5),
                (30.0, 0.15),
                (60.0, 0.0),
            ]),
        }
    }
}

impl Curves {
    fn all(&self) -> [(&'static str, &Curve); 12] {
        [
            ("login_recency_days", &self.login_recency_days),
            ("breadth_seat_ratio", &self.breadth_seat_ratio),
            ("breadth_users", &self.breadth_users),
            ("frequency_active_days", &self.frequency_active_days),
            ("usage_trend_pct", &self.usage_trend_pct),
            ("feature_adoption_ratio", &self.feature_adoption_ratio),
            ("tickets_per_10_seats", &self.tickets_per_10_seats),
            ("tickets_30d", &self.tickets_30d),
            ("urgent_open", &self.urgent_open),
            ("urgent_wait_days", &self.urgent_wait_days),
            ("csat", &self.csat),
            ("invoice_days_overdue", &self.invoice_days_overdue),
        ]
    }
}

/// How each subscription state scores on the billing signal (0–1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingStatusScores {
    pub active: f64,
    pub trialing: f64,
    pub past_due: f64,
    pub unpaid: f64,
    /// Active but set to cancel at the end of the period.
    pub cancelling: f64,
    pub canceled: f64,
}

impl Default for BillingStatusScores {
    fn default() -> Self {
        BillingStatusScores {
            active: 1.0,
            trialing: 0.9,
            past_due: 0.4,
            unpaid: 0.15,
            cancelling: 0.1,
            canceled: 0.0,
        }
    }
}

/// Shares of the three parts of the support-load signal; CSAT's share goes to the others when unknown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupportParts {
    pub volume: f64,
    pub urgent: f64,
    pub csat: f64,
}

impl Default for SupportParts {
    fn default() -> Self {
        SupportParts {
            volume: 0.3,
            urgent: 0.5,
            csat: 0.2,
        }
    }
}

/// Score bands: `HEALTHY` at or above `healthy`, `AT_RISK` at or above `at_risk`, else `CRITICAL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tiers {
    pub healthy: f64,
    pub at_risk: f64,
}

impl Default for Tiers {
    fn default() -> Self {
        Tiers {
            healthy: 70.0,
            at_risk: 40.0,
        }
    }
}

/// The condition of a score cap. Conditions look at the account's facts, not at its score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OverrideCondition {
    /// The subscription is active but set to cancel at the period end.
    SubscriptionCancelling,
    /// The subscription's status is one of these (`past_due`, `unpaid`, `canceled`...).
    SubscriptionStatus { statuses: Vec<String> },
    /// An invoice has been overdue at least this many days.
    InvoiceOverdueDays { min_days: i64 },
    /// Nobody has logged in for at least this many days.
    NoLoginDays { min_days: i64 },
}

/// A cap: when `when` holds, the score is at most `cap`. The points the cap takes are listed as a
/// driver of their own (key `override:<name>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreOverride {
    pub name: String,
    pub when: OverrideCondition,
    pub cap: f64,
}

fn default_overrides() -> Vec<ScoreOverride> {
    vec![
        // A customer who has told you they are leaving is never healthy, however much they use it.
        ScoreOverride {
            name: "subscription_cancelling".into(),
            when: OverrideCondition::SubscriptionCancelling,
            cap: 69.0,
        },
        ScoreOverride {
            name: "subscription_canceled".into(),
            when: OverrideCondition::SubscriptionStatus {
                statuses: vec!["canceled".into()],
            },
            cap: 39.0,
        },
        ScoreOverride {
            name: "subscription_unpaid".into(),
            when: OverrideCondition::SubscriptionStatus {
                statuses: vec!["unpaid".into()],
            },
            cap: 59.0,
        },
        // A month of non-payment is a churn signal on its own.
        ScoreOverride {
            name: "invoice_overdue_30d".into(),
            when: OverrideCondition::InvoiceOverdueDays { min_days: 30 },
            cap: 69.0,
        },
        // Three weeks of silence: nobody is getting value, whatever the other signals say.
        ScoreOverride {
            name: "no_login_21d".into(),
            when: OverrideCondition::NoLoginDays { min_days: 21 },
            cap: 69.0,
        },
    ]
}

/// Default weights, in points out of 100, ordered by how well each signal predicts churn in
/// practice: silence (login recency), a falling trend and billing trouble come before anything else;
/// breadth and feature adoption describe depth of use and predict less on their own.
fn default_weights() -> BTreeMap<String, f64> {
    SignalKey::ALL
        .iter()
        .map(|k| (k.as_str().to_string(), k.default_weight()))
        .collect()
}

fn default_key_feature_count() -> usize {
    5
}

/// Everything a model decides. Stored as JSON in `scoring_models.config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Points per signal key; missing keys take their default, 0 leaves the signal out.
    pub weights: BTreeMap<String, f64>,
    pub tiers: Tiers,
    pub curves: Curves,
    pub billing_status: BillingStatusScores,
    pub support_parts: SupportParts,
    /// The features that matter. Empty: the `key_feature_count` features most used across all accounts
    /// in the last 90 days.
    pub key_features: Vec<String>,
    #[serde(default = "default_key_feature_count")]
    pub key_feature_count: usize,
    /// Window for the average CSAT, in days.
    pub csat_window_days: i64,
    pub overrides: Vec<ScoreOverride>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            weights: default_weights(),
            tiers: Tiers::default(),
            curves: Curves::default(),
            billing_status: BillingStatusScores::default(),
            support_parts: SupportParts::default(),
            key_features: Vec::new(),
            key_feature_count: default_key_feature_count(),
            csat_window_days: 90,
            overrides: default_overrides(),
        }
    }
}

impl ModelConfig {
    /// The configured weight of a signal (its default when the config leaves it out).
    pub fn weight(&self, key: SignalKey) -> f64 {
        self.weights
            .get(key.as_str())
            .copied()
            .unwrap_or_else(|| key.default_weight())
            .max(0.0)
    }

    /// Rejects configs that would score nonsense, with a message fit for an admin.
    pub fn validate(&self) -> Result<(), String> {
        for k in self.weights.keys() {
            if SignalKey::parse(k).is_none() {
                return Err(format!(
                    "unknown signal `{k}` in weights; known: {}",
                    SignalKey::ALL
                        .iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        if self.weights.values().any(|w| !w.is_finite() || *w < 0.0) {
            return Err("weights must be finite and not negative".into());
        }
        if SignalKey::ALL.iter().map(|k| self.weight(*k)).sum::<f64>() <= 0.0 {
            return Err("at least one weight must be positive".into());
        }
        let t = &self.tiers;
        if !(0.0..=100.0).contains(&t.at_risk)
            || !(0.0..=100.0).contains(&t.healthy)
            || t.at_risk > t.healthy
        {
            return Err("tiers need 0 <= at_risk <= healthy <= 100".into());
        }
        for (name, curve) in self.curves.all() {
            curve.validate(name)?;
        }
        let b = &self.billing_status;
        for v in [
            b.active,
            b.trialing,
            b.past_due,
            b.unpaid,
            b.cancelling,
            b.canceled,
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err("billing_status scores must be between 0 and 1".into());
            }
        }
        let p = &self.support_parts;
        if [p.volume, p.urgent, p.csat]
            .iter()
            .any(|v| !v.is_finite() || *v < 0.0)
            || p.volume + p.urgent <= 0.0
        {
            return Err("support_parts must be non-negative with volume + urgent > 0".into());
        }
        if self.csat_window_days <= 0 {
            return Err("csat_window_days must be positive".into());
        }
        for o in &self.overrides {
            if !(0.0..=100.0).contains(&o.cap) {
                return Err(format!(
                    "override `{}` cap must be between 0 and 100",
                    o.name
                ));
            }
        }
        Ok(())
    }
}

/// Which accounts a segment model applies to. Every given condition must hold (AND); an empty
/// segment matches every account.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Segment {
    /// The account's plan is one of these (case-insensitive).
    pub plan: Option<Vec<String>>,
    pub min_seats: Option<i32>,
    pub max_seats: Option<i32>,
    pub min_mrr: Option<f64>,
    pub max_mrr: Option<f64>,
    /// The account's owner is one of these.
    pub owner: Option<Vec<String>>,
}

/// The account fields segments filter on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccountFields {
    pub plan: Option<String>,
    pub seats: Option<i32>,
    pub mrr: Option<f64>,
    pub owner: Option<String>,
}

impl Segment {
    pub fn matches(&self, a: &AccountFields) -> bool {
        if let Some(plans) = &self.plan {
            match &a.plan {
                Some(p) if plans.iter().any(|x| x.eq_ignore_ascii_case(p)) => {}
                _ => return false,
            }
        }
        if let Some(min) = self.min_seats {
            if a.seats.is_none_or(|s| s < min) {
                return false;
            }
        }
        if let Some(max) = self.max_seats {
            if a.seats.is_none_or(|s| s > max) {
                return false;
            }
        }
        if let Some(min) = self.min_mrr {
            if a.mrr.is_none_or(|m| m < min) {
                return false;
            }
        }
        if let Some(max) = self.max_mrr {
            if a.mrr.is_none_or(|m| m > max) {
                return false;
            }
        }
        if let Some(owners) = &self.owner {
            match &a.owner {
                Some(o) if owners.iter().any(|x| x == o) => {}
                _ => return false,
            }
        }
        true
    }
}

/// One stored model version.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoringModel {
    pub version: i32,
    pub name: String,
    /// `None`: a default model (one of those is active); `Some`: a segment model.
    pub segment: Option<Segment>,
    pub priority: i32,
    pub config: ModelConfig,
    pub active: bool,
    pub notes: Option<String>,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl ScoringModel {
    /// The built-in default, used for version 1 and in pure tests.
    pub fn builtin() -> ScoringModel {
        ScoringModel {
            version: 1,
            name: "default".into(),
            segment: None,
            priority: 0,
            config: ModelConfig::default(),
            active: true,
            notes: Some("Built-in default model".into()),
            created_by: Some("healthd".into()),
            created_at: Utc::now(),
        }
    }
}

/// The active models and the precedence rule that picks one per account.
#[derive(Debug, Clone)]
pub struct ActiveModels {
    pub default: ScoringModel,
    /// Active segment models, highest priority first (then highest version).
    pub segments: Vec<ScoringModel>,
}

impl ActiveModels {
    /// Precedence: the active segment model with the highest `priority` (ties: the newest version)
    /// whose segment matches the account; otherwise the active default model.
    pub fn for_account(&self, a: &AccountFields) -> &ScoringModel {
        self.segments
            .iter()
            .find(|m| m.segment.as_ref().is_some_and(|s| s.matches(a)))
            .unwrap_or(&self.default)
    }

    pub fn new(default: ScoringModel, mut segments: Vec<ScoringModel>) -> ActiveModels {
        segments.sort_by(|a, b| b.priority.cmp(&a.priority).then(b.version.cmp(&a.version)));
        ActiveModels { default, segments }
    }

    pub fn versions(&self) -> Vec<i32> {
        std::iter::once(self.default.version)
            .chain(self.segments.iter().map(|m| m.version))
            .collect()
    }
}

#[derive(QueryableByName)]
struct ModelRow {
    #[diesel(sql_type = Integer)]
    version: i32,
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Nullable<Jsonb>)]
    segment: Option<serde_json::Value>,
    #[diesel(sql_type = Integer)]
    priority: i32,
    #[diesel(sql_type = Jsonb)]
    config: serde_json::Value,
    #[diesel(sql_type = Bool)]
    active: bool,
    #[diesel(sql_type = Nullable<Text>)]
    notes: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    created_by: Option<String>,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
}

impl TryFrom<ModelRow> for ScoringModel {
    type Error = ScoringError;
    fn try_from(r: ModelRow) -> Result<Self, ScoringError> {
        let config: ModelConfig = serde_json::from_value(r.config).map_err(|e| {
            ScoringError::InvalidModel(format!(
                "stored model version {} has a bad config: {e}",
                r.version
            ))
        })?;
        let segment = match r.segment {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(serde_json::from_value(v).map_err(|e| {
                ScoringError::InvalidModel(format!(
                    "stored model version {} has a bad segment: {e}",
                    r.version
                ))
            })?),
        };
        Ok(ScoringModel {
            version: r.version,
            name: r.name,
            segment,
            priority: r.priority,
            config,
            active: r.active,
            notes: r.notes,
            created_by: r.created_by,
            created_at: r.created_at,
        })
    }
}

const MODEL_COLUMNS: &str =
    "version, name, segment, priority, config, active, notes, created_by, created_at";

/// Lock key that serialises model version creation and activation across processes.
const MODEL_LOCK: i64 = 7_368_500_020;

/// Creates version 1 (the built-in default, active) when no model exists yet. Safe to call from many
/// processes at once.
pub async fn ensure_default_model(conn: &mut AsyncPgConnection) -> Result<(), ScoringError> {
    let config = serde_json::to_value(ModelConfig::default())
        .map_err(|e| ScoringError::InvalidModel(e.to_string()))?;
    diesel::sql_query(
        "INSERT INTO scoring_models (version, name, segment, priority, config, active, notes, created_by)
         SELECT 1, 'default', NULL, 0, $1, true, 'Built-in default model', 'healthd'
         WHERE NOT EXISTS (SELECT 1 FROM scoring_models)
         ON CONFLICT (version) DO NOTHING",
    )
    .bind::<Jsonb, _>(config)
    .execute(conn)
    .await?;
    Ok(())
}

/// The active default model and active segment models (creating the built-in default if needed).
pub async fn load_active(conn: &mut AsyncPgConnection) -> Result<ActiveModels, ScoringError> {
    ensure_default_model(conn).await?;
    let rows: Vec<ModelRow> = diesel::sql_query(format!(
        "SELECT {MODEL_COLUMNS} FROM scoring_models WHERE active ORDER BY version DESC"
    ))
    .load(conn)
    .await?;
    let mut default = None;
    let mut segments = Vec::new();
    for r in rows {
        let m = ScoringModel::try_from(r)?;
        if m.segment.is_some() {
            segments.push(m);
        } else if default.is_none() {
            default = Some(m);
        }
    }
    let default = match default {
        Some(d) => d,
        // Every default deactivated by hand: fall back to the newest default version, else built-in.
        None => {
            let rows: Vec<ModelRow> = diesel::sql_query(format!(
                "SELECT {MODEL_COLUMNS} FROM scoring_models WHERE segment IS NULL ORDER BY version DESC LIMIT 1"
            ))
            .load(conn)
            .await?;
            match rows.into_iter().next() {
                Some(r) => ScoringModel::try_from(r)?,
                None => ScoringModel::builtin(),
            }
        }
    };
    Ok(ActiveModels::new(default, segments))
}

/// One version, or the active default model when `version` is `None`.
pub async fn get_model(
    pool: &DbPool,
    version: Option<i32>,
) -> Result<Option<ScoringModel>, ScoringError> {
    let mut conn = pool.get().await?;
    match version {
        None => Ok(Some(load_active(&mut conn).await?.default)),
        Some(v) => {
            ensure_default_model(&mut conn).await?;
            let rows: Vec<ModelRow> = diesel::sql_query(format!(
                "SELECT {MODEL_COLUMNS} FROM scoring_models WHERE version = $1"
            ))
            .bind::<Integer, _>(v)
            .load(&mut conn)
            .await?;
            rows.into_iter()
                .next()
                .map(ScoringModel::try_from)
                .transpose()
        }
    }
}

/// Every version, newest first.
pub async fn list_models(pool: &DbPool) -> Result<Vec<ScoringModel>, ScoringError> {
    let mut conn = pool.get().await?;
    ensure_default_model(&mut conn).await?;
    let rows: Vec<ModelRow> = diesel::sql_query(format!(
        "SELECT {MODEL_COLUMNS} FROM scoring_models ORDER BY version DESC"
    ))
    .load(&mut conn)
    .await?;
    rows.into_iter().map(ScoringModel::try_from).collect()
}

/// A model version to create. Versions are never edited: a change is a new version.
#[derive(Debug, Clone)]
pub struct NewModel {
    pub name: String,
    pub segment: Option<Segment>,
    pub priority: i32,
    pub config: ModelConfig,
    pub notes: Option<String>,
    pub created_by: Option<String>,
    pub activate: bool,
}

/// Stores a new version (number = highest + 1), optionally activating it in the same transaction.
pub async fn create_version(pool: &DbPool, new: NewModel) -> Result<ScoringModel, ScoringError> {
    new.config.validate().map_err(ScoringError::InvalidModel)?;
    let config =
        serde_json::to_value(&new.config).map_err(|e| ScoringError::InvalidModel(e.to_string()))?;
    let segment = new
        .segment
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| ScoringError::InvalidModel(e.to_string()))?;
    let mut pooled = pool.get().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    ensure_default_model(conn).await?;
    let version = conn
        .transaction::<i32, ScoringError, _>(async |conn| {
            lock_models(conn).await?;
            #[derive(QueryableByName)]
            struct V {
                #[diesel(sql_type = Integer)]
                version: i32,
            }
            let v: V = diesel::sql_query(
                "INSERT INTO scoring_models (version, name, segment, priority, config, active, notes, created_by)
                     SELECT COALESCE(MAX(version), 0) + 1, $1, $2, $3, $4, false, $5, $6 FROM scoring_models
                     RETURNING version",
            )
            .bind::<Text, _>(&new.name)
            .bind::<Nullable<Jsonb>, _>(segment)
            .bind::<Integer, _>(new.priority)
            .bind::<Jsonb, _>(config)
            .bind::<Nullable<Text>, _>(&new.notes)
            .bind::<Nullable<Text>, _>(&new.created_by)
            .get_result(conn)
            .await?;
            if new.activate {
                activate_in_tx(conn, v.version).await?;
            }
            Ok(v.version)
        })
        .await?;
    drop(pooled);
    get_model(pool, Some(version))
        .await?
        .ok_or(ScoringError::ModelNotFound(version))
}

async fn lock_models(conn: &mut AsyncPgConnection) -> Result<(), ScoringError> {
    diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
        .bind::<BigInt, _>(MODEL_LOCK)
        .execute(conn)
        .await?;
    Ok(())
}

async fn activate_in_tx(conn: &mut AsyncPgConnection, version: i32) -> Result<(), ScoringError> {
    // A default model replaces the active default; a segment model replaces active models with the
    // same segment (other segments stay active).
    let n = diesel::sql_query(
        "WITH target AS (SELECT version, segment FROM scoring_models WHERE version = $1)
         UPDATE scoring_models m SET active = (m.version = t.version)
         FROM target t
         WHERE m.version = t.version
            OR (m.active AND ((t.segment IS NULL AND m.segment IS NULL) OR m.segment = t.segment))",
    )
    .bind::<Integer, _>(version)
    .execute(conn)
    .await?;
    if n == 0 {
        return Err(ScoringError::ModelNotFound(version));
    }
    Ok(())
}

/// Makes `version` active (see the replacement rule in [`activate_in_tx`]). Scores change on the next
/// rescore.
pub async fn activate(pool: &DbPool, version: i32) -> Result<ScoringModel, ScoringError> {
    let mut pooled = pool.get().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    ensure_default_model(conn).await?;
    conn.transaction::<(), ScoringError, _>(async |conn| {
        lock_models(conn).await?;
        activate_in_tx(conn, version).await
    })
    .await?;
    drop(pooled);
    get_model(pool, Some(version))
        .await?
        .ok_or(ScoringError::ModelNotFound(version))
}

/// Deactivates a segment model (a default model can only be replaced, never left without one).
pub async fn deactivate(pool: &DbPool, version: i32) -> Result<ScoringModel, ScoringError> {
    let model = get_model(pool, Some(version))
        .await?
        .ok_or(ScoringError::ModelNotFound(version))?;
    if model.segment.is_none() {
        return Err(ScoringError::InvalidModel(
            "the default model cannot be deactivated; activate another default version instead"
                .into(),
        ));
    }
    let mut conn = pool.get().await?;
    diesel::sql_query("UPDATE scoring_models SET active = false WHERE version = $1")
        .bind::<Integer, _>(version)
        .execute(&mut conn)
        .await?;
    drop(conn);
    get_model(pool, Some(version))
        .await?
        .ok_or(ScoringError::ModelNotFound(version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curve_interpolates_and_clamps() {
        let c = Curve::new(&[(0.0, 1.0), (10.0, 0.0)]);
        assert_eq!(c.eval(-5.0), 1.0);
        assert!((c.eval(2.5) - 0.75).abs() < 1e-9);
        assert_eq!(c.eval(50.0), 0.0);
    }

    #[test]
    fn default_config_is_valid_and_round_trips() {
        let c = ModelConfig::default();
        c.validate().unwrap();
        let v = serde_json::to_value(&c).unwrap();
        let back: ModelConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
        let partial: ModelConfig =
            serde_json::from_value(serde_json::json!({"weights": {"billing": 30}})).unwrap();
        assert_eq!(partial.weight(SignalKey::Billing), 30.0);
        assert_eq!(
            partial.weight(SignalKey::LoginRecency),
            SignalKey::LoginRecency.default_weight()
        );
    }

    #[test]
    fn segment_precedence_highest_priority_wins() {
        let mut ent = ScoringModel::builtin();
        ent.version = 2;
        ent.priority = 10;
        ent.segment = Some(Segment {
            plan: Some(vec!["enterprise".into()]),
            ..Default::default()
        });
        let mut big = ScoringModel::builtin();
        big.version = 3;
        big.priority = 5;
        big.segment = Some(Segment {
            min_seats: Some(100),
            ..Default::default()
        });
        let models = ActiveModels::new(ScoringModel::builtin(), vec![big, ent]);
        let a = AccountFields {
            plan: Some("Enterprise".into()),
            seats: Some(500),
            ..Default::default()
        };
        assert_eq!(models.for_account(&a).version, 2);
        let b = AccountFields {
            plan: Some("pro".into()),
            seats: Some(500),
            ..Default::default()
        };
        assert_eq!(models.for_account(&b).version, 3);
        let c = AccountFields {
            plan: Some("pro".into()),
            seats: Some(5),
            ..Default::default()
        };
        assert_eq!(models.for_account(&c).version, 1);
    }
}
