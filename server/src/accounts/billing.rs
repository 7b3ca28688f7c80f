//! Billing per account: the most relevant subscription, MRR, and overdue invoices.
//!
//! An invoice is overdue when its status is `open` or `uncollectible`, its due date is before today
//! and it has no `paid_at`. The most relevant subscription is a live one (anything but `canceled`)
//! before a canceled one, then the latest current period end.

use std::collections::HashMap;

use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Date, Integer, Nullable, Numeric, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use super::{money, Result};
use crate::db::DbPool;

/// One account's billing state.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct BillingSummary {
    #[diesel(sql_type = BigInt)]
    pub account_id: i64,
    /// Status of the most relevant subscription; `None` without any subscription.
    #[diesel(sql_type = Nullable<Text>)]
    pub status: Option<String>,
    /// Sum of the live subscriptions' MRR (0 when all are canceled, `None` without subscriptions
    /// or when none states an MRR).
    #[diesel(sql_type = Nullable<Numeric>)]
    pub mrr: Option<BigDecimal>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub current_period_end: Option<DateTime<Utc>>,
    #[diesel(sql_type = Bool)]
    pub cancel_at_period_end: bool,
    #[diesel(sql_type = Numeric)]
    pub overdue_amount: BigDecimal,
    #[diesel(sql_type = BigInt)]
    pub overdue_invoice_count: i64,
    /// Days since the due date of the oldest overdue invoice.
    #[diesel(sql_type = Nullable<Integer>)]
    pub days_oldest_overdue: Option<i32>,
}

/// Billing of each account that has a subscription or an invoice (others are absent), as of `today`.
pub async fn summaries(
    pool: &DbPool,
    account_ids: &[i64],
    today: NaiveDate,
) -> Result<HashMap<i64, BillingSummary>> {
    if account_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let mut conn = pool.get().await?;
    let rows: Vec<BillingSummary> = diesel::sql_query(
        "WITH sub AS ( \
           SELECT DISTINCT ON (s.account_id) s.account_id, s.status, s.current_period_end, s.cancel_at_period_end \
           FROM subscriptions s WHERE s.account_id = ANY($1) \
           ORDER BY s.account_id, (s.status = 'canceled'), s.current_period_end DESC NULLS LAST, \
                    s.updated_at DESC, s.source, s.subscription_id), \
         mrr AS ( \
           SELECT s.account_id, \
                  CASE WHEN bool_or(s.status <> 'canceled') \
                       THEN sum(s.mrr) FILTER (WHERE s.status <> 'canceled') ELSE 0 END AS mrr \
           FROM subscriptions s WHERE s.account_id = ANY($1) GROUP BY s.account_id), \
         inv AS ( \
           SELECT i.account_id, \
                  count(*) FILTER (WHERE i.status IN ('open', 'uncollectible') AND i.due_date < $2 AND i.paid_at IS NULL) \
                    AS overdue_invoice_count, \
                  COALESCE(sum(i.amount) FILTER (WHERE i.status IN ('open', 'uncollectible') AND i.due_date < $2 \
                                                 AND i.paid_at IS NULL), 0) AS overdue_amount, \
                  min(i.due_date) FILTER (WHERE i.status IN ('open', 'uncollectible') AND i.due_date < $2 \
                                          AND i.paid_at IS NULL) AS oldest_due \
           FROM invoices i WHERE i.account_id = ANY($1) GROUP BY i.account_id) \
         SELECT ids.account_id, sub.status, mrr.mrr, sub.current_period_end, \
                COALESCE(sub.cancel_at_period_end, false) AS cancel_at_period_end, \
                COALESCE(inv.overdue_amount, 0) AS overdue_amount, \
                COALESCE(inv.overdue_invoice_count, 0) AS overdue_invoice_count, \
                ($2 - inv.oldest_due) AS days_oldest_overdue \
         FROM (SELECT DISTINCT unnest($1::bigint[]) AS account_id) ids \
         LEFT JOIN sub ON sub.account_id = ids.account_id \
         LEFT JOIN mrr ON mrr.account_id = ids.account_id \
         LEFT JOIN inv ON inv.account_id = ids.account_id \
         WHERE sub.account_id IS NOT NULL OR inv.account_id IS NOT NULL",
    )
    .bind::<Array<BigInt>, _>(account_ids)
    .bind::<Date, _>(today)
    .load(&mut conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|mut r| {
            r.overdue_amount = money(r.overdue_amount);
            r.mrr = r.mrr.map(money);
            (r.account_id, r)
        })
        .collect())
}

/// Which invoices of one account to read (latest due date first).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InvoiceQuery {
    pub account_id: i64,
    pub limit: i64,
}

#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct Invoice {
    #[diesel(sql_type = BigInt)]
    ord: i64,
    #[diesel(sql_type = Text)]
    pub invoice_id: String,
    #[diesel(sql_type = Text)]
    pub source: String,
    #[diesel(sql_type = Numeric)]
    pub amount: BigDecimal,
    #[diesel(sql_type = Text)]
    pub currency: String,
    #[diesel(sql_type = Date)]
    pub due_date: NaiveDate,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub paid_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Text)]
    pub status: String,
}

impl Invoice {
    /// Days past due as of `today`, when the invoice is overdue (see the module docs).
    pub fn days_overdue(&self, today: NaiveDate) -> Option<i64> {
        let unpaid =
            matches!(self.status.as_str(), "open" | "uncollectible") && self.paid_at.is_none();
        (unpaid && self.due_date < today).then(|| (today - self.due_date).num_days())
    }
}

/// The invoices for each query, in the order of `queries`, with one statement for all of them.
pub async fn invoices(pool: &DbPool, queries: &[InvoiceQuery]) -> Result<Vec<Vec<Invoice>>> {
    let mut out = vec![Vec::new(); queries.len()];
    if queries.is_empty() {
        return Ok(out);
    }
    let ids: Vec<i64> = queries.iter().map(|q| q.account_id).collect();
    let limits: Vec<i64> = queries.iter().map(|q| q.limit.max(0)).collect();
    let mut conn = pool.get().await?;
    let rows: Vec<Invoice> = diesel::sql_query(
        "SELECT k.ord, i.invoice_id, i.source, i.amount, i.currency, i.due_date, i.paid_at, i.status \
         FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS k(account_id, lim, ord) \
         JOIN LATERAL (SELECT * FROM invoices i WHERE i.account_id = k.account_id \
                       ORDER BY i.due_date DESC, i.source, i.invoice_id LIMIT k.lim) i ON true \
         ORDER BY k.ord, i.due_date DESC, i.source, i.invoice_id",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<BigInt>, _>(limits)
    .load(&mut conn)
    .await?;
    for mut row in rows {
        row.amount = money(row.amount);
        if let Some(slot) = usize::try_from(row.ord - 1)
            .ok()
            .and_then(|i| out.get_mut(i))
        {
            slot.push(row);
        }
    }
    Ok(out)
}
