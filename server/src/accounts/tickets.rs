//! Support tickets per account, newest opened first.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Nullable, SmallInt, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use super::Result;
use crate::db::DbPool;

/// Which tickets of one account to read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TicketQuery {
    pub account_id: i64,
    /// At most this many (newest opened first).
    pub limit: i64,
    /// Stored statuses (`new`, `open`, `pending`, `solved`, `closed`); `None`: any.
    pub statuses: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct Ticket {
    #[diesel(sql_type = BigInt)]
    ord: i64,
    #[diesel(sql_type = Text)]
    pub ticket_id: String,
    #[diesel(sql_type = Text)]
    pub source: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub subject: Option<String>,
    #[diesel(sql_type = Text)]
    pub priority: String,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Timestamptz)]
    pub opened_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub closed_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<SmallInt>)]
    pub csat: Option<i16>,
}

/// The tickets for each query, in the order of `queries`, with one statement for all of them.
pub async fn tickets(pool: &DbPool, queries: &[TicketQuery]) -> Result<Vec<Vec<Ticket>>> {
    let mut out = vec![Vec::new(); queries.len()];
    if queries.is_empty() {
        return Ok(out);
    }
    let ids: Vec<i64> = queries.iter().map(|q| q.account_id).collect();
    let limits: Vec<i64> = queries.iter().map(|q| q.limit.max(0)).collect();
    // Status sets travel as comma-separated text (arrays of arrays must be rectangular).
    let statuses: Vec<Option<String>> = queries
        .iter()
        .map(|q| q.statuses.as_ref().map(|s| s.join(",")))
        .collect();
    let mut conn = pool.get().await?;
    let rows: Vec<Ticket> = diesel::sql_query(
        "SELECT k.ord, t.ticket_id, t.source, t.subject, t.priority, t.status, t.opened_at, t.closed_at, t.csat \
         FROM unnest($1::bigint[], $2::bigint[], $3::text[]) WITH ORDINALITY AS k(account_id, lim, statuses, ord) \
         JOIN LATERAL ( \
           SELECT * FROM support_tickets t \
           WHERE t.account_id = k.account_id \
             AND (k.statuses IS NULL OR t.status = ANY(string_to_array(k.statuses, ','))) \
           ORDER BY t.opened_at DESC, t.source, t.ticket_id LIMIT k.lim) t ON true \
         ORDER BY k.ord, t.opened_at DESC, t.source, t.ticket_id",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<BigInt>, _>(limits)
    .bind::<Array<Nullable<Text>>, _>(statuses)
    .load(&mut conn)
    .await?;
    for row in rows {
        if let Some(slot) = usize::try_from(row.ord - 1)
            .ok()
            .and_then(|i| out.get_mut(i))
        {
            slot.push(row);
        }
    }
    Ok(out)
}
