//! The signals: each turns an account's facts (as of a moment T) into a raw value, a 0–1 score and an
//! explanation in plain words with the real numbers. Pure functions, no I/O.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::model::{AccountFields, ModelConfig};

/// Every signal the engine knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKey {
    LoginRecency,
    Breadth,
    Frequency,
    UsageTrend,
    FeatureAdoption,
    Support,
    Billing,
}

/// Where a signal's data comes from (the `kind` in `source_freshness`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceKind {
    Usage,
    Support,
    Billing,
}

impl SourceKind {
    pub const ALL: [SourceKind; 3] = [SourceKind::Usage, SourceKind::Support, SourceKind::Billing];

    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Usage => "usage",
            SourceKind::Support => "support",
            SourceKind::Billing => "billing",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            SourceKind::Usage => "Usage",
            SourceKind::Support => "Support",
            SourceKind::Billing => "Billing",
        }
    }
}

impl SignalKey {
    pub const ALL: [SignalKey; 7] = [
        SignalKey::LoginRecency,
        SignalKey::Breadth,
        SignalKey::Frequency,
        SignalKey::UsageTrend,
        SignalKey::FeatureAdoption,
        SignalKey::Support,
        SignalKey::Billing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SignalKey::LoginRecency => "login_recency",
            SignalKey::Breadth => "breadth",
            SignalKey::Frequency => "frequency",
            SignalKey::UsageTrend => "usage_trend",
            SignalKey::FeatureAdoption => "feature_adoption",
            SignalKey::Support => "support",
            SignalKey::Billing => "billing",
        }
    }

    pub fn parse(s: &str) -> Option<SignalKey> {
        SignalKey::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn label(self) -> &'static str {
        match self {
            SignalKey::LoginRecency => "Login recency",
            SignalKey::Breadth => "Active users",
            SignalKey::Frequency => "Usage frequency",
            SignalKey::UsageTrend => "Usage trend",
            SignalKey::FeatureAdoption => "Feature adoption",
            SignalKey::Support => "Support load",
            SignalKey::Billing => "Billing",
        }
    }

    /// Short name used in change summaries ("−14: usage trend −9, support −5").
    pub fn short(self) -> &'static str {
        match self {
            SignalKey::LoginRecency => "logins",
            SignalKey::Breadth => "users",
            SignalKey::Frequency => "frequency",
            SignalKey::UsageTrend => "usage",
            SignalKey::FeatureAdoption => "features",
            SignalKey::Support => "tickets",
            SignalKey::Billing => "billing",
        }
    }

    pub fn source(self) -> SourceKind {
        match self {
            SignalKey::Support => SourceKind::Support,
            SignalKey::Billing => SourceKind::Billing,
            _ => SourceKind::Usage,
        }
    }

    /// Default weight in points (sum 100); see `model::default_weights` for the reasoning.
    pub fn default_weight(self) -> f64 {
        match self {
            SignalKey::LoginRecency => 22.0,
            SignalKey::UsageTrend => 18.0,
            SignalKey::Billing => 20.0,
            SignalKey::Frequency => 12.0,
            SignalKey::Support => 12.0,
            SignalKey::Breadth => 8.0,
            SignalKey::FeatureAdoption => 8.0,
        }
    }
}

/// Everything the engine needs to know about one account as of T. Loaded in bulk by `inputs.rs`;
/// built by hand in tests. Windows: "last 30 days" are the 30 calendar days ending on T's date,
/// "previous 30" the 30 before those.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccountInputs {
    pub account_id: i64,
    pub fields: AccountFields,
    pub usage: Option<UsageFacts>,
    pub support: Option<SupportFacts>,
    pub billing: Option<BillingFacts>,
}

/// `None` in [`AccountInputs::usage`]: the account has no usage rows at all (missing, not zero).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageFacts {
    /// Last day with a `login` event (else with any event) on or before T.
    pub last_seen_day: Option<NaiveDate>,
    pub active_users_30d: i64,
    pub active_days_30d: i64,
    pub events_30d: i64,
    pub events_prev_30d: i64,
    /// Distinct features used in the last 30 days.
    pub features_30d: Vec<String>,
}

/// `None`: no ticket ever and no support connector has ever synced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SupportFacts {
    pub tickets_30d: i64,
    pub open_urgent: i64,
    pub open_high: i64,
    /// When the oldest open urgent/high ticket was opened.
    pub oldest_open_urgent_at: Option<DateTime<Utc>>,
    pub csat_avg: Option<f64>,
    pub csat_count: i64,
}

/// `None`: neither a subscription nor an invoice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BillingFacts {
    /// `trialing|active|past_due|unpaid|canceled`, of the account's best subscription.
    pub subscription_status: Option<String>,
    pub cancel_at_period_end: bool,
    pub current_period_end: Option<DateTime<Utc>>,
    pub overdue_count: i64,
    /// In cents, to keep the pure engine exact without a decimal type.
    pub overdue_cents: i64,
    pub max_days_overdue: i64,
}

impl BillingFacts {
    /// Active (or trialing) but set to cancel at the period end.
    pub fn cancelling(&self) -> bool {
        self.cancel_at_period_end && self.subscription_status.as_deref() != Some("canceled")
    }
}

/// One evaluated signal before weighting.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalEval {
    pub key: SignalKey,
    pub value: f64,
    pub score: f64,
    pub explanation: String,
}

/// Formats cents as `$1,200.00`.
pub fn money(cents: i64) -> String {
    let neg = cents < 0;
    let c = cents.unsigned_abs();
    let whole = (c / 100).to_string();
    let mut grouped = String::new();
    // Digits before the next comma, counting from the left.
    let mut until_comma = match whole.len() % 3 {
        0 => 3,
        r => r,
    };
    for ch in whole.chars() {
        if until_comma == 0 {
            grouped.push(',');
            until_comma = 3;
        }
        grouped.push(ch);
        until_comma -= 1;
    }
    format!("{}${grouped}.{:02}", if neg { "-" } else { "" }, c % 100)
}

fn plural(n: i64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

fn days_between(from: NaiveDate, to: NaiveDate) -> i64 {
    (to - from).num_days().max(0)
}

/// Login recency: days since anyone at the account last logged in.
pub fn login_recency(u: &UsageFacts, now: DateTime<Utc>, cfg: &ModelConfig) -> SignalEval {
    let today = now.date_naive();
    let (value, explanation) = match u.last_seen_day {
        Some(day) => {
            let d = days_between(day, today);
            let text = match d {
                0 => "Last login today".to_string(),
                1 => "Last login yesterday".to_string(),
                d if d < 7 => format!("Last login {d} days ago"),
                d => format!("No login in {d} days"),
            };
            (d as f64, text)
        }
        // Usage rows exist but none on or before T: as silent as it gets.
        None => (f64::INFINITY, "No login recorded yet".to_string()),
    };
    let value = if value.is_finite() { value } else { 999.0 };
    SignalEval {
        key: SignalKey::LoginRecency,
        value,
        score: cfg.curves.login_recency_days.eval(value),
        explanation,
    }
}

/// Breadth: distinct active users in the last 30 days against seats.
pub fn breadth(u: &UsageFacts, fields: &AccountFields, cfg: &ModelConfig) -> SignalEval {
    let users = u.active_users_30d;
    match fields.seats.filter(|s| *s > 0) {
        Some(seats) => {
            let ratio = users as f64 / seats as f64;
            SignalEval {
                key: SignalKey::Breadth,
                value: users as f64,
                score: cfg.curves.breadth_seat_ratio.eval(ratio),
                explanation: format!(
                    "{users} of {} active in the last 30 days",
                    plural(seats as i64, "seat", "seats")
                ),
            }
        }
        None => SignalEval {
            key: SignalKey::Breadth,
            value: users as f64,
            score: cfg.curves.breadth_users.eval(users as f64),
            explanation: format!(
                "{} active in the last 30 days (seat count unknown)",
                plural(users, "user", "users")
            ),
        },
    }
}

/// Frequency: active days in the last 30.
pub fn frequency(u: &UsageFacts, cfg: &ModelConfig) -> SignalEval {
    let d = u.active_days_30d;
    SignalEval {
        key: SignalKey::Frequency,
        value: d as f64,
        score: cfg.curves.frequency_active_days.eval(d as f64),
        explanation: format!("Active on {d} of the last 30 days"),
    }
}

/// Usage trend: events in the last 30 days against the 30 before, in percent.
pub fn usage_trend(u: &UsageFacts, cfg: &ModelConfig) -> SignalEval {
    let (now, before) = (u.events_30d, u.events_prev_30d);
    let (pct, explanation) = if before > 0 {
        let pct = (now - before) as f64 * 100.0 / before as f64;
        let rounded = pct.round() as i64;
        let text = if rounded == 0 {
            "Usage steady vs the previous 30 days".to_string()
        } else if rounded < 0 {
            format!("Usage down {}% vs the previous 30 days", -rounded)
        } else {
            format!("Usage up {rounded}% vs the previous 30 days")
        };
        (pct, text)
    } else if now > 0 {
        (
            100.0,
            "Usage started in the last 30 days (none in the 30 before)".to_string(),
        )
    } else {
        (-100.0, "No usage in the last 60 days".to_string())
    };
    SignalEval {
        key: SignalKey::UsageTrend,
        value: pct,
        score: cfg.curves.usage_trend_pct.eval(pct),
        explanation,
    }
}

/// Feature adoption: key features used in the last 30 days. `None` when there are no key features.
pub fn feature_adoption(
    u: &UsageFacts,
    key_features: &[String],
    cfg: &ModelConfig,
) -> Option<SignalEval> {
    if key_features.is_empty() {
        return None;
    }
    let used: Vec<&String> = key_features
        .iter()
        .filter(|f| u.features_30d.contains(f))
        .collect();
    let unused: Vec<&String> = key_features
        .iter()
        .filter(|f| !u.features_30d.contains(f))
        .collect();
    let ratio = used.len() as f64 / key_features.len() as f64;
    let mut explanation = format!(
        "Used {} of {} key features in the last 30 days",
        used.len(),
        key_features.len()
    );
    if !unused.is_empty() && unused.len() <= 3 {
        explanation.push_str(&format!(
            " (not used: {})",
            unused
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Some(SignalEval {
        key: SignalKey::FeatureAdoption,
        value: used.len() as f64,
        score: cfg.curves.feature_adoption_ratio.eval(ratio),
        explanation,
    })
}

/// Support load: ticket volume (per seat), open urgent/high tickets and their wait, recent CSAT.
/// The score is a weighted mean of the parts (`support_parts`); the explanation leads with the worst.
pub fn support(
    s: &SupportFacts,
    fields: &AccountFields,
    now: DateTime<Utc>,
    cfg: &ModelConfig,
) -> SignalEval {
    let c = &cfg.curves;
    let (volume_score, volume_text) = match fields.seats.filter(|s| *s > 0) {
        Some(seats) => {
            let per10 = s.tickets_30d as f64 * 10.0 / seats as f64;
            (
                c.tickets_per_10_seats.eval(per10),
                format!(
                    "{} opened in the last 30 days ({per10:.1} per 10 seats)",
                    plural(s.tickets_30d, "ticket", "tickets")
                ),
            )
        }
        None => (
            c.tickets_30d.eval(s.tickets_30d as f64),
            format!(
                "{} opened in the last 30 days",
                plural(s.tickets_30d, "ticket", "tickets")
            ),
        ),
    };
    let weighted_open = s.open_urgent as f64 + 0.5 * s.open_high as f64;
    let wait_days = s
        .oldest_open_urgent_at
        .map(|t| ((now - t).num_hours().max(0) as f64) / 24.0);
    let urgent_score = c
        .urgent_open
        .eval(weighted_open)
        .min(wait_days.map_or(1.0, |d| c.urgent_wait_days.eval(d)));
    let urgent_text = if s.open_urgent + s.open_high == 0 {
        "no urgent tickets open".to_string()
    } else {
        let what = match (s.open_urgent, s.open_high) {
            (u, 0) => plural(u, "urgent ticket", "urgent tickets"),
            (0, h) => plural(h, "high-priority ticket", "high-priority tickets"),
            (u, h) => format!(
                "{u} urgent and {}",
                plural(h, "high-priority ticket", "high-priority tickets")
            ),
        };
        let oldest = wait_days.map(|d| d.floor() as i64).unwrap_or(0);
        format!("{what} open, oldest {}", plural(oldest, "day", "days"))
    };
    let p = &cfg.support_parts;
    let mut parts = vec![
        (volume_score, p.volume, volume_text),
        (urgent_score, p.urgent, urgent_text),
    ];
    if let Some(avg) = s.csat_avg {
        parts.push((
            c.csat.eval(avg),
            p.csat,
            format!("average CSAT {avg:.1} of 5 from {} ratings", s.csat_count),
        ));
    }
    let total_w: f64 = parts.iter().map(|(_, w, _)| *w).sum();
    let score = if total_w > 0.0 {
        parts.iter().map(|(s, w, _)| s * w).sum::<f64>() / total_w
    } else {
        1.0
    };
    // Worst part first, so the explanation starts with the cause.
    parts.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    let mut explanation = parts
        .iter()
        .map(|(_, _, t)| t.clone())
        .collect::<Vec<_>>()
        .join("; ");
    if let Some(first) = explanation.get(0..1) {
        explanation = first.to_uppercase() + &explanation[1..];
    }
    SignalEval {
        key: SignalKey::Support,
        value: s.tickets_30d as f64,
        score: score.clamp(0.0, 1.0),
        explanation,
    }
}

/// Billing: subscription state and overdue invoices; the worse of the two decides.
pub fn billing(b: &BillingFacts, cfg: &ModelConfig) -> SignalEval {
    let st = &cfg.billing_status;
    let (status_score, status_text) = match (b.subscription_status.as_deref(), b.cancelling()) {
        (_, true) => (
            st.cancelling,
            match b.current_period_end {
                Some(end) => format!(
                    "Subscription set to cancel on {}",
                    end.date_naive().format("%Y-%m-%d")
                ),
                None => "Subscription set to cancel at the end of the period".to_string(),
            },
        ),
        (Some("canceled"), _) => (st.canceled, "Subscription canceled".to_string()),
        (Some("unpaid"), _) => (st.unpaid, "Subscription unpaid".to_string()),
        (Some("past_due"), _) => (st.past_due, "Subscription payment past due".to_string()),
        (Some("trialing"), _) => (st.trialing, "Subscription in trial".to_string()),
        (Some(_), _) => (st.active, "Subscription active".to_string()),
        (None, _) => (1.0, "No subscription on record".to_string()),
    };
    let (invoice_score, invoice_text) = if b.overdue_count == 0 {
        (1.0, "no overdue invoices".to_string())
    } else {
        let s = cfg
            .curves
            .invoice_days_overdue
            .eval(b.max_days_overdue as f64);
        let text = if b.overdue_count == 1 {
            format!(
                "Invoice {} past due ({})",
                plural(b.max_days_overdue, "day", "days"),
                money(b.overdue_cents)
            )
        } else {
            format!(
                "{} invoices past due ({}), oldest {}",
                b.overdue_count,
                money(b.overdue_cents),
                plural(b.max_days_overdue, "day", "days")
            )
        };
        (s, text)
    };
    let score = status_score.min(invoice_score);
    let explanation = if invoice_score < status_score {
        format!("{invoice_text}; {}", lower_first(&status_text))
    } else {
        format!("{status_text}; {invoice_text}")
    };
    SignalEval {
        key: SignalKey::Billing,
        value: b.max_days_overdue as f64,
        score,
        explanation,
    }
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_groups_thousands() {
        assert_eq!(money(120_000), "$1,200.00");
        assert_eq!(money(5), "$0.05");
        assert_eq!(money(123_456_789), "$1,234,567.89");
    }

    #[test]
    fn billing_names_the_invoice() {
        let b = BillingFacts {
            subscription_status: Some("active".into()),
            overdue_count: 1,
            overdue_cents: 120_000,
            max_days_overdue: 30,
            ..Default::default()
        };
        let e = billing(&b, &ModelConfig::default());
        assert!(
            e.explanation
                .starts_with("Invoice 30 days past due ($1,200.00)"),
            "{}",
            e.explanation
        );
    }

    #[test]
    fn support_leads_with_urgent_backlog() {
        let now = Utc::now();
        let s = SupportFacts {
            tickets_30d: 4,
            open_urgent: 4,
            oldest_open_urgent_at: Some(now - chrono::Duration::days(3)),
            ..Default::default()
        };
        let fields = AccountFields {
            seats: Some(25),
            ..Default::default()
        };
        let e = support(&s, &fields, now, &ModelConfig::default());
        assert!(
            e.explanation
                .starts_with("4 urgent tickets open, oldest 3 days"),
            "{}",
            e.explanation
        );
    }
}
