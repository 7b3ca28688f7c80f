//! Which account a source's key belongs to: `account_identities (source, external_key) -> account`.
//!
//! The first time a connector instance (the `source`) names an account key, the host maps it, in
//! this order:
//! 1. to the account whose `domain` equals the domain the record gives (same customer seen by
//!    another system), `matched_by = 'domain'`;
//! 2. to the account whose own `key` equals the external key, `matched_by = 'key'`;
//! 3. to a new account with `key` = the external key, `matched_by = 'key'`. When the first record
//!    for a key is a fact (usage, ticket...) rather than an account record, the new account is a
//!    placeholder named after its key; a later account record fills in its name and details.
//!
//! Admins see the mapping (`accountIdentities`) and correct it (`remapAccountIdentity`). A remap
//! also moves the data that source already ingested for the key, when the old account holds no
//! other key from the same source (otherwise rows cannot be told apart and only new data moves).
//!
//! Resolution is set-based: a handful of statements per batch, whatever its size. Rows are
//! written in key order so concurrent runs of different instances lock in the same order.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::RuntimeError;
use crate::db::DbPool;

#[derive(diesel::QueryableByName)]
struct Mapped {
    #[diesel(sql_type = Text)]
    external_key: String,
    #[diesel(sql_type = BigInt)]
    account_id: i64,
}

/// Normalises a domain for matching: trimmed, lower-case, without a scheme, `www.` or path;
/// `None` when nothing is left.
pub fn normalize_domain(domain: Option<&str>) -> Option<String> {
    let d = domain?.trim().to_ascii_lowercase();
    let d = d
        .strip_prefix("https://")
        .or_else(|| d.strip_prefix("http://"))
        .unwrap_or(&d);
    let d = d.split('/').next().unwrap_or("");
    let d = d.strip_prefix("www.").unwrap_or(d).trim_end_matches('.');
    if d.is_empty() {
        None
    } else {
        Some(d.to_string())
    }
}

/// Maps every key to its account id, creating identities (and accounts) as described in the
/// module docs. `domains[i]` is the domain the batch gives for `keys[i]` (normalised), if any.
/// Keys must be distinct. Runs inside the caller's transaction.
pub async fn resolve(
    conn: &mut AsyncPgConnection,
    source: &str,
    keys: &[String],
    domains: &[Option<String>],
) -> Result<HashMap<String, i64>, diesel::result::Error> {
    debug_assert_eq!(keys.len(), domains.len());
    let mut map = HashMap::with_capacity(keys.len());
    if keys.is_empty() {
        return Ok(map);
    }
    let found: Vec<Mapped> = diesel::sql_query(
        "SELECT external_key, account_id FROM account_identities \
         WHERE source = $1 AND external_key = ANY($2)",
    )
    .bind::<Text, _>(source)
    .bind::<Array<Text>, _>(keys)
    .load(conn)
    .await?;
    map.extend(found.into_iter().map(|m| (m.external_key, m.account_id)));
    if map.len() == keys.len() {
        return Ok(map);
    }

    let missing = |map: &HashMap<String, i64>| -> (Vec<String>, Vec<Option<String>>) {
        keys.iter()
            .zip(domains)
            .filter(|(k, _)| !map.contains_key(*k))
            .map(|(k, d)| (k.clone(), d.clone()))
            .unzip()
    };

    let link_by_domain =
        "INSERT INTO account_identities (source, external_key, account_id, matched_by) \
         SELECT $1, m.k, a.id, 'domain' FROM unnest($2::text[], $3::text[]) AS m(k, d) \
         JOIN accounts a ON lower(a.domain) = m.d WHERE m.d IS NOT NULL ORDER BY m.k \
         ON CONFLICT (source, external_key) DO NOTHING RETURNING external_key, account_id";
    let link_by_key =
        "INSERT INTO account_identities (source, external_key, account_id, matched_by) \
         SELECT $1, m.k, a.id, 'key' FROM unnest($2::text[]) AS m(k) \
         JOIN accounts a ON a.key = m.k ORDER BY m.k \
         ON CONFLICT (source, external_key) DO NOTHING RETURNING external_key, account_id";

    // Two rounds: link to existing accounts; create the rest; link again (the second round also
    // catches keys whose new account lost a race or a same-domain tie within the batch).
    for round in 0..2 {
        let (mk, md) = missing(&map);
        if mk.is_empty() {
            break;
        }
        if md.iter().any(Option::is_some) {
            let rows: Vec<Mapped> = diesel::sql_query(link_by_domain)
                .bind::<Text, _>(source)
                .bind::<Array<Text>, _>(&mk)
                .bind::<Array<Nullable<Text>>, _>(&md)
                .load(conn)
                .await?;
            map.extend(rows.into_iter().map(|m| (m.external_key, m.account_id)));
        }
        let (mk, md) = missing(&map);
        if mk.is_empty() {
            break;
        }
        let rows: Vec<Mapped> = diesel::sql_query(link_by_key)
            .bind::<Text, _>(source)
            .bind::<Array<Text>, _>(&mk)
            .load(conn)
            .await?;
        map.extend(rows.into_iter().map(|m| (m.external_key, m.account_id)));
        if round == 0 {
            let (mk2, md2): (Vec<String>, Vec<Option<String>>) = mk
                .into_iter()
                .zip(md)
                .filter(|(k, _)| !map.contains_key(k))
                .unzip();
            if !mk2.is_empty() {
                // Any unique violation (key or domain) means another row claims it: link instead.
                diesel::sql_query(
                    "INSERT INTO accounts (key, name, domain) \
                     SELECT k, k, d FROM unnest($1::text[], $2::text[]) AS m(k, d) ORDER BY k \
                     ON CONFLICT DO NOTHING",
                )
                .bind::<Array<Text>, _>(&mk2)
                .bind::<Array<Nullable<Text>>, _>(&md2)
                .execute(conn)
                .await?;
            }
        }
    }
    // A key still unmapped means a concurrent writer holds its identity row uncommitted; one
    // more lookup after the conflicting transactions finished settles it.
    if map.len() < keys.len() {
        let (mk, _) = missing(&map);
        let found: Vec<Mapped> = diesel::sql_query(
            "SELECT external_key, account_id FROM account_identities \
             WHERE source = $1 AND external_key = ANY($2)",
        )
        .bind::<Text, _>(source)
        .bind::<Array<Text>, _>(&mk)
        .load(conn)
        .await?;
        map.extend(found.into_iter().map(|m| (m.external_key, m.account_id)));
    }
    Ok(map)
}

/// One identity with the account it maps to.
#[derive(Debug, Clone, diesel::QueryableByName)]
pub struct IdentityRow {
    #[diesel(sql_type = Text)]
    pub source: String,
    #[diesel(sql_type = Text)]
    pub external_key: String,
    #[diesel(sql_type = BigInt)]
    pub account_id: i64,
    #[diesel(sql_type = Text)]
    pub account_key: String,
    #[diesel(sql_type = Text)]
    pub account_name: String,
    #[diesel(sql_type = Text)]
    pub matched_by: String,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    pub updated_at: DateTime<Utc>,
}

const IDENTITY_SELECT: &str =
    "SELECT i.source, i.external_key, i.account_id, a.key AS account_key, \
     a.name AS account_name, i.matched_by, i.created_at, i.updated_at \
     FROM account_identities i JOIN accounts a ON a.id = i.account_id";

/// Identities, optionally filtered by source and by the account they map to.
pub async fn list(
    pool: &DbPool,
    source: Option<&str>,
    account_key: Option<&str>,
    limit: i64,
) -> Result<Vec<IdentityRow>, RuntimeError> {
    let mut conn = pool.get().await?;
    let rows = diesel::sql_query(format!(
        "{IDENTITY_SELECT} WHERE ($1::text IS NULL OR i.source = $1) \
         AND ($2::text IS NULL OR a.key = $2) \
         ORDER BY i.source, i.external_key LIMIT $3"
    ))
    .bind::<Nullable<Text>, _>(source)
    .bind::<Nullable<Text>, _>(account_key)
    .bind::<BigInt, _>(limit.clamp(1, 10_000))
    .load(&mut conn)
    .await?;
    Ok(rows)
}

/// What [`remap`] did.
#[derive(Debug, Clone)]
pub struct RemapOutcome {
    pub identity: IdentityRow,
    /// The account the key mapped to before.
    pub previous_account_id: i64,
    /// Whether the data already ingested for the key moved to the new account.
    pub moved_data: bool,
    /// Whether the previous account was deleted (it had nothing left).
    pub deleted_previous: bool,
    /// Accounts whose scores need recomputing.
    pub affected_accounts: Vec<i64>,
}

/// Points `(source, external_key)` at the account with key `account_key` (`matched_by = 'admin'`).
/// See the module docs for what happens to data already ingested. One transaction.
pub async fn remap(
    pool: &DbPool,
    source: &str,
    external_key: &str,
    account_key: &str,
) -> Result<RemapOutcome, RuntimeError> {
    #[derive(diesel::QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let mut pooled = pool.get().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    let source = source.to_string();
    let external_key = external_key.to_string();
    let account_key = account_key.to_string();
    conn.transaction::<_, RuntimeError, _>(async |conn| {
        {
            let old: Option<Id> = diesel::sql_query(
                "SELECT account_id AS id FROM account_identities \
                 WHERE source = $1 AND external_key = $2 FOR UPDATE",
            )
            .bind::<Text, _>(&source)
            .bind::<Text, _>(&external_key)
            .get_result(conn)
            .await
            .optional_row()?;
            let old = old.ok_or_else(|| RuntimeError::UnknownIdentity {
                source_name: source.clone(),
                external_key: external_key.clone(),
            })?;
            let new: Option<Id> = diesel::sql_query("SELECT id FROM accounts WHERE key = $1")
                .bind::<Text, _>(&account_key)
                .get_result(conn)
                .await
                .optional_row()?;
            let new = new.ok_or_else(|| RuntimeError::UnknownAccount(account_key.clone()))?;
            let (old, new) = (old.id, new.id);
            diesel::sql_query(
                "UPDATE account_identities SET account_id = $3, matched_by = 'admin', updated_at = now() \
                 WHERE source = $1 AND external_key = $2",
            )
            .bind::<Text, _>(&source)
            .bind::<Text, _>(&external_key)
            .bind::<BigInt, _>(new)
            .execute(conn)
            .await?;
            let mut moved_data = false;
            let mut deleted_previous = false;
            if old != new {
                let others: Vec<Id> = diesel::sql_query(
                    "SELECT account_id AS id FROM account_identities WHERE source = $1 AND account_id = $2 LIMIT 1",
                )
                .bind::<Text, _>(&source)
                .bind::<BigInt, _>(old)
                .load(conn)
                .await?;
                if others.is_empty() {
                    move_source_data(conn, &source, old, new).await?;
                    moved_data = true;
                }
                let left: Vec<Id> = diesel::sql_query(
                    "SELECT $1::bigint AS id WHERE NOT EXISTS (SELECT 1 FROM account_identities WHERE account_id = $1) \
                     AND NOT EXISTS (SELECT 1 FROM usage_events WHERE account_id = $1) \
                     AND NOT EXISTS (SELECT 1 FROM usage_daily WHERE account_id = $1) \
                     AND NOT EXISTS (SELECT 1 FROM support_tickets WHERE account_id = $1) \
                     AND NOT EXISTS (SELECT 1 FROM subscriptions WHERE account_id = $1) \
                     AND NOT EXISTS (SELECT 1 FROM invoices WHERE account_id = $1) \
                     AND NOT EXISTS (SELECT 1 FROM churn_outcomes WHERE account_id = $1)",
                )
                .bind::<BigInt, _>(old)
                .load(conn)
                .await?;
                if !left.is_empty() {
                    diesel::sql_query("DELETE FROM accounts WHERE id = $1")
                        .bind::<BigInt, _>(old)
                        .execute(conn)
                        .await?;
                    deleted_previous = true;
                }
            }
            let identity: IdentityRow = diesel::sql_query(format!(
                "{IDENTITY_SELECT} WHERE i.source = $1 AND i.external_key = $2"
            ))
            .bind::<Text, _>(&source)
            .bind::<Text, _>(&external_key)
            .get_result(conn)
            .await?;
            let mut affected = vec![new];
            if old != new && !deleted_previous {
                affected.push(old);
            }
            Ok(RemapOutcome {
                identity,
                previous_account_id: old,
                moved_data,
                deleted_previous,
                affected_accounts: affected,
            })
        }
    })
    .await
}

/// Moves everything `source` ingested for account `old` to account `new` (rows already present
/// under `new` win), then rebuilds both accounts' daily usage rollups.
async fn move_source_data(
    conn: &mut AsyncPgConnection,
    source: &str,
    old: i64,
    new: i64,
) -> Result<(), diesel::result::Error> {
    let statements = [
        "INSERT INTO usage_events (account_id, source, event_uid, user_id, event, feature, occurred_at, count) \
         SELECT $3, source, event_uid, user_id, event, feature, occurred_at, count FROM usage_events \
         WHERE account_id = $2 AND source = $1 ON CONFLICT DO NOTHING",
        "DELETE FROM usage_events WHERE account_id = $2 AND source = $1",
        "INSERT INTO usage_daily_external (account_id, source, day, user_id, event, feature, events) \
         SELECT $3, source, day, user_id, event, feature, events FROM usage_daily_external \
         WHERE account_id = $2 AND source = $1 ON CONFLICT DO NOTHING",
        "DELETE FROM usage_daily_external WHERE account_id = $2 AND source = $1",
        "INSERT INTO support_tickets (account_id, source, ticket_id, subject, priority, status, opened_at, closed_at, csat, updated_at) \
         SELECT $3, source, ticket_id, subject, priority, status, opened_at, closed_at, csat, updated_at FROM support_tickets \
         WHERE account_id = $2 AND source = $1 ON CONFLICT DO NOTHING",
        "DELETE FROM support_tickets WHERE account_id = $2 AND source = $1",
        "INSERT INTO subscriptions (account_id, source, subscription_id, status, mrr, current_period_end, cancel_at_period_end, updated_at) \
         SELECT $3, source, subscription_id, status, mrr, current_period_end, cancel_at_period_end, updated_at FROM subscriptions \
         WHERE account_id = $2 AND source = $1 ON CONFLICT DO NOTHING",
        "DELETE FROM subscriptions WHERE account_id = $2 AND source = $1",
        "INSERT INTO invoices (account_id, source, invoice_id, amount, currency, due_date, paid_at, status, updated_at) \
         SELECT $3, source, invoice_id, amount, currency, due_date, paid_at, status, updated_at FROM invoices \
         WHERE account_id = $2 AND source = $1 ON CONFLICT DO NOTHING",
        "DELETE FROM invoices WHERE account_id = $2 AND source = $1",
        "INSERT INTO churn_outcomes (account_id, churned_at, source) \
         SELECT $3, churned_at, source FROM churn_outcomes WHERE account_id = $2 AND source = $1 ON CONFLICT DO NOTHING",
        "DELETE FROM churn_outcomes WHERE account_id = $2 AND source = $1",
    ];
    for sql in statements {
        diesel::sql_query(sql)
            .bind::<Text, _>(source)
            .bind::<BigInt, _>(old)
            .bind::<BigInt, _>(new)
            .execute(conn)
            .await?;
    }
    rebuild_usage_daily(conn, &[old, new]).await
}

/// Recomputes `usage_daily` of some accounts from their raw events and per-day figures.
pub async fn rebuild_usage_daily(
    conn: &mut AsyncPgConnection,
    accounts: &[i64],
) -> Result<(), diesel::result::Error> {
    diesel::sql_query("DELETE FROM usage_daily WHERE account_id = ANY($1)")
        .bind::<Array<BigInt>, _>(accounts)
        .execute(conn)
        .await?;
    diesel::sql_query(
        "INSERT INTO usage_daily (account_id, day, user_id, event, feature, events) \
         SELECT account_id, day, user_id, event, feature, sum(n)::bigint FROM ( \
           SELECT account_id, (occurred_at AT TIME ZONE 'UTC')::date AS day, COALESCE(user_id, '') AS user_id, \
                  event, COALESCE(feature, '') AS feature, count::bigint AS n \
           FROM usage_events WHERE account_id = ANY($1) \
           UNION ALL \
           SELECT account_id, day, user_id, event, feature, events FROM usage_daily_external \
           WHERE account_id = ANY($1)) u \
         GROUP BY account_id, day, user_id, event, feature",
    )
    .bind::<Array<BigInt>, _>(accounts)
    .execute(conn)
    .await?;
    Ok(())
}

/// `.optional()` for `sql_query` results.
trait OptionalRow<T> {
    fn optional_row(self) -> Result<Option<T>, diesel::result::Error>;
}

impl<T> OptionalRow<T> for Result<T, diesel::result::Error> {
    fn optional_row(self) -> Result<Option<T>, diesel::result::Error> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(diesel::result::Error::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_domain;

    #[test]
    fn domains_normalise() {
        assert_eq!(
            normalize_domain(Some(" Acme.COM ")).as_deref(),
            Some("acme.com")
        );
        assert_eq!(
            normalize_domain(Some("https://www.acme.com/about")).as_deref(),
            Some("acme.com")
        );
        assert_eq!(normalize_domain(Some("  ")), None);
        assert_eq!(normalize_domain(None), None);
    }
}
