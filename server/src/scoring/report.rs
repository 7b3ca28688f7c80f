//! The words an admin reads about models: calibration reports, previews and model listings, as
//! plain text for the command line. Weights are points of 100; every report ends with the next
//! command to run.

use std::fmt::Write as _;

use super::calibration::{CalibrationReport, BOOTSTRAP_ROUNDS};
use super::engine::Tier;
use super::model::ScoringModel;
use super::preview::ModelPreview;

fn tier_words(t: Tier) -> &'static str {
    match t {
        Tier::Healthy => "HEALTHY",
        Tier::AtRisk => "AT_RISK",
        Tier::Critical => "CRITICAL",
    }
}

/// `healthd calibrate`'s report.
pub fn calibration_text(r: &CalibrationReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Calibration against churn: signals as each account looked {} days before its outcome.",
        r.lookback_days
    );
    let _ = writeln!(
        o,
        "Sample: {} churned and {} retained accounts; fitted on {} ({} churned), checked on {} held-out accounts ({} churned).",
        r.churned_accounts, r.retained_accounts, r.train_size, r.train_churned, r.test_size, r.test_churned
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "AUC measures how well a score ranks accounts that churned below those that stayed:"
    );
    let _ = writeln!(
        o,
        "0.5 is chance, 1.0 is perfect. Held-out AUC (95% interval from {BOOTSTRAP_ROUNDS} resamples):"
    );
    let _ = writeln!(
        o,
        "  proposed weights     {:.3}  ({:.3} to {:.3})",
        r.auc_proposed, r.auc_proposed_interval.0, r.auc_proposed_interval.1
    );
    let _ = writeln!(
        o,
        "  active model v{:<5} {:.3}",
        r.active_version, r.auc_active
    );
    let _ = writeln!(o, "  equal weights        {:.3}", r.auc_equal);
    let _ = writeln!(o, "Verdict: {}.", r.verdict);
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<24} {:>10} {:>10} {:>9}",
        "signal", "proposed", "active", "coverage"
    );
    for s in &r.signals {
        let _ = writeln!(
            o,
            "{:<24} {:>6.1} pts {:>6.1} pts {:>8.0}%",
            s.key,
            s.proposed_weight,
            s.active_weight,
            s.coverage * 100.0
        );
    }
    let _ = writeln!(
        o,
        "(points of 100 a signal can earn; shared out over the signals an account has data for)"
    );
    if !r.zero_weight_signals.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "Warning: the proposal gives 0 points to {}. Under it these signals no longer count in any score",
            r.zero_weight_signals.join(", ")
        );
        let _ = writeln!(
            o,
            "and never appear as drivers (an account with many urgent tickets would show no support driver)."
        );
        let _ = writeln!(
            o,
            "If a CSM should still see them, give them a small weight with `updateScoringModel` before activating."
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Stored as inactive model version {}. Nothing changed yet.",
        r.proposed_version
    );
    let _ = writeln!(
        o,
        "  see what it would do:  healthd model preview {}",
        r.proposed_version
    );
    let _ = writeln!(
        o,
        "  switch to it:          healthd model activate {} --rescore",
        r.proposed_version
    );
    o
}

/// `healthd model preview N`.
pub fn preview_text(p: &ModelPreview) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Preview of model version {} against the active models, as of {} (nothing was written).",
        p.candidate_version,
        p.computed_at.format("%Y-%m-%d %H:%M UTC")
    );
    let _ = writeln!(
        o,
        "{} accounts scored; {} would change tier; mean score change {:+.2} points.",
        p.accounts_scored, p.accounts_changed_tier, p.mean_score_change
    );
    for m in &p.tier_moves {
        let _ = writeln!(
            o,
            "  {:>6} {} -> {}",
            m.accounts,
            tier_words(m.from),
            tier_words(m.to)
        );
    }
    if !p.movers.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "Biggest movers:");
        for m in &p.movers {
            let _ = writeln!(
                o,
                "  {} ({}): {:.1} {} -> {:.1} {}",
                m.key,
                m.name,
                m.before_score,
                tier_words(m.before_tier),
                m.after_score,
                tier_words(m.after_tier)
            );
            let _ = writeln!(o, "      now:   {}", words(&m.before_drivers));
            let _ = writeln!(o, "      after: {}", words(&m.after_drivers));
        }
    }
    let _ = writeln!(o);
    match &p.backtest {
        Some(b) => {
            let _ = writeln!(
                o,
                "On past churn ({} accounts, {} churned, seen {} days before): AUC {:.3} for this model, {:.3} for the active models (0.5 is chance, 1.0 perfect).",
                b.accounts, b.churned, b.lookback_days, b.auc_candidate, b.auc_active
            );
        }
        None => {
            let _ = writeln!(
                o,
                "No churn outcomes with both churned and retained accounts: no AUC on past churn."
            );
        }
    }
    if p.candidate_active {
        let _ = writeln!(o, "Version {} is already active.", p.candidate_version);
    } else {
        let _ = writeln!(
            o,
            "Switch to it: healthd model activate {} --rescore",
            p.candidate_version
        );
    }
    o
}

fn words(drivers: &[String]) -> String {
    if drivers.is_empty() {
        "no drivers".into()
    } else {
        drivers.join("; ")
    }
}

/// One line per version for `healthd model list`.
pub fn model_line(m: &ScoringModel) -> String {
    format!(
        "v{:<4} {:<8} {:<10} {:<28} {}",
        m.version,
        if m.active { "active" } else { "inactive" },
        if m.segment.is_some() {
            "segment"
        } else {
            "default"
        },
        m.name,
        m.created_at.format("%Y-%m-%d %H:%M")
    )
}

/// `healthd model show N`: the weights as points, tiers and notes.
pub fn model_text(m: &ScoringModel) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{}", model_line(m));
    if let Some(seg) = &m.segment {
        let _ = writeln!(
            o,
            "segment: {} (priority {})",
            serde_json::to_string(seg).unwrap_or_default(),
            m.priority
        );
    }
    let _ = writeln!(
        o,
        "tiers: HEALTHY at {:.0} and above, AT_RISK at {:.0} and above, else CRITICAL",
        m.config.tiers.healthy, m.config.tiers.at_risk
    );
    let total: f64 = m.config.weights.values().sum();
    let _ = writeln!(o, "weights (points of 100):");
    for (key, w) in &m.config.weights {
        let pts = if total > 0.0 { w * 100.0 / total } else { 0.0 };
        let _ = writeln!(o, "  {key:<24} {pts:>5.1} pts");
    }
    if let Some(n) = &m.notes {
        let _ = writeln!(o, "notes: {n}");
    }
    o
}
