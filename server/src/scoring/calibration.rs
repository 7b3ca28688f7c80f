//! Calibration: fit signal weights to actual churn ("review weights quarterly against actual churn").
//!
//! 1. Every account with a churn outcome is looked at `lookback_days` before it churned; every other
//!    account at one of those same dates (picked by a hash of its id), so both groups are seen at
//!    comparable moments.
//! 2. The signals are computed as of those moments with the same engine that scores today (missing
//!    signals are imputed with the training mean of that signal).
//! 3. Accounts are split deterministically by a hash of their id: 70% train, 30% held out.
//! 4. A logistic regression (linfa-logistic, lightly L2-regularised) of churn on the 0–1 signal scores
//!    is fitted on the training accounts. A signal whose higher score means less churn has a negative
//!    coefficient; the proposed weights are those protective coefficients, normalised to 100 points
//!    (signals that do not protect get 0).
//! 5. On the held-out accounts, the AUC of the score for churn (lower score = more risk) is reported
//!    for the proposed weights, the active model and equal weights, all scored by the full engine.
//! 6. The proposal is stored as a new, inactive model version an admin can activate.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use diesel::sql_types::{BigInt, Timestamptz};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use linfa::traits::Fit;
use linfa::Dataset;
use linfa_logistic::LogisticRegression;
use ndarray::{Array1, Array2};

use super::engine::{evaluate_signals, score_account, EngineContext};
use super::inputs::{self, BATCH_SIZE};
use super::model::{self, ModelConfig, NewModel, ScoringModel};
use super::run::{run_context, RunContext};
use super::signals::{AccountInputs, SignalKey};
use super::ScoringError;
use crate::db::DbPool;

/// One signal's result.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibratedSignal {
    pub key: String,
    pub label: String,
    /// Logistic-regression coefficient for churn (negative: a higher score means less churn).
    pub coefficient: f64,
    pub proposed_weight: f64,
    pub active_weight: f64,
    /// Share of sampled accounts where the signal had data.
    pub coverage: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationReport {
    pub lookback_days: i64,
    pub churned_accounts: usize,
    pub retained_accounts: usize,
    pub train_size: usize,
    pub train_churned: usize,
    pub test_size: usize,
    pub test_churned: usize,
    /// Highest proposed weight first.
    pub signals: Vec<CalibratedSignal>,
    pub auc_proposed: f64,
    pub auc_active: f64,
    pub auc_equal: f64,
    /// 95% bootstrap interval of `auc_proposed` over the held-out accounts.
    pub auc_proposed_interval: (f64, f64),
    /// `auc_proposed - auc_active`, and the half-width of its 95% bootstrap interval.
    pub auc_gain: f64,
    pub auc_gain_margin: f64,
    /// Plain words: is the proposal better than the active model, beyond noise?
    pub verdict: String,
    /// Signals the proposal gives no weight: they no longer count and never show as drivers.
    pub zero_weight_signals: Vec<String>,
    pub active_version: i32,
    /// The inactive model version holding the proposal.
    pub proposed_version: i32,
    pub notes: String,
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Deterministic held-out split: about 30% of accounts, by a hash of the id.
pub fn is_held_out(account_id: i64) -> bool {
    splitmix64(account_id as u64) % 100 >= 70
}

/// Area under the ROC curve of `risk` for `positive` (ties count half). `None` without both classes.
pub fn auc(risk: &[f64], positive: &[bool]) -> Option<f64> {
    let n_pos = positive.iter().filter(|p| **p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..risk.len()).collect();
    idx.sort_by(|&a, &b| {
        risk[a]
            .partial_cmp(&risk[b])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    // Average ranks over ties (1-based).
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && risk[idx[j + 1]] == risk[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if positive[k] {
                rank_sum_pos += avg_rank;
            }
        }
        i = j + 1;
    }
    let u = rank_sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

pub(crate) struct Sample {
    pub account_id: i64,
    pub churned: bool,
    pub at: DateTime<Utc>,
    pub inputs: AccountInputs,
    /// Signal scores in `SignalKey::ALL` order; `None` when missing.
    pub scores: Vec<Option<f64>>,
}

/// Accounts seen as they were before their churn (and retained accounts at the same moments).
pub(crate) struct ChurnSamples {
    pub samples: Vec<Sample>,
    /// How many of `samples` churned.
    pub churned: usize,
}

/// Step 1 and 2 of the module's recipe: every churned account `lookback_days` before its churn,
/// every other account at one of those moments, with its signals computed by the active default
/// model. `None` when the store has no churn outcomes.
pub(crate) async fn churn_samples(
    conn: &mut AsyncPgConnection,
    run: &RunContext,
    lookback_days: i64,
    now: DateTime<Utc>,
) -> Result<Option<ChurnSamples>, ScoringError> {
    #[derive(QueryableByName)]
    struct Churn {
        #[diesel(sql_type = BigInt)]
        account_id: i64,
        #[diesel(sql_type = Timestamptz)]
        churned_at: DateTime<Utc>,
    }
    let churn: Vec<Churn> = diesel::sql_query(
        "SELECT c.account_id, MIN(c.churned_at) AS churned_at FROM churn_outcomes c
         JOIN accounts a ON a.id = c.account_id GROUP BY c.account_id ORDER BY c.account_id",
    )
    .load(conn)
    .await?;
    if churn.is_empty() {
        return Ok(None);
    }
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let all: Vec<Id> = diesel::sql_query("SELECT id FROM accounts ORDER BY id")
        .load(conn)
        .await?;
    let churned_ids: HashSet<i64> = churn.iter().map(|c| c.account_id).collect();
    let lookback = Duration::days(lookback_days);
    let mut moments: Vec<DateTime<Utc>> = churn
        .iter()
        .map(|c| (c.churned_at - lookback).min(now))
        .collect();
    moments.sort();
    let mut plan: Vec<(i64, bool, DateTime<Utc>)> = churn
        .iter()
        .map(|c| (c.account_id, true, (c.churned_at - lookback).min(now)))
        .collect();
    for a in all.iter().filter(|a| !churned_ids.contains(&a.id)) {
        let at = moments[(splitmix64(a.id as u64 ^ 0x5EED) % moments.len() as u64) as usize];
        plan.push((a.id, false, at));
    }
    plan.sort_by_key(|p| p.0);

    let active = &run.models.default;
    let support = inputs::support_synced(conn, now).await?;
    let mut samples: Vec<Sample> = Vec::with_capacity(plan.len());
    for chunk in plan.chunks(BATCH_SIZE) {
        let ids: Vec<i64> = chunk.iter().map(|p| p.0).collect();
        let ts: Vec<DateTime<Utc>> = chunk.iter().map(|p| p.2).collect();
        let loaded =
            inputs::load_inputs(conn, &ids, &ts, support, active.config.csat_window_days).await?;
        for (inp, p) in loaded.into_iter().zip(chunk.iter()) {
            debug_assert_eq!(inp.account_id, p.0);
            let evals = evaluate_signals(&inp, p.2, &active.config, &run.engine);
            let scores = evals
                .iter()
                .map(|(_, e)| e.as_ref().map(|e| e.score))
                .collect();
            samples.push(Sample {
                account_id: p.0,
                churned: p.1,
                at: p.2,
                inputs: inp,
                scores,
            });
        }
    }
    let churned = churn.len();
    Ok(Some(ChurnSamples { samples, churned }))
}

/// Resamples of the held-out accounts behind the confidence intervals.
pub(crate) const BOOTSTRAP_ROUNDS: usize = 1000;

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// 95% percentile intervals, from bootstrap resamples of the held-out accounts.
struct Bootstrap {
    proposed: (f64, f64),
    /// Of proposed − active on the same resample (paired, so shared noise cancels).
    gain: (f64, f64),
}

/// Resamples accounts with replacement `rounds` times (deterministic seed: reports repeat).
fn bootstrap(proposed: &[f64], active: &[f64], positive: &[bool], rounds: usize) -> Bootstrap {
    let n = positive.len();
    let mut seed = 0x0A0C_u64;
    let mut p_aucs = Vec::with_capacity(rounds);
    let mut gains = Vec::with_capacity(rounds);
    let (mut rp, mut ra, mut pos) = (vec![0.0; n], vec![0.0; n], vec![false; n]);
    for _ in 0..rounds {
        for i in 0..n {
            seed = splitmix64(seed);
            let j = (seed % n as u64) as usize;
            rp[i] = proposed[j];
            ra[i] = active[j];
            pos[i] = positive[j];
        }
        if let (Some(p), Some(a)) = (auc(&rp, &pos), auc(&ra, &pos)) {
            p_aucs.push(p);
            gains.push(p - a);
        }
    }
    let interval = |v: &mut Vec<f64>| -> (f64, f64) {
        if v.is_empty() {
            return (0.0, 1.0);
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        (round3(at(0.025)), round3(at(0.975)))
    };
    Bootstrap {
        proposed: interval(&mut p_aucs),
        gain: interval(&mut gains),
    }
}

/// "better than the active model: yes, by 0.05 ± 0.03" — yes only when the whole 95% interval of
/// the gain is above zero.
fn verdict(gain: f64, interval: (f64, f64)) -> String {
    let margin = (interval.1 - interval.0) / 2.0;
    if interval.0 > 0.0 {
        format!("better than the active model: yes, by {gain:.2} ± {margin:.2}")
    } else if interval.1 < 0.0 {
        format!(
            "better than the active model: no, worse by {:.2} ± {margin:.2}; keep the active model",
            -gain
        )
    } else {
        format!(
            "better than the active model: not shown (difference {gain:+.2} ± {margin:.2} is within noise on this data)"
        )
    }
}

/// Risk of each sample under the model `pick` chooses for it (minus the score, so higher is
/// riskier; an account the engine cannot score counts as middling).
pub(crate) fn churn_risk<'m>(
    samples: &[&Sample],
    engine: &EngineContext,
    pick: impl Fn(&AccountInputs) -> &'m ScoringModel,
) -> Vec<f64> {
    samples
        .iter()
        .map(|s| {
            score_account(&s.inputs, s.at, pick(&s.inputs), engine).map_or(-50.0, |sc| -sc.score)
        })
        .collect()
}

fn with_weights(base: &ScoringModel, weights: BTreeMap<String, f64>) -> ScoringModel {
    let mut m = base.clone();
    m.config.weights = weights;
    m
}

/// Fits weights to churn outcomes as of `lookback_days` before churn, reports held-out AUCs and
/// stores the proposal as an inactive model version. For `healthd calibrate` and
/// `calibrateScoringModel`.
pub async fn calibrate(
    pool: &DbPool,
    lookback_days: i64,
) -> Result<CalibrationReport, ScoringError> {
    calibrate_at(pool, lookback_days, Utc::now()).await
}

/// [`calibrate`] with an injectable "now" (accounts are never looked at after it).
pub async fn calibrate_at(
    pool: &DbPool,
    lookback_days: i64,
    now: DateTime<Utc>,
) -> Result<CalibrationReport, ScoringError> {
    if !(1..=3650).contains(&lookback_days) {
        return Err(ScoringError::Calibration(
            "lookbackDays must be between 1 and 3650".into(),
        ));
    }
    let mut conn = pool.get().await?;
    let run = run_context(&mut conn, now, false, false).await?;
    let active = run.models.default.clone();
    let Some(backtest) = churn_samples(&mut conn, &run, lookback_days, now).await? else {
        return Err(ScoringError::Calibration(
            "there are no churn outcomes in the store".into(),
        ));
    };
    let ChurnSamples { samples, churned } = backtest;
    drop(conn);

    let (train, test): (Vec<&Sample>, Vec<&Sample>) =
        samples.iter().partition(|s| !is_held_out(s.account_id));
    let train_churned = train.iter().filter(|s| s.churned).count();
    let test_churned = test.iter().filter(|s| s.churned).count();
    if train_churned == 0
        || train_churned == train.len()
        || test_churned == 0
        || test_churned == test.len()
    {
        return Err(ScoringError::Calibration(format!(
            "need churned and retained accounts in both the training ({} of {} churned) and held-out ({} of {} churned) sets",
            train_churned,
            train.len(),
            test_churned,
            test.len()
        )));
    }

    let k = SignalKey::ALL.len();
    let mut means = vec![0.5; k];
    let mut coverage = vec![0.0; k];
    for (j, mean) in means.iter_mut().enumerate() {
        let present: Vec<f64> = train.iter().filter_map(|s| s.scores[j]).collect();
        if !present.is_empty() {
            *mean = present.iter().sum::<f64>() / present.len() as f64;
        }
        coverage[j] =
            samples.iter().filter(|s| s.scores[j].is_some()).count() as f64 / samples.len() as f64;
    }
    let mut x = Array2::<f64>::zeros((train.len(), k));
    let mut y = Array1::<usize>::zeros(train.len());
    for (i, s) in train.iter().enumerate() {
        for j in 0..k {
            x[[i, j]] = s.scores[j].unwrap_or(means[j]);
        }
        y[i] = usize::from(s.churned);
    }
    let fitted = LogisticRegression::default()
        .alpha(0.01)
        .max_iterations(500)
        .fit(&Dataset::new(x, y))
        .map_err(|e| ScoringError::Calibration(format!("logistic regression failed: {e}")))?;
    // Coefficients are for the probability of the larger label (1 = churned); flip if not.
    let sign = if fitted.labels().pos.class == 1 {
        1.0
    } else {
        -1.0
    };
    let coefs: Vec<f64> = fitted.params().iter().map(|c| c * sign).collect();
    let protective: Vec<f64> = coefs.iter().map(|c| (-c).max(0.0)).collect();
    let total: f64 = protective.iter().sum();
    if total <= 1e-9 {
        return Err(ScoringError::Calibration(
            "no signal predicted retention on this data; keep the current weights".into(),
        ));
    }
    let proposed: BTreeMap<String, f64> = SignalKey::ALL
        .iter()
        .zip(protective.iter())
        .map(|(key, p)| {
            (
                key.as_str().to_string(),
                (p * 1000.0 / total).round() / 10.0,
            )
        })
        .collect();
    let equal: BTreeMap<String, f64> = SignalKey::ALL
        .iter()
        .map(|key| (key.as_str().to_string(), 100.0 / k as f64))
        .collect();
    let proposed_model = with_weights(&active, proposed.clone());
    let equal_model = with_weights(&active, equal);

    let positives: Vec<bool> = test.iter().map(|s| s.churned).collect();
    let risk_proposed = churn_risk(&test, &run.engine, |_| &proposed_model);
    let risk_active = churn_risk(&test, &run.engine, |i| run.models.for_account(&i.fields));
    let risk_equal = churn_risk(&test, &run.engine, |_| &equal_model);
    let auc_proposed = auc(&risk_proposed, &positives).unwrap_or(0.5);
    let auc_equal = auc(&risk_equal, &positives).unwrap_or(0.5);
    let auc_active = auc(&risk_active, &positives).unwrap_or(0.5);
    let boot = bootstrap(&risk_proposed, &risk_active, &positives, BOOTSTRAP_ROUNDS);
    let auc_gain = round3(auc_proposed - auc_active);
    let auc_gain_margin = round3((boot.gain.1 - boot.gain.0) / 2.0);
    let verdict = verdict(auc_gain, boot.gain);
    let zero_weight_signals: Vec<String> = SignalKey::ALL
        .iter()
        .filter(|k| proposed[k.as_str()] <= 0.0)
        .map(|k| k.as_str().to_string())
        .collect();

    let notes = format!(
        "Calibrated on {} accounts ({} churned), lookback {} days; held-out AUC {:.3} (active v{} {:.3}, equal weights {:.3}) on {} accounts ({} churned). Subscriptions are seen in their current state.",
        samples.len(),
        churned,
        lookback_days,
        auc_proposed,
        active.version,
        auc_active,
        auc_equal,
        test.len(),
        test_churned
    );
    let mut config: ModelConfig = active.config.clone();
    config.weights = proposed.clone();
    let stored = model::create_version(
        pool,
        NewModel {
            name: format!("calibrated {}", now.format("%Y-%m-%d")),
            segment: None,
            priority: 0,
            config,
            notes: Some(notes.clone()),
            created_by: Some("calibration".into()),
            activate: false,
        },
    )
    .await?;

    let mut signals: Vec<CalibratedSignal> = SignalKey::ALL
        .iter()
        .enumerate()
        .map(|(j, key)| CalibratedSignal {
            key: key.as_str().into(),
            label: key.label().into(),
            coefficient: (coefs[j] * 1000.0).round() / 1000.0,
            proposed_weight: proposed[key.as_str()],
            active_weight: active.config.weight(*key),
            coverage: (coverage[j] * 1000.0).round() / 1000.0,
        })
        .collect();
    signals.sort_by(|a, b| {
        b.proposed_weight
            .partial_cmp(&a.proposed_weight)
            .unwrap_or(std::cmp::Ordering::Equal)
    });

    Ok(CalibrationReport {
        lookback_days,
        churned_accounts: churned,
        retained_accounts: samples.len() - churned,
        train_size: train.len(),
        train_churned,
        test_size: test.len(),
        test_churned,
        signals,
        auc_proposed,
        auc_active,
        auc_equal,
        auc_proposed_interval: boot.proposed,
        auc_gain,
        auc_gain_margin,
        verdict,
        zero_weight_signals,
        active_version: active.version,
        proposed_version: stored.version,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_perfect_and_inverted_rankings() {
        let pos = [true, true, false, false];
        assert_eq!(auc(&[0.9, 0.8, 0.1, 0.2], &pos), Some(1.0));
        assert_eq!(auc(&[0.1, 0.2, 0.9, 0.8], &pos), Some(0.0));
        assert_eq!(auc(&[0.5, 0.5, 0.5, 0.5], &pos), Some(0.5));
        assert_eq!(auc(&[0.5], &[true]), None);
    }

    #[test]
    fn split_is_deterministic_and_roughly_30_percent() {
        let held = (1..=10_000).filter(|i| is_held_out(*i)).count();
        assert!((2_500..3_500).contains(&held), "{held}");
        assert_eq!(is_held_out(42), is_held_out(42));
    }

    #[test]
    fn verdict_needs_the_whole_interval_above_zero() {
        assert!(verdict(0.05, (0.02, 0.08)).contains("yes, by 0.05 ± 0.03"));
        assert!(verdict(0.01, (-0.02, 0.04)).contains("not shown"));
        assert!(verdict(-0.05, (-0.08, -0.02)).contains("no, worse by 0.05"));
    }

    #[test]
    fn bootstrap_interval_contains_the_point_estimate() {
        let pos: Vec<bool> = (0..200).map(|i| i % 3 == 0).collect();
        let good: Vec<f64> = (0..200)
            .map(|i| if i % 3 == 0 { 0.6 } else { 0.4 } + (i % 7) as f64 * 0.05)
            .collect();
        let noise: Vec<f64> = (0..200).map(|i| ((i * 37) % 11) as f64).collect();
        let b = bootstrap(&good, &noise, &pos, 300);
        let point = auc(&good, &pos).unwrap();
        assert!(
            b.proposed.0 <= point && point <= b.proposed.1,
            "{:?} {point}",
            b.proposed
        );
        assert!(b.gain.0 > 0.0, "a real signal beats noise: {:?}", b.gain);
    }
}
