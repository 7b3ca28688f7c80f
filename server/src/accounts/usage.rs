//! Usage timelines and feature adoption, from the `usage_daily` rollup only (never raw events).

use std::collections::HashMap;

use chrono::{Datelike, Duration, NaiveDate};
use diesel::sql_types::{Array, BigInt, Bool, Date, Integer, Nullable, Text};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use super::{AccountsError, Result};
use crate::db::DbPool;

/// The longest timeline or history window a client may ask for, in days.
pub const MAX_DAYS: i32 = 1096;

/// Checks a `days` argument (1..=[`MAX_DAYS`]).
pub fn check_days(days: i32) -> Result<()> {
    if (1..=MAX_DAYS).contains(&days) {
        Ok(())
    } else {
        Err(AccountsError::InvalidArgument(format!(
            "`days` must be between 1 and {MAX_DAYS}, got {days}"
        )))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BucketSize {
    Day,
    /// Weeks start on Monday.
    Week,
}

/// The Monday of `day`'s week.
pub fn week_start(day: NaiveDate) -> NaiveDate {
    day - Duration::days(i64::from(day.weekday().num_days_from_monday()))
}

/// The first bucket of a timeline of `days` days ending today.
pub fn timeline_start(today: NaiveDate, days: i32, bucket: BucketSize) -> NaiveDate {
    let first_day = today - Duration::days(i64::from(days.max(1) - 1));
    match bucket {
        BucketSize::Day => first_day,
        BucketSize::Week => week_start(first_day),
    }
}

/// Which timeline to read: buckets from `start` (a Monday for weeks) through today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimelineQuery {
    pub account_id: i64,
    pub start: NaiveDate,
    pub bucket: BucketSize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureCount {
    pub feature: String,
    pub count: i64,
}

/// Activity in one bucket (a day, or a week starting Monday).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageBucket {
    pub start: NaiveDate,
    /// Distinct known users active in the bucket.
    pub active_users: i64,
    pub logins: i64,
    pub page_views: i64,
    pub events: i64,
    /// Events per feature, most used first.
    pub features: Vec<FeatureCount>,
}

impl UsageBucket {
    fn empty(start: NaiveDate) -> Self {
        UsageBucket {
            start,
            active_users: 0,
            logins: 0,
            page_views: 0,
            events: 0,
            features: Vec::new(),
        }
    }
}

#[derive(QueryableByName)]
struct BucketRow {
    #[diesel(sql_type = BigInt)]
    ord: i64,
    #[diesel(sql_type = Date)]
    bucket: NaiveDate,
    /// NULL on the per-bucket totals row.
    #[diesel(sql_type = Nullable<Text>)]
    feature: Option<String>,
    #[diesel(sql_type = Integer)]
    is_total: i32,
    #[diesel(sql_type = BigInt)]
    active_users: i64,
    #[diesel(sql_type = BigInt)]
    logins: i64,
    #[diesel(sql_type = BigInt)]
    page_views: i64,
    #[diesel(sql_type = BigInt)]
    events: i64,
}

/// The timeline for each query, in the order of `queries`: every bucket from the start through
/// `today`, empty ones as zeros, with one statement for all queries.
pub async fn timelines(
    pool: &DbPool,
    queries: &[TimelineQuery],
    today: NaiveDate,
) -> Result<Vec<Vec<UsageBucket>>> {
    // Continuous buckets first; the rows below fill them in.
    let mut out: Vec<Vec<UsageBucket>> = queries
        .iter()
        .map(|q| {
            let step = match q.bucket {
                BucketSize::Day => 1,
                BucketSize::Week => 7,
            };
            let mut buckets = Vec::new();
            let mut start = q.start;
            while start <= today {
                buckets.push(UsageBucket::empty(start));
                start += Duration::days(step);
            }
            buckets
        })
        .collect();
    if queries.is_empty() {
        return Ok(out);
    }
    let ids: Vec<i64> = queries.iter().map(|q| q.account_id).collect();
    let starts: Vec<NaiveDate> = queries.iter().map(|q| q.start).collect();
    let weekly: Vec<bool> = queries
        .iter()
        .map(|q| q.bucket == BucketSize::Week)
        .collect();
    let mut conn = pool.get().await?;
    let rows: Vec<BucketRow> = diesel::sql_query(
        "SELECT x.ord, x.bucket, x.feature, GROUPING(x.feature) AS is_total, \
                count(DISTINCT x.user_id) FILTER (WHERE x.user_id <> '') AS active_users, \
                COALESCE(sum(x.events) FILTER (WHERE x.event = 'login'), 0)::bigint AS logins, \
                COALESCE(sum(x.events) FILTER (WHERE x.event = 'page_view'), 0)::bigint AS page_views, \
                COALESCE(sum(x.events), 0)::bigint AS events \
         FROM ( \
           SELECT k.ord, \
                  CASE WHEN k.weekly THEN d.day - (extract(isodow FROM d.day)::int - 1) ELSE d.day END AS bucket, \
                  d.user_id, d.event, d.feature, d.events \
           FROM unnest($1::bigint[], $2::date[], $3::boolean[]) WITH ORDINALITY AS k(account_id, since, weekly, ord) \
           JOIN usage_daily d ON d.account_id = k.account_id AND d.day >= k.since AND d.day <= $4) x \
         GROUP BY GROUPING SETS ((x.ord, x.bucket), (x.ord, x.bucket, x.feature))",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<Date>, _>(starts)
    .bind::<Array<Bool>, _>(weekly)
    .bind::<Date, _>(today)
    .load(&mut conn)
    .await?;
    for row in rows {
        let Some((q, buckets)) = usize::try_from(row.ord - 1)
            .ok()
            .and_then(|i| Some((queries.get(i)?, out.get_mut(i)?)))
        else {
            continue;
        };
        let step = match q.bucket {
            BucketSize::Day => 1,
            BucketSize::Week => 7,
        };
        let index = (row.bucket - q.start).num_days() / step;
        let Some(bucket) = usize::try_from(index).ok().and_then(|i| buckets.get_mut(i)) else {
            continue;
        };
        if row.is_total == 1 {
            bucket.active_users = row.active_users;
            bucket.logins = row.logins;
            bucket.page_views = row.page_views;
            bucket.events = row.events;
        } else if let Some(feature) = row.feature.filter(|f| !f.is_empty()) {
            bucket.features.push(FeatureCount {
                feature,
                count: row.events,
            });
        }
    }
    for bucket in out.iter_mut().flatten() {
        bucket.features.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| a.feature.cmp(&b.feature))
        });
    }
    Ok(out)
}

/// One feature's adoption by an account.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct FeatureAdoption {
    #[diesel(sql_type = BigInt)]
    pub account_id: i64,
    #[diesel(sql_type = Text)]
    pub feature: String,
    #[diesel(sql_type = Date)]
    pub first_used: NaiveDate,
    #[diesel(sql_type = Date)]
    pub last_used: NaiveDate,
    /// Distinct known users of the feature in the 30 days ending today.
    #[diesel(sql_type = BigInt)]
    pub users_last_30_days: i64,
}

/// Feature adoption of each account (most users in the last 30 days first, then most recently
/// used); accounts without feature usage get an empty list.
pub async fn adoption(
    pool: &DbPool,
    account_ids: &[i64],
    today: NaiveDate,
) -> Result<HashMap<i64, Vec<FeatureAdoption>>> {
    let mut out: HashMap<i64, Vec<FeatureAdoption>> =
        account_ids.iter().map(|id| (*id, Vec::new())).collect();
    if account_ids.is_empty() {
        return Ok(out);
    }
    let mut conn = pool.get().await?;
    let rows: Vec<FeatureAdoption> = diesel::sql_query(
        "SELECT d.account_id, d.feature, min(d.day) AS first_used, max(d.day) AS last_used, \
                count(DISTINCT d.user_id) FILTER (WHERE d.user_id <> '' AND d.day > $2 - 30) AS users_last_30_days \
         FROM usage_daily d \
         WHERE d.account_id = ANY($1) AND d.feature <> '' AND d.day <= $2 \
         GROUP BY d.account_id, d.feature \
         ORDER BY d.account_id, users_last_30_days DESC, last_used DESC, d.feature",
    )
    .bind::<Array<BigInt>, _>(account_ids)
    .bind::<Date, _>(today)
    .load(&mut conn)
    .await?;
    for row in rows {
        out.entry(row.account_id).or_default().push(row);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weekly_timelines_start_on_monday() {
        let thu = NaiveDate::from_ymd_opt(2026, 11, 26).unwrap();
        assert_eq!(
            week_start(thu),
            NaiveDate::from_ymd_opt(2026, 11, 23).unwrap()
        );
        assert_eq!(
            week_start(NaiveDate::from_ymd_opt(2026, 11, 23).unwrap()).weekday(),
            chrono::Weekday::Mon
        );
        assert_eq!(timeline_start(thu, 1, BucketSize::Day), thu);
        assert_eq!(
            timeline_start(thu, 14, BucketSize::Week),
            NaiveDate::from_ymd_opt(2026, 11, 9).unwrap()
        );
        assert!(
            check_days(0).is_err() && check_days(90).is_ok() && check_days(MAX_DAYS + 1).is_err()
        );
    }
}
