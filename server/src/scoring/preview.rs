//! Model preview: what a candidate model version would do to today's accounts, before anyone
//! activates it. Nothing is written: every account is scored twice in memory (active models and
//! candidate, same facts, same moment), so the difference is the model's effect alone.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::calibration::{auc, churn_risk, churn_samples, Sample};
use super::engine::{score_account, EngineContext, Score, Tier};
use super::inputs::{self, BATCH_SIZE};
use super::model::{self, ActiveModels, ScoringModel};
use super::run::{next_account_ids, run_context, RunContext};
use super::ScoringError;
use crate::db::DbPool;

/// How many of the biggest movers a preview lists.
pub const MOVERS: usize = 10;

/// Accounts moving from one tier to another under the candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct TierMove {
    pub from: Tier,
    pub to: Tier,
    pub accounts: usize,
}

/// One account whose score the candidate changes most.
#[derive(Debug, Clone, PartialEq)]
pub struct Mover {
    pub key: String,
    pub name: String,
    pub before_score: f64,
    pub before_tier: Tier,
    pub after_score: f64,
    pub after_tier: Tier,
    /// Explanations of the top drivers under the active model, worst first.
    pub before_drivers: Vec<String>,
    /// The same under the candidate.
    pub after_drivers: Vec<String>,
}

/// The candidate against the active models on past churn (same samples as calibration).
#[derive(Debug, Clone, PartialEq)]
pub struct ChurnBacktest {
    pub lookback_days: i64,
    pub accounts: usize,
    pub churned: usize,
    pub auc_candidate: f64,
    pub auc_active: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelPreview {
    pub candidate_version: i32,
    pub candidate_active: bool,
    pub computed_at: DateTime<Utc>,
    pub accounts_scored: usize,
    pub accounts_changed_tier: usize,
    /// Largest groups first.
    pub tier_moves: Vec<TierMove>,
    /// Mean of (candidate − active) over scored accounts, in points.
    pub mean_score_change: f64,
    /// Largest absolute change first.
    pub movers: Vec<Mover>,
    /// `None` when the store has no churn outcomes (or not both classes).
    pub backtest: Option<ChurnBacktest>,
}

/// The active models with `candidate` in the place it would take when activated: a default
/// model replaces the default, a segment model the active model of the same segment.
fn with_candidate(active: &ActiveModels, candidate: &ScoringModel) -> ActiveModels {
    match &candidate.segment {
        None => ActiveModels::new(candidate.clone(), active.segments.clone()),
        Some(_) => {
            let mut segments: Vec<ScoringModel> = active
                .segments
                .iter()
                .filter(|m| m.segment != candidate.segment)
                .cloned()
                .collect();
            segments.push(candidate.clone());
            ActiveModels::new(active.default.clone(), segments)
        }
    }
}

fn top_drivers(s: &Score) -> Vec<String> {
    s.drivers()
        .into_iter()
        .take(3)
        .map(|d| d.explanation.clone())
        .collect()
}

/// Scores every account with the active models and with `version` as of `now`; writes nothing.
pub async fn preview(
    pool: &DbPool,
    version: i32,
    now: DateTime<Utc>,
) -> Result<ModelPreview, ScoringError> {
    let candidate = model::get_model(pool, Some(version))
        .await?
        .ok_or(ScoringError::ModelNotFound(version))?;
    let mut conn = pool.get().await?;
    let run = run_context(&mut conn, now, false, true).await?;
    let cand_models = with_candidate(&run.models, &candidate);
    let csat_window = run.models.default.config.csat_window_days;

    // (account id, before, after) for every scored account: a few bytes each, one pass.
    let mut pairs: Vec<(i64, f64, Tier, f64, Tier)> = Vec::new();
    let mut last_id = i64::MIN;
    loop {
        let ids = next_account_ids(&mut conn, last_id, BATCH_SIZE).await?;
        let Some(&l) = ids.last() else { break };
        last_id = l;
        let batch =
            inputs::load_inputs_at(&mut conn, &ids, now, run.support_synced, csat_window).await?;
        for i in &batch {
            let before = score_account(i, now, run.models.for_account(&i.fields), &run.engine);
            let after = score_account(i, now, cand_models.for_account(&i.fields), &run.engine);
            if let (Some(b), Some(a)) = (before, after) {
                pairs.push((i.account_id, b.score, b.tier, a.score, a.tier));
            }
        }
    }

    let mut moves: Vec<TierMove> = Vec::new();
    for &(_, _, bt, _, at) in pairs.iter().filter(|p| p.2 != p.4) {
        match moves.iter_mut().find(|m| m.from == bt && m.to == at) {
            Some(m) => m.accounts += 1,
            None => moves.push(TierMove {
                from: bt,
                to: at,
                accounts: 1,
            }),
        }
    }
    moves.sort_by_key(|m| std::cmp::Reverse(m.accounts));
    let changed_tier = moves.iter().map(|m| m.accounts).sum();
    let mean = if pairs.is_empty() {
        0.0
    } else {
        pairs.iter().map(|p| p.3 - p.1).sum::<f64>() / pairs.len() as f64
    };

    // The biggest movers, then their drivers from a second, small load of just those accounts.
    let mut by_change: Vec<&(i64, f64, Tier, f64, Tier)> =
        pairs.iter().filter(|p| p.3 != p.1).collect();
    by_change.sort_by(|a, b| {
        (b.3 - b.1)
            .abs()
            .partial_cmp(&(a.3 - a.1).abs())
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    });
    by_change.truncate(MOVERS);
    let mover_ids: Vec<i64> = by_change.iter().map(|p| p.0).collect();
    let movers = movers(&mut conn, &run, &cand_models, &mover_ids, now).await?;

    let backtest = backtest(&mut conn, &run, &cand_models, now).await?;
    Ok(ModelPreview {
        candidate_version: candidate.version,
        candidate_active: candidate.active,
        computed_at: now,
        accounts_scored: pairs.len(),
        accounts_changed_tier: changed_tier,
        tier_moves: moves,
        mean_score_change: (mean * 100.0).round() / 100.0,
        movers,
        backtest,
    })
}

async fn movers(
    conn: &mut AsyncPgConnection,
    run: &RunContext,
    cand: &ActiveModels,
    ids: &[i64],
    now: DateTime<Utc>,
) -> Result<Vec<Mover>, ScoringError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    #[derive(QueryableByName)]
    struct Named {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = Text)]
        key: String,
        #[diesel(sql_type = Text)]
        name: String,
    }
    let names: Vec<Named> =
        diesel::sql_query("SELECT id, key, name FROM accounts WHERE id = ANY($1)")
            .bind::<Array<BigInt>, _>(ids)
            .load(conn)
            .await?;
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    let batch = inputs::load_inputs_at(
        conn,
        &sorted,
        now,
        run.support_synced,
        run.models.default.config.csat_window_days,
    )
    .await?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let (Some(i), Some(n)) = (
            batch.iter().find(|i| i.account_id == *id),
            names.iter().find(|n| n.id == *id),
        ) else {
            continue;
        };
        let (Some(b), Some(a)) = (
            score_account(i, now, run.models.for_account(&i.fields), &run.engine),
            score_account(i, now, cand.for_account(&i.fields), &run.engine),
        ) else {
            continue;
        };
        out.push(Mover {
            key: n.key.clone(),
            name: n.name.clone(),
            before_score: b.score,
            before_tier: b.tier,
            after_score: a.score,
            after_tier: a.tier,
            before_drivers: top_drivers(&b),
            after_drivers: top_drivers(&a),
        });
    }
    Ok(out)
}

/// The candidate's and the active models' AUC for churn on calibration's samples (30 days back).
async fn backtest(
    conn: &mut AsyncPgConnection,
    run: &RunContext,
    cand: &ActiveModels,
    now: DateTime<Utc>,
) -> Result<Option<ChurnBacktest>, ScoringError> {
    const LOOKBACK_DAYS: i64 = 30;
    // Calibration's context: today's, without freshness (data is looked at in the past).
    let backtest_run = RunContext {
        models: run.models.clone(),
        engine: EngineContext {
            default_key_features: run.engine.default_key_features.clone(),
            stale: Vec::new(),
        },
        support_synced: run.support_synced,
    };
    let Some(samples) = churn_samples(conn, &backtest_run, LOOKBACK_DAYS, now).await? else {
        return Ok(None);
    };
    let positives: Vec<bool> = samples.samples.iter().map(|s| s.churned).collect();
    let all: Vec<&Sample> = samples.samples.iter().collect();
    let engine = &backtest_run.engine;
    let (Some(auc_candidate), Some(auc_active)) = (
        auc(
            &churn_risk(&all, engine, |i| cand.for_account(&i.fields)),
            &positives,
        ),
        auc(
            &churn_risk(&all, engine, |i| run.models.for_account(&i.fields)),
            &positives,
        ),
    ) else {
        return Ok(None);
    };
    Ok(Some(ChurnBacktest {
        lookback_days: LOOKBACK_DAYS,
        accounts: samples.samples.len(),
        churned: samples.churned,
        auc_candidate: (auc_candidate * 1000.0).round() / 1000.0,
        auc_active: (auc_active * 1000.0).round() / 1000.0,
    }))
}
