//! Reading the durable score change feed by id.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Double, Json, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use crate::db::{DbError, DbPool};

/// One entry of the feed, with the account's key and name so subscribers need no extra query.
#[derive(Debug, Clone, QueryableByName)]
pub struct ScoreChangeRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = BigInt)]
    pub account_id: i64,
    #[diesel(sql_type = Text)]
    pub account_key: String,
    #[diesel(sql_type = Text)]
    pub account_name: String,
    #[diesel(sql_type = Nullable<Double>)]
    pub previous_score: Option<f64>,
    #[diesel(sql_type = Double)]
    pub score: f64,
    #[diesel(sql_type = Nullable<Text>)]
    pub previous_tier: Option<String>,
    #[diesel(sql_type = Text)]
    pub tier: String,
    /// Stored with the change by earlier versions; otherwise derived from the history row written
    /// with it (see migration 000060).
    #[diesel(sql_type = Json)]
    pub drivers: serde_json::Value,
    #[diesel(sql_type = Timestamptz)]
    pub changed_at: DateTime<Utc>,
}

impl ScoreChangeRow {
    /// Points lost by this change (negative when the score rose).
    pub fn points_lost(&self) -> f64 {
        self.previous_score.map(|p| p - self.score).unwrap_or(0.0)
    }
}

/// The rows with `id > after`, oldest first, at most `limit`. Accounts deleted since keep their
/// entries (shown with their internal id as key).
pub async fn score_changes_after(
    pool: &DbPool,
    after: i64,
    limit: i64,
) -> Result<Vec<ScoreChangeRow>, DbError> {
    let mut conn = pool.get().await?;
    let rows = diesel::sql_query(
        "SELECT sc.id, sc.account_id, coalesce(a.key, '#' || sc.account_id) AS account_key, \
                coalesce(a.name, '(deleted account)') AS account_name, sc.previous_score, sc.score, \
                sc.previous_tier, sc.tier, \
                coalesce(sc.drivers, healthd_breakdown_drivers(hs.signals), '[]'::json) AS drivers, sc.changed_at \
         FROM score_changes sc LEFT JOIN accounts a ON a.id = sc.account_id \
         LEFT JOIN health_scores hs ON hs.account_id = sc.account_id AND hs.computed_at = sc.changed_at \
         WHERE sc.id > $1 ORDER BY sc.id LIMIT $2",
    )
    .bind::<BigInt, _>(after)
    .bind::<BigInt, _>(limit)
    .load(&mut conn)
    .await?;
    Ok(rows)
}

/// The newest feed id (0 when the feed is empty).
pub async fn latest_score_change_id(pool: &DbPool) -> Result<i64, DbError> {
    #[derive(QueryableByName)]
    struct Latest {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let mut conn = pool.get().await?;
    let latest: Latest =
        diesel::sql_query("SELECT coalesce(max(id), 0)::bigint AS id FROM score_changes")
            .get_result(&mut conn)
            .await?;
    Ok(latest.id)
}

/// Which score changes a subscriber or a page wants. Empty lists mean "any".
#[derive(Debug, Clone, Default)]
pub struct ScoreChangeFilterSpec {
    pub account_keys: Option<HashSet<String>>,
    /// Stored (lower-case) tier names: `healthy`, `at_risk`, `critical`.
    pub tiers: Option<HashSet<String>>,
    /// Only changes that lost at least this many points.
    pub min_drop: Option<f64>,
}

impl ScoreChangeFilterSpec {
    pub fn matches(&self, row: &ScoreChangeRow) -> bool {
        if let Some(keys) = &self.account_keys {
            if !keys.contains(&row.account_key) {
                return false;
            }
        }
        if let Some(tiers) = &self.tiers {
            if !tiers.contains(&row.tier) {
                return false;
            }
        }
        if let Some(min_drop) = self.min_drop {
            if row.points_lost() < min_drop {
                return false;
            }
        }
        true
    }
}
