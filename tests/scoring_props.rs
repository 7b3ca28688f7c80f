//! Property tests of the pure scoring engine (no database).

use chrono::{DateTime, Duration, TimeZone, Utc};
use healthd::scoring::engine::{score_account, EngineContext};
use healthd::scoring::model::{AccountFields, ActiveModels, ScoringModel, Segment};
use healthd::scoring::signals::{AccountInputs, BillingFacts, SupportFacts, UsageFacts};
use proptest::prelude::*;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap()
}

const FEATURES: [&str; 6] = ["reports", "exports", "dashboards", "alerts", "api", "sso"];

fn ctx() -> EngineContext {
    EngineContext {
        default_key_features: FEATURES[..5].iter().map(|s| s.to_string()).collect(),
        stale: vec![],
    }
}

fn usage() -> impl Strategy<Value = UsageFacts> {
    (
        proptest::option::weighted(0.95, 0i64..90),
        0i64..60,
        0i64..=30,
        0i64..5_000,
        0i64..5_000,
        proptest::sample::subsequence(FEATURES.to_vec(), 0..=6),
    )
        .prop_map(|(ago, users, days, e30, eprev, feats)| UsageFacts {
            last_seen_day: ago.map(|a| (now() - Duration::days(a)).date_naive()),
            active_users_30d: users,
            active_days_30d: days,
            events_30d: e30,
            events_prev_30d: eprev,
            features_30d: feats.into_iter().map(String::from).collect(),
        })
}

fn support() -> impl Strategy<Value = SupportFacts> {
    (
        0i64..30,
        0i64..6,
        0i64..6,
        0i64..20,
        proptest::option::of(1.0f64..5.0),
    )
        .prop_map(|(t, u, h, wait, csat)| SupportFacts {
            tickets_30d: t + u + h,
            open_urgent: u,
            open_high: h,
            oldest_open_urgent_at: (u + h > 0).then(|| now() - Duration::days(wait)),
            csat_avg: csat,
            csat_count: if csat.is_some() { 3 } else { 0 },
        })
}

fn billing() -> impl Strategy<Value = BillingFacts> {
    (
        proptest::sample::select(vec!["active", "trialing", "past_due", "unpaid", "canceled"]),
        any::<bool>(),
        0i64..4,
        0i64..90,
        0i64..1_000_000,
    )
        .prop_map(|(status, cancel, n, days, cents)| BillingFacts {
            subscription_status: Some(status.to_string()),
            cancel_at_period_end: cancel,
            current_period_end: Some(now() + Duration::days(20)),
            overdue_count: n,
            overdue_cents: if n > 0 { cents } else { 0 },
            max_days_overdue: if n > 0 { days + 1 } else { 0 },
        })
}

fn account() -> impl Strategy<Value = AccountInputs> {
    (
        proptest::option::of(1i32..200),
        usage(),
        proptest::option::of(support()),
        proptest::option::of(billing()),
    )
        .prop_map(|(seats, u, s, b)| AccountInputs {
            account_id: 1,
            fields: AccountFields {
                seats,
                ..Default::default()
            },
            usage: Some(u),
            support: s,
            billing: b,
        })
}

/// More recent activity: a later last login, more users, more active days, more events in the last
/// 30 days and more features used.
fn more_activity(
    a: &AccountInputs,
    newer_by: i64,
    users: i64,
    days: i64,
    events: i64,
    feature: usize,
) -> AccountInputs {
    let mut b = a.clone();
    let u = b.usage.as_mut().unwrap();
    let today = now().date_naive();
    u.last_seen_day = Some(match u.last_seen_day {
        Some(d) => (d + Duration::days(newer_by)).min(today),
        None => today - Duration::days(newer_by.min(5)),
    });
    u.active_users_30d += users;
    u.active_days_30d = (u.active_days_30d + days).min(30);
    u.events_30d += events;
    let f = FEATURES[feature % FEATURES.len()].to_string();
    if !u.features_30d.contains(&f) {
        u.features_30d.push(f);
    }
    b
}

fn score(a: &AccountInputs) -> f64 {
    score_account(a, now(), &ScoringModel::builtin(), &ctx())
        .unwrap()
        .score
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn more_recent_activity_never_lowers_a_score(
        a in account(), newer_by in 0i64..30, users in 0i64..10, days in 0i64..10, events in 0i64..2000, feature in 0usize..6
    ) {
        let before = score(&a);
        let after = score(&more_activity(&a, newer_by, users, days, events, feature));
        prop_assert!(after >= before, "activity lowered the score: {before} -> {after}");
    }

    #[test]
    fn an_overdue_invoice_never_raises_a_score(a in account(), b in billing(), days in 1i64..120, cents in 1i64..500_000) {
        let mut a = a;
        a.billing = Some(b);
        let before = score(&a);
        let mut worse = a.clone();
        let bf = worse.billing.as_mut().unwrap();
        bf.overdue_count += 1;
        bf.overdue_cents += cents;
        bf.max_days_overdue = bf.max_days_overdue.max(days);
        let after = score(&worse);
        prop_assert!(after <= before, "an overdue invoice raised the score: {before} -> {after}");
    }

    #[test]
    fn scores_are_bounded_and_contributions_add_up(a in account()) {
        let s = score_account(&a, now(), &ScoringModel::builtin(), &ctx()).unwrap();
        prop_assert!((0.0..=100.0).contains(&s.score));
        let sum: f64 = s.signals.iter().map(|x| x.contribution).sum();
        prop_assert!((sum - s.score).abs() < 0.3, "contributions {sum} vs score {}", s.score);
        for x in &s.signals {
            prop_assert!((0.0..=1.0).contains(&x.score));
        }
    }

    #[test]
    fn missing_sources_are_left_out_and_their_weight_shared(a in account(), drop_support in any::<bool>(), drop_billing in any::<bool>()) {
        let mut a = a;
        if drop_support { a.support = None; }
        if drop_billing { a.billing = None; }
        let s = score_account(&a, now(), &ScoringModel::builtin(), &ctx()).unwrap();
        let present: f64 = s.signals.iter().filter(|x| !x.missing && !x.key.contains(':')).map(|x| x.weight).sum();
        prop_assert!((present - 100.0).abs() < 0.1, "present weights sum to {present}");
        for x in s.signals.iter().filter(|x| x.missing) {
            prop_assert_eq!(x.weight, 0.0);
            prop_assert_eq!(x.contribution, 0.0);
            prop_assert!(x.explanation.starts_with("No "));
        }
        prop_assert_eq!(s.signals.iter().any(|x| x.key == "support" && x.missing), drop_support || a.support.is_none());
        // Missing never counts as zero: without caps, the score is the weighted mean of what is present.
        let capped = s.signals.iter().any(|x| x.key.starts_with("override:"));
        if !capped {
            let m = ScoringModel::builtin();
            let mut num = 0.0;
            let mut den = 0.0;
            for x in s.signals.iter().filter(|x| !x.missing && !x.key.contains(':')) {
                let w = m.config.weights[&x.key];
                num += w * x.score;
                den += w;
            }
            prop_assert!((num / den * 100.0 - s.score).abs() < 0.2);
        }
    }

    #[test]
    fn segment_precedence_is_highest_priority_match_else_default(
        plans in proptest::collection::vec((proptest::option::of(proptest::sample::select(vec!["starter", "pro", "enterprise"])), proptest::option::of(1i32..300), -5i32..5), 0..6),
        plan in proptest::sample::select(vec!["starter", "pro", "enterprise"]),
        seats in 1i32..300,
    ) {
        let segments: Vec<ScoringModel> = plans.iter().enumerate().map(|(i, (p, min_seats, prio))| {
            let mut m = ScoringModel::builtin();
            m.version = 2 + i as i32;
            m.priority = *prio;
            m.segment = Some(Segment { plan: p.map(|p| vec![p.to_string()]), min_seats: *min_seats, ..Default::default() });
            m
        }).collect();
        let models = ActiveModels::new(ScoringModel::builtin(), segments.clone());
        let fields = AccountFields { plan: Some(plan.to_string()), seats: Some(seats), ..Default::default() };
        let chosen = models.for_account(&fields).version;
        let expected = segments.iter()
            .filter(|m| m.segment.as_ref().unwrap().matches(&fields))
            .max_by(|a, b| a.priority.cmp(&b.priority).then(a.version.cmp(&b.version)))
            .map_or(1, |m| m.version);
        prop_assert_eq!(chosen, expected);
    }
}
