//! The stored breakdown: how a score's signals are kept in `health_scores.signals` (and in
//! `health_current.signals` while a current score's breakdown has changed since its last history
//! row). Each breakdown is stored once; a feed row's drivers are derived from the history row
//! written with it.
//!
//! Every rescore writes one breakdown per changed account, often 100,000 at once, so the stored form
//! holds only what cannot be derived: `key`, `value`, `score`, `weight`, `contribution`, `impact`,
//! `explanation`, and `missing` / `stale` when true. The label follows from the key ([`label_for`])
//! and is filled in on read. The columns are `json` (validated text), not `jsonb`: the write path never pays for building a binary tree it does not query, and SQL that
//! looks inside (alert evaluation) uses the `json_*` functions. Rows written before this form carry
//! the extra keys; readers ignore them.

use serde::Serialize;

use super::engine::SignalScore;
use super::signals::{SignalKey, SourceKind};

/// Key prefix of a score cap entry (`override:<name>`).
pub const OVERRIDE_PREFIX: &str = "override:";
/// Key prefix of a stale-data entry (`freshness:<kind>`).
pub const FRESHNESS_PREFIX: &str = "freshness:";

/// One stored entry; field order is the order in the document.
#[derive(Serialize)]
struct Stored<'a> {
    key: &'a str,
    value: f64,
    score: f64,
    weight: f64,
    contribution: f64,
    impact: f64,
    explanation: &'a str,
    #[serde(skip_serializing_if = "is_false")]
    missing: bool,
    #[serde(skip_serializing_if = "is_false")]
    stale: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The stored JSON array for `signals` (all of a score's entries, or its drivers).
pub fn encode<'a>(signals: impl IntoIterator<Item = &'a SignalScore>) -> String {
    let entries: Vec<Stored<'a>> = signals
        .into_iter()
        .map(|s| Stored {
            key: &s.key,
            value: s.value,
            score: s.score,
            weight: s.weight,
            contribution: s.contribution,
            impact: s.impact,
            explanation: &s.explanation,
            missing: s.missing,
            stale: s.stale,
        })
        .collect();
    // Serialising plain numbers, strings and booleans cannot fail.
    serde_json::to_string(&entries).unwrap_or_else(|_| "[]".into())
}

/// The human name of an entry, from its key: the signal's label, "Score cap" for a cap, "<Kind>
/// data freshness" for stale data. Unknown keys (written by a newer version) read as the key itself.
pub fn label_for(key: &str) -> String {
    if let Some(k) = SignalKey::parse(key) {
        return k.label().into();
    }
    if key.starts_with(OVERRIDE_PREFIX) {
        return "Score cap".into();
    }
    if let Some(kind) = key.strip_prefix(FRESHNESS_PREFIX).and_then(kind_of) {
        return format!("{} data freshness", kind.title());
    }
    key.into()
}

fn kind_of(s: &str) -> Option<SourceKind> {
    SourceKind::ALL.into_iter().find(|k| k.as_str() == s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, label: &str) -> SignalScore {
        SignalScore {
            key: key.into(),
            label: label.into(),
            value: 21.0,
            score: 0.2,
            weight: 22.0,
            contribution: 4.4,
            impact: 17.6,
            explanation: "No login in 21 days".into(),
            missing: false,
            stale: false,
        }
    }

    #[test]
    fn stores_only_what_cannot_be_derived() {
        let s = entry("login_recency", "Login recency");
        let json: serde_json::Value = serde_json::from_str(&encode([&s])).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{"key": "login_recency", "value": 21.0, "score": 0.2, "weight": 22.0,
                                "contribution": 4.4, "impact": 17.6, "explanation": "No login in 21 days"}])
        );
        let mut m = s.clone();
        m.missing = true;
        m.stale = true;
        let json: serde_json::Value = serde_json::from_str(&encode([&m])).unwrap();
        assert_eq!(json[0]["missing"], true);
        assert_eq!(json[0]["stale"], true);
    }

    #[test]
    fn labels_follow_from_keys() {
        for k in SignalKey::ALL {
            assert_eq!(label_for(k.as_str()), k.label());
        }
        assert_eq!(label_for("override:cancelling"), "Score cap");
        assert_eq!(label_for("freshness:usage"), "Usage data freshness");
        assert_eq!(label_for("something_new"), "something_new");
    }
}
