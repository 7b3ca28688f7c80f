//! The scoring function: pure over (an account's facts as of T, T, the model). Today's scores, history
//! rebuilds, `healthChange` model splits and calibration backtests all call [`score_account`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::breakdown;
use super::model::{ModelConfig, OverrideCondition, ScoringModel};
use super::signals::{self, money, AccountInputs, SignalEval, SignalKey, SourceKind};

/// `HEALTHY | AT_RISK | CRITICAL`, stored lower-case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Tier {
    Healthy,
    AtRisk,
    Critical,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Healthy => "healthy",
            Tier::AtRisk => "at_risk",
            Tier::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Tier> {
        match s.to_ascii_lowercase().as_str() {
            "healthy" => Some(Tier::Healthy),
            "at_risk" => Some(Tier::AtRisk),
            "critical" => Some(Tier::Critical),
            _ => None,
        }
    }

    pub fn for_score(score: f64, cfg: &ModelConfig) -> Tier {
        if score >= cfg.tiers.healthy {
            Tier::Healthy
        } else if score >= cfg.tiers.at_risk {
            Tier::AtRisk
        } else {
            Tier::Critical
        }
    }
}

/// How old one kind of data is, when older than allowed. Computed once per rescore from
/// `source_freshness` and `connectors.max_age_hours`.
#[derive(Debug, Clone, PartialEq)]
pub struct StaleSource {
    pub kind: SourceKind,
    pub age_hours: f64,
    pub max_age_hours: f64,
}

/// Per-run context that is the same for every account.
#[derive(Debug, Clone, Default)]
pub struct EngineContext {
    /// Key features used when the model does not name its own.
    pub default_key_features: Vec<String>,
    /// Kinds of data older than allowed (empty in backtests).
    pub stale: Vec<StaleSource>,
}

/// One entry of the stored `signals` array (see the contract in `scoring/mod.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalScore {
    pub key: String,
    /// Not stored (it follows from the key, see `breakdown::label_for`).
    #[serde(default)]
    pub label: String,
    pub value: f64,
    pub score: f64,
    /// Points this signal could earn after missing signals' weight was shared out.
    pub weight: f64,
    /// Points earned (negative for a score cap).
    pub contribution: f64,
    /// Points lost.
    pub impact: f64,
    pub explanation: String,
    /// Stored only when true, like `stale`.
    #[serde(default)]
    pub missing: bool,
    #[serde(default)]
    pub stale: bool,
}

/// A computed score.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub account_id: i64,
    pub score: f64,
    pub tier: Tier,
    pub stale: bool,
    pub model_version: i32,
    pub signals: Vec<SignalScore>,
}

impl Score {
    /// The signals that cost points, worst first, stale-data entries before everything else: the
    /// same rule the read API applies.
    pub fn drivers(&self) -> Vec<&SignalScore> {
        drivers(&self.signals)
    }
}

/// Drivers of a stored signal list: stale entries first, then impact > 0 by impact descending.
pub fn drivers(signals: &[SignalScore]) -> Vec<&SignalScore> {
    let mut d: Vec<&SignalScore> = signals
        .iter()
        .filter(|s| s.stale || s.impact > 0.0)
        .collect();
    d.sort_by(|a, b| {
        b.stale.cmp(&a.stale).then(
            b.impact
                .partial_cmp(&a.impact)
                .unwrap_or(std::cmp::Ordering::Equal),
        )
    });
    d
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Rounds to one decimal: small float noise must not count as a score change.
pub fn round_score(x: f64) -> f64 {
    ((x * 10.0).round() / 10.0).clamp(0.0, 100.0)
}

fn missing_text(key: SignalKey) -> &'static str {
    match key.source() {
        SourceKind::Usage if key == SignalKey::FeatureAdoption => {
            "No key features known yet (no feature usage recorded across accounts)"
        }
        SourceKind::Usage => "No usage data received for this account",
        SourceKind::Support => "No support data received for this account",
        SourceKind::Billing => "No billing data received for this account",
    }
}

/// Evaluates each signal for which the account has data (`None`: missing).
pub fn evaluate_signals(
    inputs: &AccountInputs,
    now: DateTime<Utc>,
    cfg: &ModelConfig,
    ctx: &EngineContext,
) -> Vec<(SignalKey, Option<SignalEval>)> {
    let key_features: &[String] = if cfg.key_features.is_empty() {
        &ctx.default_key_features
    } else {
        &cfg.key_features
    };
    SignalKey::ALL
        .iter()
        .map(|&k| {
            let eval = match k {
                SignalKey::LoginRecency => inputs
                    .usage
                    .as_ref()
                    .map(|u| signals::login_recency(u, now, cfg)),
                SignalKey::Breadth => inputs
                    .usage
                    .as_ref()
                    .map(|u| signals::breadth(u, &inputs.fields, cfg)),
                SignalKey::Frequency => inputs.usage.as_ref().map(|u| signals::frequency(u, cfg)),
                SignalKey::UsageTrend => {
                    inputs.usage.as_ref().map(|u| signals::usage_trend(u, cfg))
                }
                SignalKey::FeatureAdoption => inputs
                    .usage
                    .as_ref()
                    .and_then(|u| signals::feature_adoption(u, key_features, cfg)),
                SignalKey::Support => inputs
                    .support
                    .as_ref()
                    .map(|s| signals::support(s, &inputs.fields, now, cfg)),
                SignalKey::Billing => inputs.billing.as_ref().map(|b| signals::billing(b, cfg)),
            };
            (k, eval)
        })
        .collect()
}

/// The cause text of a cap, or `None` when its condition does not hold.
fn override_cause(
    cond: &OverrideCondition,
    inputs: &AccountInputs,
    now: DateTime<Utc>,
) -> Option<String> {
    match cond {
        OverrideCondition::SubscriptionCancelling => {
            let b = inputs.billing.as_ref().filter(|b| b.cancelling())?;
            Some(match b.current_period_end {
                Some(end) => format!(
                    "Subscription set to cancel on {}",
                    end.date_naive().format("%Y-%m-%d")
                ),
                None => "Subscription set to cancel at the end of the period".into(),
            })
        }
        OverrideCondition::SubscriptionStatus { statuses } => {
            let status = inputs.billing.as_ref()?.subscription_status.as_deref()?;
            statuses
                .iter()
                .any(|s| s.eq_ignore_ascii_case(status))
                .then(|| format!("Subscription {}", status.replace('_', " ")))
        }
        OverrideCondition::InvoiceOverdueDays { min_days } => {
            let b = inputs
                .billing
                .as_ref()
                .filter(|b| b.overdue_count > 0 && b.max_days_overdue >= *min_days)?;
            Some(if b.overdue_count == 1 {
                format!(
                    "Invoice {} days past due ({})",
                    b.max_days_overdue,
                    money(b.overdue_cents)
                )
            } else {
                format!(
                    "{} invoices past due ({}), oldest {} days",
                    b.overdue_count,
                    money(b.overdue_cents),
                    b.max_days_overdue
                )
            })
        }
        OverrideCondition::NoLoginDays { min_days } => {
            let u = inputs.usage.as_ref()?;
            let days = u
                .last_seen_day
                .map(|d| (now.date_naive() - d).num_days())
                .unwrap_or(i64::MAX);
            (days >= *min_days).then(|| {
                if days == i64::MAX {
                    "No login recorded yet".to_string()
                } else {
                    format!("No login in {days} days")
                }
            })
        }
    }
}

fn stale_text(s: &StaleSource) -> String {
    let age = if s.age_hours >= 48.0 {
        let days = (s.age_hours / 24.0).floor() as i64;
        format!("{days} days")
    } else {
        format!("{} hours", s.age_hours.floor() as i64)
    };
    format!("{} data is {age} old", s.kind.title())
}

/// Scores one account. Returns `None` when the account has no data of any kind yet (it stays
/// unscored rather than scoring zero).
pub fn score_account(
    inputs: &AccountInputs,
    now: DateTime<Utc>,
    model: &ScoringModel,
    ctx: &EngineContext,
) -> Option<Score> {
    let cfg = &model.config;
    let evals = evaluate_signals(inputs, now, cfg, ctx);
    let total: f64 = evals
        .iter()
        .filter(|(_, e)| e.is_some())
        .map(|(k, _)| cfg.weight(*k))
        .sum();
    if total <= 0.0 {
        return None;
    }
    let mut out = Vec::with_capacity(evals.len() + 2);
    let mut raw = 0.0;
    for (key, eval) in evals {
        let configured = cfg.weight(key);
        match eval {
            Some(e) => {
                let weight = configured * 100.0 / total;
                let contribution = weight * e.score;
                raw += contribution;
                out.push(SignalScore {
                    key: key.as_str().into(),
                    label: key.label().into(),
                    value: round2(e.value),
                    score: (e.score * 1000.0).round() / 1000.0,
                    weight: round2(weight),
                    contribution: round2(contribution),
                    impact: round2(weight - contribution),
                    explanation: e.explanation,
                    missing: false,
                    stale: false,
                });
            }
            None => out.push(SignalScore {
                key: key.as_str().into(),
                label: key.label().into(),
                value: 0.0,
                score: 0.0,
                weight: 0.0,
                contribution: 0.0,
                impact: 0.0,
                explanation: missing_text(key).into(),
                missing: true,
                stale: false,
            }),
        }
    }
    // Caps: the lowest applicable cap binds; the points it takes are a driver of their own.
    let binding = cfg
        .overrides
        .iter()
        .filter_map(|o| override_cause(&o.when, inputs, now).map(|cause| (o, cause)))
        .min_by(|a, b| {
            a.0.cap
                .partial_cmp(&b.0.cap)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    let mut score = raw;
    if let Some((o, cause)) = binding {
        if raw > o.cap {
            let lost = raw - o.cap;
            score = o.cap;
            let key = format!("{}{}", breakdown::OVERRIDE_PREFIX, o.name);
            out.push(SignalScore {
                label: breakdown::label_for(&key),
                key,
                value: o.cap,
                score: 0.0,
                weight: 0.0,
                contribution: -round2(lost),
                impact: round2(lost),
                explanation: format!("{cause}: score capped at {}", o.cap),
                missing: false,
                stale: false,
            });
        }
    }
    // Freshness: only for kinds this account actually has data of.
    let mut stale = false;
    for s in &ctx.stale {
        let has = match s.kind {
            SourceKind::Usage => inputs.usage.is_some(),
            SourceKind::Support => inputs.support.is_some(),
            SourceKind::Billing => inputs.billing.is_some(),
        };
        if !has {
            continue;
        }
        stale = true;
        let key = format!("{}{}", breakdown::FRESHNESS_PREFIX, s.kind.as_str());
        out.push(SignalScore {
            label: breakdown::label_for(&key),
            key,
            value: round2(s.age_hours / 24.0),
            score: 0.0,
            weight: 0.0,
            contribution: 0.0,
            impact: 0.0,
            explanation: stale_text(s),
            missing: false,
            stale: true,
        });
    }
    let score = round_score(score);
    Some(Score {
        account_id: inputs.account_id,
        score,
        tier: Tier::for_score(score, cfg),
        stale,
        model_version: model.version,
        signals: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::signals::{BillingFacts, SupportFacts, UsageFacts};
    use chrono::Duration;

    fn healthy(now: DateTime<Utc>) -> AccountInputs {
        AccountInputs {
            account_id: 1,
            fields: crate::scoring::model::AccountFields {
                seats: Some(10),
                ..Default::default()
            },
            usage: Some(UsageFacts {
                last_seen_day: Some(now.date_naive()),
                active_users_30d: 8,
                active_days_30d: 22,
                events_30d: 1000,
                events_prev_30d: 1000,
                features_30d: vec!["a".into(), "b".into()],
            }),
            support: Some(SupportFacts::default()),
            billing: Some(BillingFacts {
                subscription_status: Some("active".into()),
                ..Default::default()
            }),
        }
    }

    fn ctx() -> EngineContext {
        EngineContext {
            default_key_features: vec!["a".into(), "b".into()],
            stale: vec![],
        }
    }

    #[test]
    fn healthy_account_scores_high_and_contributions_add_up() {
        let now = Utc::now();
        let s = score_account(&healthy(now), now, &ScoringModel::builtin(), &ctx()).unwrap();
        assert_eq!(s.tier, Tier::Healthy);
        assert!(s.score > 95.0, "{}", s.score);
        let sum: f64 = s.signals.iter().map(|x| x.contribution).sum();
        assert!((sum - s.score).abs() < 0.2);
    }

    #[test]
    fn cancelling_is_capped_and_named() {
        let now = Utc::now();
        let mut a = healthy(now);
        a.billing = Some(BillingFacts {
            subscription_status: Some("active".into()),
            cancel_at_period_end: true,
            current_period_end: Some(now + Duration::days(40)),
            ..Default::default()
        });
        let s = score_account(&a, now, &ScoringModel::builtin(), &ctx()).unwrap();
        assert!(s.score <= 69.0);
        let d = s.drivers();
        assert!(
            d[0].explanation
                .starts_with("Subscription set to cancel on"),
            "{:?}",
            d[0]
        );
    }

    #[test]
    fn missing_signals_share_weight() {
        let now = Utc::now();
        let mut a = healthy(now);
        a.support = None;
        let s = score_account(&a, now, &ScoringModel::builtin(), &ctx()).unwrap();
        let support = s.signals.iter().find(|x| x.key == "support").unwrap();
        assert!(support.missing);
        let total: f64 = s
            .signals
            .iter()
            .filter(|x| !x.missing)
            .map(|x| x.weight)
            .sum();
        assert!((total - 100.0).abs() < 0.1);
    }

    #[test]
    fn no_data_at_all_is_not_scored() {
        let now = Utc::now();
        let a = AccountInputs {
            account_id: 9,
            ..Default::default()
        };
        assert!(score_account(&a, now, &ScoringModel::builtin(), &ctx()).is_none());
    }
}
