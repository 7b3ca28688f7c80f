//! The account list: filters, orders and keyset pagination.
//!
//! Every order is a keyset over an index, so page N costs what page 1 costs:
//!
//! | order | phase 0 (index) | phase 1 (rows without the sort value) |
//! | --- | --- | --- |
//! | `ScoreAsc` | `health_current (score, account_id)` ascending | never scored accounts, by key |
//! | `ScoreDesc` | same index, backwards | never scored accounts, by key |
//! | `ScoreChange` | `health_current (score_change, account_id)` (biggest drop first) | never scored, by key |
//! | `Name` | `accounts (lower(name), id)` | — |
//! | `RenewalDate` | `accounts (renewal_date, id)` | no renewal date, by key |
//!
//! Phase 1 is a separate branch of the same statement that only runs when phase 0 cannot fill the
//! page (a one-time filter on the phase 0 row count), so the common case never scans for accounts
//! without a score. A cursor records the phase, the sort value and the id (or key), so rows that
//! tie on the sort value are neither skipped nor repeated.

use base64::Engine;
use chrono::NaiveDate;
use diesel::sql_types::{BigInt, Date, Double, Integer, Nullable, Text};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use serde::{Deserialize, Serialize};

use super::sql::{Bind, Params};
use super::{AccountRow, AccountsError, Result, ACCOUNT_COLUMNS};
use crate::db::DbPool;

/// How the list is ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Worst score first; never scored accounts after all scored ones, by key.
    #[default]
    ScoreAsc,
    /// Best score first; never scored accounts last, by key.
    ScoreDesc,
    /// Biggest drop since the previous score first (`score_change` ascending); never scored last.
    ScoreChange,
    /// By name, case-insensitive.
    Name,
    /// Soonest renewal first; accounts without a renewal date last, by key.
    RenewalDate,
}

impl Order {
    fn code(self) -> &'static str {
        match self {
            Order::ScoreAsc => "SCORE_ASC",
            Order::ScoreDesc => "SCORE_DESC",
            Order::ScoreChange => "SCORE_CHANGE",
            Order::Name => "NAME",
            Order::RenewalDate => "RENEWAL_DATE",
        }
    }

    fn is_score(self) -> bool {
        matches!(
            self,
            Order::ScoreAsc | Order::ScoreDesc | Order::ScoreChange
        )
    }
}

/// Which accounts to list. Empty / `None` parts do not restrict.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// Tiers as stored (`healthy`, `at_risk`, `critical`); only scored accounts match. Empty: any.
    pub tiers: Vec<String>,
    /// Exact owner.
    pub owner: Option<String>,
    /// Case-insensitive substring of the name, key or domain.
    pub search: Option<String>,
    /// Renewal date between today and today + N days (inclusive).
    pub renewal_within_days: Option<i32>,
}

impl Filter {
    pub fn validate(&self) -> Result<()> {
        if let Some(days) = self.renewal_within_days {
            if days < 0 {
                return Err(AccountsError::InvalidArgument(format!(
                    "renewalWithinDays must be 0 or more, got {days}"
                )));
            }
        }
        Ok(())
    }

    fn search_pattern(&self) -> Option<String> {
        let s = self.search.as_deref()?.trim();
        if s.is_empty() {
            return None;
        }
        let mut escaped = String::with_capacity(s.len() + 2);
        escaped.push('%');
        for c in s.chars() {
            if matches!(c, '\\' | '%' | '_') {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        escaped.push('%');
        Some(escaped)
    }
}

/// One listed account with the cursor that points just after it.
#[derive(Debug, Clone)]
pub struct PageItem {
    pub account: AccountRow,
    pub cursor: String,
}

#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<PageItem>,
    pub has_next_page: bool,
}

/// Where a page starts: the position of the row before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CursorData {
    /// The order the cursor was made for.
    o: String,
    /// 0: rows with a sort value; 1: rows without one (ordered by key).
    p: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d: Option<NaiveDate>,
    i: i64,
    k: String,
}

const CURSOR_PREFIX: &str = "a1:";

fn encode_cursor(c: &CursorData) -> String {
    let json = serde_json::to_vec(c).expect("cursor serializes");
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode([CURSOR_PREFIX.as_bytes(), &json].concat())
}

fn decode_cursor(cursor: &str, order: Order) -> Result<CursorData> {
    let bad = |why: &str| AccountsError::InvalidCursor(why.to_string());
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor.trim())
        .map_err(|_| bad("not a cursor returned by `accounts`"))?;
    let json = bytes
        .strip_prefix(CURSOR_PREFIX.as_bytes())
        .ok_or_else(|| bad("not a cursor returned by `accounts`"))?;
    let c: CursorData =
        serde_json::from_slice(json).map_err(|_| bad("not a cursor returned by `accounts`"))?;
    if c.o != order.code() {
        return Err(AccountsError::InvalidCursor(format!(
            "this cursor belongs to orderBy {}, not {}; start again without `after`",
            c.o,
            order.code()
        )));
    }
    let complete = match (c.p, order) {
        (1, Order::Name) => false,
        (1, _) => true,
        (0, o) if o.is_score() => c.n.is_some_and(f64::is_finite),
        (0, Order::Name) => c.t.is_some(),
        (0, Order::RenewalDate) => c.d.is_some(),
        _ => false,
    };
    if !complete {
        return Err(bad("not a cursor returned by `accounts`"));
    }
    Ok(c)
}

#[derive(QueryableByName)]
struct PageRow {
    #[diesel(embed)]
    account: AccountRow,
    #[diesel(sql_type = Integer)]
    phase: i32,
    #[diesel(sql_type = Nullable<Double>)]
    sort_num: Option<f64>,
    #[diesel(sql_type = Nullable<Text>)]
    sort_text: Option<String>,
    #[diesel(sql_type = Nullable<Date>)]
    sort_date: Option<NaiveDate>,
}

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// The filter as SQL conditions: those on `accounts a`, and the tier condition on `health_current hc`.
struct Conditions {
    on_accounts: Vec<String>,
    on_health: Option<String>,
}

fn conditions(filter: &Filter, params: &mut Params, today: NaiveDate) -> Conditions {
    let mut on_accounts = Vec::new();
    if let Some(owner) = &filter.owner {
        on_accounts.push(format!(
            "a.owner = {}",
            params.add(Bind::Text(owner.clone()))
        ));
    }
    if let Some(pattern) = filter.search_pattern() {
        let p = params.add(Bind::Text(pattern));
        on_accounts.push(format!(
            "(a.name ILIKE {p} OR a.key ILIKE {p} OR a.domain ILIKE {p})"
        ));
    }
    if let Some(days) = filter.renewal_within_days {
        let from = params.add(Bind::Date(today));
        let to = params.add(Bind::Date(today + chrono::Duration::days(i64::from(days))));
        on_accounts.push(format!("a.renewal_date BETWEEN {from} AND {to}"));
    }
    let on_health = (!filter.tiers.is_empty()).then(|| {
        format!(
            "hc.tier = ANY({})",
            params.add(Bind::TextArray(filter.tiers.clone()))
        )
    });
    Conditions {
        on_accounts,
        on_health,
    }
}

/// One branch of the page statement.
struct Branch {
    phase: u8,
    from: &'static str,
    conds: Vec<String>,
    /// `sort_num, sort_text, sort_date` expressions.
    sort_cols: &'static str,
    order_by: &'static str,
}

impl Branch {
    fn select(&self, limit: &str) -> String {
        let conds = if self.conds.is_empty() {
            "TRUE".to_string()
        } else {
            self.conds.join(" AND ")
        };
        format!(
            "SELECT {phase} AS phase, {sort}, {ACCOUNT_COLUMNS}, \
             row_number() OVER (ORDER BY {order}) AS seq \
             FROM {from} WHERE {conds} ORDER BY {order} LIMIT {limit}",
            phase = self.phase,
            sort = self.sort_cols,
            order = self.order_by,
            from = self.from,
        )
    }
}

const FROM_SCORED: &str = "health_current hc JOIN accounts a ON a.id = hc.account_id";
const FROM_ACCOUNTS: &str = "accounts a";
const FROM_ACCOUNTS_SCORED: &str = "accounts a JOIN health_current hc ON hc.account_id = a.id";
const NO_SORT: &str = "NULL::float8 AS sort_num, NULL::text AS sort_text, NULL::date AS sort_date";

/// One page of accounts after `after` (a cursor from a previous page of the same order).
/// `first` must be 0 or more; the caller bounds it.
pub async fn page(
    pool: &DbPool,
    filter: &Filter,
    order: Order,
    first: i64,
    after: Option<&str>,
    today: NaiveDate,
) -> Result<Page> {
    filter.validate()?;
    if first < 0 {
        return Err(AccountsError::InvalidArgument(format!(
            "`first` must be 0 or more, got {first}"
        )));
    }
    let cursor = after.map(|c| decode_cursor(c, order)).transpose()?;
    let mut params = Params::default();
    let cond = conditions(filter, &mut params, today);
    let limit = params.add(Bind::BigInt(first + 1));

    // Phase 0: rows that have the sort value.
    let mut p0_conds = cond.on_accounts.clone();
    let (from0, sort0, order0) = match order {
        Order::ScoreAsc => (
            FROM_SCORED,
            "hc.score AS sort_num, NULL::text AS sort_text, NULL::date AS sort_date",
            "hc.score ASC, hc.account_id ASC",
        ),
        Order::ScoreDesc => (
            FROM_SCORED,
            "hc.score AS sort_num, NULL::text AS sort_text, NULL::date AS sort_date",
            "hc.score DESC, hc.account_id DESC",
        ),
        Order::ScoreChange => (
            FROM_SCORED,
            "hc.score_change AS sort_num, NULL::text AS sort_text, NULL::date AS sort_date",
            "hc.score_change ASC, hc.account_id ASC",
        ),
        Order::Name => (
            if cond.on_health.is_some() {
                FROM_ACCOUNTS_SCORED
            } else {
                FROM_ACCOUNTS
            },
            "NULL::float8 AS sort_num, lower(a.name) AS sort_text, NULL::date AS sort_date",
            "lower(a.name) ASC, a.id ASC",
        ),
        Order::RenewalDate => (
            if cond.on_health.is_some() {
                FROM_ACCOUNTS_SCORED
            } else {
                FROM_ACCOUNTS
            },
            "NULL::float8 AS sort_num, NULL::text AS sort_text, a.renewal_date AS sort_date",
            "a.renewal_date ASC, a.id ASC",
        ),
    };
    if order == Order::RenewalDate {
        p0_conds.push("a.renewal_date IS NOT NULL".into());
    }
    if let Some(h) = &cond.on_health {
        p0_conds.push(h.clone());
    }
    let run_p0 = cursor.as_ref().is_none_or(|c| c.p == 0);
    if let Some(c) = cursor.as_ref().filter(|c| c.p == 0) {
        let id = params.add(Bind::BigInt(c.i));
        let keyset = match order {
            Order::ScoreAsc => format!(
                "(hc.score, hc.account_id) > ({}, {id})",
                params.add(Bind::Double(c.n.unwrap_or_default()))
            ),
            Order::ScoreDesc => format!(
                "(hc.score, hc.account_id) < ({}, {id})",
                params.add(Bind::Double(c.n.unwrap_or_default()))
            ),
            Order::ScoreChange => format!(
                "(hc.score_change, hc.account_id) > ({}, {id})",
                params.add(Bind::Double(c.n.unwrap_or_default()))
            ),
            Order::Name => format!(
                "(lower(a.name), a.id) > ({}, {id})",
                params.add(Bind::Text(c.t.clone().unwrap_or_default()))
            ),
            Order::RenewalDate => format!(
                "(a.renewal_date, a.id) > ({}, {id})",
                params.add(Bind::Date(c.d.unwrap_or_default()))
            ),
        };
        p0_conds.push(keyset);
    }
    let p0 = Branch {
        phase: 0,
        from: from0,
        conds: p0_conds,
        sort_cols: sort0,
        order_by: order0,
    };

    // Phase 1: rows without the sort value, by key. Empty when the filter needs that value.
    let p1 = match order {
        o if o.is_score() && cond.on_health.is_none() => {
            let mut conds = cond.on_accounts.clone();
            conds.push(
                "NOT EXISTS (SELECT 1 FROM health_current hc WHERE hc.account_id = a.id)".into(),
            );
            Some((FROM_ACCOUNTS, conds))
        }
        Order::RenewalDate if filter.renewal_within_days.is_none() => {
            let mut conds = cond.on_accounts.clone();
            conds.push("a.renewal_date IS NULL".into());
            if let Some(h) = &cond.on_health {
                conds.push(h.clone());
            }
            let from = if cond.on_health.is_some() {
                FROM_ACCOUNTS_SCORED
            } else {
                FROM_ACCOUNTS
            };
            Some((from, conds))
        }
        _ => None,
    }
    .map(|(from, mut conds)| {
        if let Some(c) = cursor.as_ref().filter(|c| c.p == 1) {
            conds.push(format!("a.key > {}", params.add(Bind::Text(c.k.clone()))));
        }
        Branch {
            phase: 1,
            from,
            conds,
            sort_cols: NO_SORT,
            order_by: "a.key ASC",
        }
    });

    let sql = match (run_p0, p1) {
        (true, None) => p0.select(&limit),
        (false, Some(p1)) => p1.select(&limit),
        (true, Some(mut p1)) => {
            // The one-time filter keeps phase 1 from running while phase 0 fills the page.
            p1.conds
                .push(format!("(SELECT count(*) FROM p0) < {limit}"));
            format!(
                "WITH p0 AS MATERIALIZED ({}), p1 AS ({}) \
                 SELECT * FROM (SELECT * FROM p0 UNION ALL SELECT * FROM p1) u \
                 ORDER BY phase, seq LIMIT {limit}",
                p0.select(&limit),
                p1.select(&limit)
            )
        }
        (false, None) => {
            return Err(AccountsError::InvalidCursor(
                "not a cursor returned by `accounts`".into(),
            ))
        }
    };

    let mut conn = pool.get().await?;
    let rows: Vec<PageRow> = params.query(sql).load(&mut conn).await?;
    let has_next_page = rows.len() as i64 > first;
    let items = rows
        .into_iter()
        .take(first as usize)
        .map(|r| {
            let cursor = encode_cursor(&CursorData {
                o: order.code().to_string(),
                p: r.phase as u8,
                n: r.sort_num,
                t: r.sort_text,
                d: r.sort_date,
                i: r.account.id,
                k: r.account.key.clone(),
            });
            PageItem {
                account: r.account,
                cursor,
            }
        })
        .collect();
    Ok(Page {
        items,
        has_next_page,
    })
}

/// How many accounts match the filter (all pages).
pub async fn count(pool: &DbPool, filter: &Filter, today: NaiveDate) -> Result<i64> {
    filter.validate()?;
    let mut params = Params::default();
    let cond = conditions(filter, &mut params, today);
    let mut conds = cond.on_accounts;
    let from = match cond.on_health {
        // Every `health_current` row has its account (foreign key): no join needed.
        Some(h) if conds.is_empty() => {
            conds.push(h);
            "health_current hc"
        }
        Some(h) => {
            conds.push(h);
            FROM_ACCOUNTS_SCORED
        }
        None => FROM_ACCOUNTS,
    };
    let where_sql = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let mut conn = pool.get().await?;
    let row: CountRow = params
        .query(format!("SELECT count(*) AS n FROM {from}{where_sql}"))
        .get_result(&mut conn)
        .await?;
    Ok(row.n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_are_checked() {
        let c = CursorData {
            o: "SCORE_ASC".into(),
            p: 0,
            n: Some(41.3),
            t: None,
            d: None,
            i: 7,
            k: "acme".into(),
        };
        let s = encode_cursor(&c);
        assert_eq!(decode_cursor(&s, Order::ScoreAsc).unwrap(), c);
        assert!(matches!(
            decode_cursor(&s, Order::Name),
            Err(AccountsError::InvalidCursor(_))
        ));
        assert!(decode_cursor("garbage!", Order::ScoreAsc).is_err());
        assert!(decode_cursor("", Order::ScoreAsc).is_err());
        let name_phase1 = encode_cursor(&CursorData {
            o: "NAME".into(),
            p: 1,
            ..c
        });
        assert!(decode_cursor(&name_phase1, Order::Name).is_err());
    }

    #[test]
    fn search_escapes_like_wildcards() {
        let f = Filter {
            search: Some(" 50%_off\\ ".into()),
            ..Filter::default()
        };
        assert_eq!(f.search_pattern().unwrap(), "%50\\%\\_off\\\\%");
        let empty = Filter {
            search: Some("  ".into()),
            ..Filter::default()
        };
        assert_eq!(empty.search_pattern(), None);
    }
}
