//! Read access to accounts and everything shown about one: the filtered, ordered account list with
//! keyset cursors (`list`), scores and their history (`health`), support tickets (`tickets`),
//! subscriptions and invoices (`billing`), and usage timelines and feature adoption from the daily
//! rollup (`usage`).
//!
//! Every function that reads per-account details takes a whole batch of accounts (the GraphQL
//! DataLoaders call them once per batch) and runs one set-based statement: nothing here queries per
//! account. Per-key arguments (a history window, a ticket limit...) travel as parallel arrays that the
//! statement `unnest`s `WITH ORDINALITY`, so a batch with mixed arguments is still one statement and
//! each result row names the key (by its position) it belongs to.

pub mod billing;
pub mod health;
pub mod list;
pub mod tickets;
pub mod usage;

mod sql;

use bigdecimal::BigDecimal;
use chrono::NaiveDate;
use diesel::sql_types::{Array, BigInt, Date, Integer, Nullable, Numeric, Text};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use crate::db::{DbError, DbPool};

/// Errors of the account read layer. `Display` is for logs; the GraphQL layer shows clients only
/// `InvalidCursor` / `InvalidArgument` messages and hides database errors.
#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("invalid cursor: {0}")]
    InvalidCursor(String),
    #[error("{0}")]
    InvalidArgument(String),
}

impl From<diesel::result::Error> for AccountsError {
    fn from(e: diesel::result::Error) -> Self {
        AccountsError::Db(DbError::Query(e))
    }
}

impl From<diesel_async::pooled_connection::bb8::RunError> for AccountsError {
    fn from(e: diesel_async::pooled_connection::bb8::RunError) -> Self {
        AccountsError::Db(DbError::Pool(e))
    }
}

pub type Result<T, E = AccountsError> = std::result::Result<T, E>;

/// One account's own fields (the `accounts` row).
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct AccountRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub key: String,
    #[diesel(sql_type = Text)]
    pub name: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub domain: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub owner: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub plan: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    pub seats: Option<i32>,
    #[diesel(sql_type = Nullable<Numeric>)]
    pub mrr: Option<BigDecimal>,
    #[diesel(sql_type = Nullable<Date>)]
    pub renewal_date: Option<NaiveDate>,
}

/// The `accounts` columns of [`AccountRow`], for a query that aliases `accounts` as `a`.
pub(crate) const ACCOUNT_COLUMNS: &str =
    "a.id, a.key, a.name, a.domain, a.owner, a.plan, a.seats, a.mrr, a.renewal_date";

/// Money as shown to clients: always two decimals (`NUMERIC(14,2)` sums may come back with another scale).
pub fn money(value: BigDecimal) -> BigDecimal {
    value.with_scale_round(2, bigdecimal::RoundingMode::HalfEven)
}

/// Money as text with exactly two decimals (`"1200.50"`, `"0.00"`, `"-3.10"`), rounding half to even.
pub fn format_money(value: &BigDecimal) -> String {
    let (digits, _) = value
        .with_scale_round(2, bigdecimal::RoundingMode::HalfEven)
        .as_bigint_and_exponent();
    let negative = digits.sign() == bigdecimal::num_bigint::Sign::Minus;
    let abs = format!("{:0>3}", digits.magnitude().to_string());
    let (int, frac) = abs.split_at(abs.len() - 2);
    format!("{}{int}.{frac}", if negative { "-" } else { "" })
}

/// The account with this public key, if any.
pub async fn by_key(pool: &DbPool, key: &str) -> Result<Option<AccountRow>> {
    let mut conn = pool.get().await?;
    let rows: Vec<AccountRow> = diesel::sql_query(format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.key = $1"
    ))
    .bind::<Text, _>(key)
    .load(&mut conn)
    .await?;
    Ok(rows.into_iter().next())
}

/// The accounts with these internal ids (missing ids are left out), in no particular order.
pub async fn by_ids(pool: &DbPool, ids: &[i64]) -> Result<Vec<AccountRow>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = pool.get().await?;
    let rows = diesel::sql_query(format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.id = ANY($1)"
    ))
    .bind::<Array<BigInt>, _>(ids)
    .load(&mut conn)
    .await?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn money_always_has_two_decimals() {
        let f = |s: &str| format_money(&BigDecimal::from_str(s).unwrap());
        assert_eq!(f("0"), "0.00");
        assert_eq!(f("1200.5"), "1200.50");
        assert_eq!(f("0.07"), "0.07");
        assert_eq!(f("-3.1"), "-3.10");
        assert_eq!(f("12345678901234.994"), "12345678901234.99");
        assert_eq!(f("2.345"), "2.34");
        assert_eq!(f("1e3"), "1000.00");
    }
}
