//! Scoring over GraphQL: models (read: viewer; change: admin), recompute, calibration, and the
//! `HealthChange` type behind `Account.healthChange`.

use async_graphql::{Context, InputObject, Json, Object, SimpleObject};
use chrono::{DateTime, Utc};

use crate::auth::{self, Role};
use crate::db::DbPool;
use crate::scoring::model::{self as models, NewModel, Segment};
use crate::scoring::signals::SignalKey;
use crate::scoring::{self, ScoringError};

use super::errors::{bad_input, internal, not_found};

fn to_gql(e: ScoringError) -> async_graphql::Error {
    match e {
        ScoringError::InvalidModel(m) | ScoringError::Calibration(m) => bad_input(m),
        ScoringError::ModelNotFound(v) => {
            not_found(format!("scoring model version {v} does not exist"))
        }
        ScoringError::AccountNotFound(id) => not_found(format!("account {id} does not exist")),
        other => internal(other),
    }
}

/// A signal's weight in a model, in points (a model's weights are shared out to 100 points over
/// the signals an account has data for).
#[derive(SimpleObject, Clone)]
pub struct SignalWeight {
    pub key: String,
    pub label: String,
    pub weight: f64,
}

/// Score bands: HEALTHY at or above `healthy`, AT_RISK at or above `atRisk`, else CRITICAL.
#[derive(SimpleObject, Clone)]
pub struct TierThresholds {
    pub healthy: f64,
    pub at_risk: f64,
}

/// A cap on the score while a condition holds (e.g. a cancelling subscription is never HEALTHY).
#[derive(SimpleObject, Clone)]
pub struct ScoreCap {
    pub name: String,
    /// The condition, e.g. `{"kind": "invoice_overdue_days", "min_days": 30}`.
    pub condition: Json<serde_json::Value>,
    pub cap: f64,
}

/// One version of a scoring model. Versions never change once stored; edits create new versions.
#[derive(SimpleObject, Clone)]
#[graphql(name = "ScoringModel")]
pub struct ScoringModelObject {
    pub version: i32,
    pub name: String,
    pub active: bool,
    /// True for default models (no segment); the active default scores every account no active
    /// segment model claims.
    pub is_default: bool,
    /// Which accounts a segment model applies to, e.g. `{"plan": ["enterprise"]}` or `{"min_seats": 100}`.
    pub segment: Option<Json<serde_json::Value>>,
    /// Among matching active segment models, the highest priority wins.
    pub priority: i32,
    pub weights: Vec<SignalWeight>,
    pub tiers: TierThresholds,
    pub overrides: Vec<ScoreCap>,
    /// Key features for the adoption signal; empty: the most used features across all accounts.
    pub key_features: Vec<String>,
    /// The whole configuration (curves, billing status scores, ...), as stored.
    pub config: Json<serde_json::Value>,
    pub notes: Option<String>,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl From<models::ScoringModel> for ScoringModelObject {
    fn from(m: models::ScoringModel) -> Self {
        let cfg = &m.config;
        ScoringModelObject {
            version: m.version,
            name: m.name.clone(),
            active: m.active,
            is_default: m.segment.is_none(),
            segment: m
                .segment
                .as_ref()
                .and_then(|s| serde_json::to_value(s).ok())
                .map(Json),
            priority: m.priority,
            weights: SignalKey::ALL
                .iter()
                .map(|k| SignalWeight {
                    key: k.as_str().into(),
                    label: k.label().into(),
                    weight: cfg.weight(*k),
                })
                .collect(),
            tiers: TierThresholds {
                healthy: cfg.tiers.healthy,
                at_risk: cfg.tiers.at_risk,
            },
            overrides: cfg
                .overrides
                .iter()
                .map(|o| ScoreCap {
                    name: o.name.clone(),
                    condition: Json(serde_json::to_value(&o.when).unwrap_or_default()),
                    cap: o.cap,
                })
                .collect(),
            key_features: cfg.key_features.clone(),
            config: Json(serde_json::to_value(cfg).unwrap_or_default()),
            notes: m.notes,
            created_by: m.created_by,
            created_at: m.created_at,
        }
    }
}

#[derive(InputObject)]
pub struct SignalWeightInput {
    pub key: String,
    pub weight: f64,
}

#[derive(InputObject)]
pub struct TierThresholdsInput {
    pub healthy: f64,
    pub at_risk: f64,
}

/// Changes to make, as a NEW version based on `baseVersion` (default: the active default model).
#[derive(InputObject)]
pub struct UpdateScoringModelInput {
    pub base_version: Option<i32>,
    pub name: Option<String>,
    pub notes: Option<String>,
    /// A whole configuration to start from instead of the base's (missing fields take defaults).
    pub config: Option<Json<serde_json::Value>>,
    pub weights: Option<Vec<SignalWeightInput>>,
    pub tiers: Option<TierThresholdsInput>,
    pub key_features: Option<Vec<String>>,
    /// Replaces the caps: `[{"name": "...", "when": {"kind": "subscription_cancelling"}, "cap": 69}]`.
    pub overrides: Option<Json<serde_json::Value>>,
    /// Makes a segment model; `null` keeps the base's segment.
    pub segment: Option<Json<serde_json::Value>>,
    /// Makes a default model even if the base had a segment.
    #[graphql(default = false)]
    pub clear_segment: bool,
    pub priority: Option<i32>,
    /// Activate the new version at once.
    #[graphql(default = false)]
    pub activate: bool,
}

/// What a rescore did.
#[derive(SimpleObject)]
pub struct RescoreResult {
    pub accounts_scored: i32,
    /// Accounts left unscored because no data of any kind has arrived for them.
    pub accounts_without_data: i32,
    pub changed_accounts: i32,
    pub history_rows: i32,
    /// The last `score_changes` id written (the feed position after this rescore).
    pub max_feed_id: Option<i64>,
    pub model_version: i32,
    pub model_versions: Vec<i32>,
    pub computed_at: DateTime<Utc>,
    pub elapsed_ms: i64,
}

impl From<scoring::RescoreSummary> for RescoreResult {
    fn from(s: scoring::RescoreSummary) -> Self {
        RescoreResult {
            accounts_scored: s.accounts_scored as i32,
            accounts_without_data: s.accounts_without_data as i32,
            changed_accounts: s.changed_account_ids.len() as i32,
            history_rows: s.history_rows as i32,
            max_feed_id: s.max_feed_id,
            model_version: s.model_version,
            model_versions: s.model_versions,
            computed_at: s.computed_at,
            elapsed_ms: s.elapsed_ms as i64,
        }
    }
}

#[derive(SimpleObject)]
pub struct CalibratedSignal {
    pub key: String,
    pub label: String,
    /// Logistic-regression coefficient for churn: negative means a higher signal score goes with
    /// less churn.
    pub coefficient: f64,
    pub proposed_weight: f64,
    pub active_weight: f64,
    /// Share of sampled accounts with data for this signal.
    pub coverage: f64,
}

/// Weights fitted to churn outcomes, with held-out AUCs. The proposal is stored as an inactive
/// model version (`proposedVersion`) to review and activate.
#[derive(SimpleObject)]
pub struct CalibrationReport {
    pub lookback_days: i32,
    pub churned_accounts: i32,
    pub retained_accounts: i32,
    pub train_size: i32,
    pub train_churned: i32,
    pub test_size: i32,
    pub test_churned: i32,
    /// Highest proposed weight first.
    pub signals: Vec<CalibratedSignal>,
    pub auc_proposed: f64,
    pub auc_active: f64,
    pub auc_equal: f64,
    pub active_version: i32,
    pub proposed_version: i32,
    pub notes: String,
}

impl From<scoring::CalibrationReport> for CalibrationReport {
    fn from(r: scoring::CalibrationReport) -> Self {
        CalibrationReport {
            lookback_days: r.lookback_days as i32,
            churned_accounts: r.churned_accounts as i32,
            retained_accounts: r.retained_accounts as i32,
            train_size: r.train_size as i32,
            train_churned: r.train_churned as i32,
            test_size: r.test_size as i32,
            test_churned: r.test_churned as i32,
            signals: r
                .signals
                .into_iter()
                .map(|s| CalibratedSignal {
                    key: s.key,
                    label: s.label,
                    coefficient: s.coefficient,
                    proposed_weight: s.proposed_weight,
                    active_weight: s.active_weight,
                    coverage: s.coverage,
                })
                .collect(),
            auc_proposed: r.auc_proposed,
            auc_active: r.auc_active,
            auc_equal: r.auc_equal,
            active_version: r.active_version,
            proposed_version: r.proposed_version,
            notes: r.notes,
        }
    }
}

#[derive(InputObject)]
pub struct CalibrateScoringModelInput {
    /// Signals are looked at this many days before each churn.
    #[graphql(default = 30)]
    pub lookback_days: i32,
}

/// One signal's part in a score change.
#[derive(SimpleObject)]
pub struct SignalDelta {
    pub key: String,
    pub label: String,
    /// Points this signal added (positive) or cost (negative) between the two moments.
    pub delta: f64,
    /// The part due to the change of model.
    pub model_delta: f64,
    /// The part due to the customer's data.
    pub behaviour_delta: f64,
    pub explanation_from: Option<String>,
    pub explanation_to: Option<String>,
}

/// How an account's score moved between two moments, and why.
#[derive(SimpleObject)]
pub struct HealthChange {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// When the compared scores were computed (the latest at or before each moment).
    pub from_computed_at: DateTime<Utc>,
    pub to_computed_at: DateTime<Utc>,
    pub score_from: f64,
    pub score_to: f64,
    pub delta: f64,
    /// E.g. "−14: usage −9, tickets −5".
    pub summary: String,
    pub model_changed: bool,
    pub model_version_from: i32,
    pub model_version_to: i32,
    pub model_effect: f64,
    pub behaviour_effect: f64,
    /// Largest change first.
    pub signals: Vec<SignalDelta>,
}

impl From<scoring::HealthChange> for HealthChange {
    fn from(c: scoring::HealthChange) -> Self {
        HealthChange {
            from: c.from,
            to: c.to,
            from_computed_at: c.from_computed_at,
            to_computed_at: c.to_computed_at,
            score_from: c.score_from,
            score_to: c.score_to,
            delta: c.delta,
            summary: c.summary,
            model_changed: c.model_changed,
            model_version_from: c.model_version_from,
            model_version_to: c.model_version_to,
            model_effect: c.model_effect,
            behaviour_effect: c.behaviour_effect,
            signals: c
                .signals
                .into_iter()
                .map(|s| SignalDelta {
                    key: s.key,
                    label: s.label,
                    delta: s.delta,
                    model_delta: s.model_delta,
                    behaviour_delta: s.behaviour_delta,
                    explanation_from: s.explanation_from,
                    explanation_to: s.explanation_to,
                })
                .collect(),
        }
    }
}

/// The body of `Account.healthChange` (the `Account` type delegates here). Viewer role.
pub async fn account_health_change(
    ctx: &Context<'_>,
    account_id: i64,
    from: DateTime<Utc>,
    to: Option<DateTime<Utc>>,
) -> async_graphql::Result<Option<HealthChange>> {
    auth::require(ctx, Role::Viewer)?;
    if let Some(to) = to {
        if to < from {
            return Err(bad_input("`to` must not be before `from`"));
        }
    }
    let pool = ctx.data::<DbPool>()?;
    let change = scoring::health_change(pool, account_id, from, to)
        .await
        .map_err(to_gql)?;
    Ok(change.map(Into::into))
}

#[derive(Default)]
pub struct ScoringQuery;

#[Object]
impl ScoringQuery {
    /// A scoring model version; the active default model when `version` is omitted.
    async fn scoring_model(
        &self,
        ctx: &Context<'_>,
        version: Option<i32>,
    ) -> async_graphql::Result<Option<ScoringModelObject>> {
        auth::require(ctx, Role::Viewer)?;
        let pool = ctx.data::<DbPool>()?;
        Ok(models::get_model(pool, version)
            .await
            .map_err(to_gql)?
            .map(Into::into))
    }

    /// Every scoring model version, newest first.
    async fn scoring_models(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Vec<ScoringModelObject>> {
        auth::require(ctx, Role::Viewer)?;
        let pool = ctx.data::<DbPool>()?;
        Ok(models::list_models(pool)
            .await
            .map_err(to_gql)?
            .into_iter()
            .map(Into::into)
            .collect())
    }
}

#[derive(Default)]
pub struct ScoringMutation;

#[Object]
impl ScoringMutation {
    /// Creates a new model version from `baseVersion` (default: the active default model) with the
    /// given changes. Stored versions are never modified. Admin only.
    async fn update_scoring_model(
        &self,
        ctx: &Context<'_>,
        input: UpdateScoringModelInput,
    ) -> async_graphql::Result<ScoringModelObject> {
        let viewer = auth::require(ctx, Role::Admin)?;
        let pool = ctx.data::<DbPool>()?;
        let base = models::get_model(pool, input.base_version)
            .await
            .map_err(to_gql)?
            .ok_or_else(|| {
                not_found(format!(
                    "scoring model version {} does not exist",
                    input.base_version.unwrap_or(0)
                ))
            })?;
        let mut config = match input.config {
            Some(Json(v)) => {
                serde_json::from_value(v).map_err(|e| bad_input(format!("invalid config: {e}")))?
            }
            None => base.config.clone(),
        };
        if let Some(weights) = input.weights {
            for w in weights {
                if SignalKey::parse(&w.key).is_none() {
                    return Err(bad_input(format!("unknown signal `{}`", w.key)));
                }
                config.weights.insert(w.key, w.weight);
            }
        }
        if let Some(t) = input.tiers {
            config.tiers.healthy = t.healthy;
            config.tiers.at_risk = t.at_risk;
        }
        if let Some(k) = input.key_features {
            config.key_features = k;
        }
        if let Some(Json(o)) = input.overrides {
            config.overrides = serde_json::from_value(o)
                .map_err(|e| bad_input(format!("invalid overrides: {e}")))?;
        }
        let segment: Option<Segment> = if input.clear_segment {
            None
        } else {
            match input.segment {
                Some(Json(v)) => Some(
                    serde_json::from_value(v)
                        .map_err(|e| bad_input(format!("invalid segment: {e}")))?,
                ),
                None => base.segment.clone(),
            }
        };
        let created = models::create_version(
            pool,
            NewModel {
                name: input.name.unwrap_or_else(|| base.name.clone()),
                priority: input.priority.unwrap_or(base.priority),
                segment,
                config,
                notes: input
                    .notes
                    .or_else(|| Some(format!("Based on version {}", base.version))),
                created_by: Some(viewer.name),
                activate: input.activate,
            },
        )
        .await
        .map_err(to_gql)?;
        Ok(created.into())
    }

    /// Makes a version active: a default model replaces the active default, a segment model the
    /// active model with the same segment. Takes effect at the next rescore. Admin only.
    async fn activate_scoring_model(
        &self,
        ctx: &Context<'_>,
        version: i32,
    ) -> async_graphql::Result<ScoringModelObject> {
        auth::require(ctx, Role::Admin)?;
        let pool = ctx.data::<DbPool>()?;
        Ok(models::activate(pool, version)
            .await
            .map_err(to_gql)?
            .into())
    }

    /// Deactivates a segment model (its accounts fall back to the next match or the default). Admin only.
    async fn deactivate_scoring_model(
        &self,
        ctx: &Context<'_>,
        version: i32,
    ) -> async_graphql::Result<ScoringModelObject> {
        auth::require(ctx, Role::Admin)?;
        let pool = ctx.data::<DbPool>()?;
        Ok(models::deactivate(pool, version)
            .await
            .map_err(to_gql)?
            .into())
    }

    /// Rescores every account now. Admin only.
    async fn recompute_scores(&self, ctx: &Context<'_>) -> async_graphql::Result<RescoreResult> {
        auth::require(ctx, Role::Admin)?;
        let pool = ctx.data::<DbPool>()?;
        Ok(scoring::recompute_now(pool).await.map_err(to_gql)?.into())
    }

    /// Fits weights to churn outcomes and stores them as an inactive model version. Admin only.
    async fn calibrate_scoring_model(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "CalibrateScoringModelInput { lookback_days: 30 }")]
        input: CalibrateScoringModelInput,
    ) -> async_graphql::Result<CalibrationReport> {
        auth::require(ctx, Role::Admin)?;
        let pool = ctx.data::<DbPool>()?;
        Ok(scoring::calibrate(pool, input.lookback_days as i64)
            .await
            .map_err(to_gql)?
            .into())
    }
}
